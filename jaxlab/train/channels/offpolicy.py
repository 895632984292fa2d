"""offpolicy: on teacher-generated completions, minimise sum_t m_t KL(p_T || p_S) (forward KL by
default; config distill.kl picks another divergence), the teacher scoring each completion under
its own prompt. With cached top-k (config distill.topk > 0) the teacher's side comes from the
batch (`topk_ids`, `topk_logp`) and the loss is the top-k + tail KL."""
from __future__ import annotations

from jaxlab.train import losses
from jaxlab.train.channels import common

DATA_FORMATS = ("prompt_completion",)
NEEDS_TEACHER = True
DEFAULT_KL = "forward"
USES_TOPK_CACHE = True
SAMPLES = False
SETTINGS = ()


def prepare(ctx, params, frozen, teacher, batch, rng):
  return batch, {}


def divergence_sum(ctx, params, frozen, teacher, batch):
  """sum_t m_t D(p_T, p_S) over the batch's completion, D = ctx.kl, chunked over positions."""
  model, xs = common.student_hidden(ctx, params, frozen, batch)
  mask = batch["loss_mask"]
  if "topk_ids" in batch:
    if ctx.kl != "forward":
      raise ValueError(f"config key distill.kl={ctx.kl!r}: cached top-k teacher log-probs "
                       "support only the forward KL")
    def fn(x, ids, logp, m):
      d = losses.topk_forward_kl(model.logits(x), ids, logp, ctx.temperature)
      return {"div": (d * m).sum()}
    return common.chunked_sums(fn, ctx.loss_chunk, xs, batch["topk_ids"], batch["topk_logp"],
                               mask)["div"]
  tmodel, xt = common.teacher_hidden(ctx, teacher, batch)

  def fn(x, y, m):
    d = losses.divergence(ctx.kl, model.logits(x), tmodel.logits(y), beta=ctx.beta,
                          temperature=ctx.temperature)
    return {"div": (d * m).sum()}
  return common.chunked_sums(fn, ctx.loss_chunk, xs, xt, mask)["div"]


def loss_sum(ctx, params, frozen, teacher, batch):
  return divergence_sum(ctx, params, frozen, teacher, batch), {}
