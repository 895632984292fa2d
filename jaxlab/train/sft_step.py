"""The SFT step on packed chat batches: the `sft` channel through the generic step.

Loss = sum of -log p over trained tokens / number of trained tokens in the whole global batch
(see jaxlab.train.step). Kept as a small API for tests and benchmarks that build a step without
the runner.
"""
from __future__ import annotations

import optax

from jaxlab.models.params import ModelSpec
from jaxlab.train import step as step_lib
from jaxlab.train.channels import common
from jaxlab.train.channels import sft as sft_channel


def make_sft_step(spec: ModelSpec, optimizer: optax.GradientTransformation,
                  schedule: optax.Schedule, grad_accum: int = 1, loss_chunk: int = 0):
  """Returns the SFT train_step(state, batch) -> (state, metrics)."""
  step = step_lib.make_step(sft_channel, common.Context(spec=spec, loss_chunk=loss_chunk),
                            optimizer, schedule, grad_accum)
  return lambda state, batch: step(state, batch)
