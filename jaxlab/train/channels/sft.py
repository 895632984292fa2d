"""sft: maximise log p_S of the data's tokens (hard labels).

On packed chat rows (the default) the loss is over assistant tokens; in a channel comparison
(a config with a `distill` section, see channels.data_format) it trains on the same
prompt/completion rows as the distillation channels, over the completion tokens after the
student's prompt.
"""
from __future__ import annotations


from jaxlab.train import losses
from jaxlab.train.channels import common

DATA_FORMATS = ("packed", "prompt_completion")
NEEDS_TEACHER = False
DEFAULT_KL = None
USES_TOPK_CACHE = False
SAMPLES = False
SETTINGS = ()


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
