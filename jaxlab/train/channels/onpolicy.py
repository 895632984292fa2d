"""onpolicy: the student samples completions from its current parameters inside the step (the
jitted sampler, no host round trip), the teacher scores every token under its own prompt, and
the loss is the per-token reverse KL(p_S || p_T) at the student's positions:
  estimator "exact":   the full-vocabulary reverse KL (config distill.kl may name another);
  estimator "sampled": log p_S(y_t) - log p_T(y_t) at the sampled token as a per-token negative
                       advantage in a policy-gradient loss (Thinking Machines' recipe).
The dataset's completions are not used (only their length budget, data.completion_len)."""
from __future__ import annotations

from jaxlab.train import losses
from jaxlab.train.channels import common, offpolicy

DATA_FORMATS = ("prompt_completion",)
NEEDS_TEACHER = True
DEFAULT_KL = "reverse"
USES_TOPK_CACHE = False  # its completions are rollouts, which no cache describes
SAMPLES = True
SETTINGS = ("estimator",)


def prepare(ctx, params, frozen, teacher, batch, rng):
  return common.rollout(ctx, params, frozen, batch, rng)


def loss_sum(ctx, params, frozen, teacher, batch):
  if ctx.estimator == "exact":
    return offpolicy.divergence_sum(ctx, params, frozen, teacher, batch), {}
  if ctx.estimator != "sampled":
    raise ValueError(f"config key distill.estimator={ctx.estimator!r}: expected 'exact' or "
                     "'sampled'")
  model, xs = common.student_hidden(ctx, params, frozen, batch)
  tmodel, xt = common.teacher_hidden(ctx, teacher, batch)

  def fn(x, y, tok, m):
    surrogate, estimate = losses.sampled_reverse_kl_surrogate(
        model.logits(x), tmodel.logits(y), tok, ctx.temperature)
    return {"surrogate": (surrogate * m).sum(), "kl_estimate": (estimate * m).sum()}
  out = common.chunked_sums(fn, ctx.loss_chunk, xs, xt, batch["completion"], batch["loss_mask"])
  return out["surrogate"], {"kl_estimate": out["kl_estimate"]}
