"""sft: maximise log p_S of the data's tokens (hard labels).

On packed chat rows (DATA = "packed", the default) the loss is over assistant tokens; given a
prompt/completion batch (the distillation data, for comparisons on identical rows) it is over
the completion tokens after the student's prompt.
"""
from __future__ import annotations

import jax.numpy as jnp

from jaxlab.train import losses
from jaxlab.train.channels import common

DATA = "packed"
NEEDS_TEACHER = False
DEFAULT_KL = None


def prepare(ctx, params, frozen, teacher, batch, rng):
  return batch, {}


def loss_sum(ctx, params, frozen, teacher, batch):
  if "completion" in batch:
    model, x = common.student_hidden(ctx, params, frozen, batch)
    targets, mask = batch["completion"], batch["loss_mask"]
  else:
    model = ctx.spec.merge(params, frozen)
    x = model.hidden(batch["inputs"], batch["positions"], batch["segment_ids"])
    targets, mask = batch["targets"], batch["loss_mask"]

  def fn(x, t, m):
    return {"nll": losses.masked_nll_sum(model.logits(x), t, m)}
  nll = common.chunked_sums(fn, ctx.loss_chunk, x, targets, mask)["nll"]
  return nll, {}
