"""The SFT step on packed chat batches: the `sft` channel through the generic step.

Loss = sum of -log p over trained tokens / number of trained tokens in the whole global batch
(see jaxlab.train.step). Kept as a small API for tests and benchmarks that build a step without
the runner.
"""
from __future__ import annotations

import jax
import optax

from jaxlab.models.params import ModelSpec
from jaxlab.train import step as step_lib
from jaxlab.train.channels import common
from jaxlab.train.channels import sft as sft_channel
from jaxlab.train.state import TrainState

split_microbatches = step_lib.split_microbatches


def make_sft_step(spec: ModelSpec, optimizer: optax.GradientTransformation,
                  schedule: optax.Schedule, grad_accum: int = 1, loss_chunk: int = 0):
  """Returns the SFT train_step(state, batch) -> (state, metrics)."""
  step = step_lib.make_step(sft_channel, common.Context(spec=spec, loss_chunk=loss_chunk),
                            optimizer, schedule, grad_accum)
  return lambda state, batch: step(state, batch)


def jit_step(step_fn, state_sh: TrainState, batch_sh, mesh):
  """jax.jit with explicit shardings and the state donated."""
  from jax.sharding import NamedSharding, PartitionSpec as P
  replicated = NamedSharding(mesh, P())
  return jax.jit(step_fn, in_shardings=(state_sh, batch_sh),
                 out_shardings=(state_sh, replicated), donate_argnums=(0,))
