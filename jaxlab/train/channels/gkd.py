"""gkd (Agarwal et al. 2024): with probability lambda (config distill.lmbda) a batch's completions
are the student's own samples, else the dataset's; the divergence is the generalized JSD with
beta in TRL's convention (beta=0 forward KL, beta=1 reverse KL). The coin is drawn per
micro-batch from the step's RNG, inside the jitted step (`lax.cond`: one program, no
recompilation)."""
from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxlab.train.channels import common, offpolicy

DATA_FORMATS = ("prompt_completion",)
NEEDS_TEACHER = True
DEFAULT_KL = "jsd"
USES_TOPK_CACHE = False  # a share of its batches are rollouts
SAMPLES = True
SETTINGS = ("lmbda",)


def prepare(ctx, params, frozen, teacher, batch, rng):
  coin, sample_rng = jax.random.split(rng)
  on = jax.random.bernoulli(coin, ctx.lmbda)
  def sampled(_):
    return common.rollout(ctx, params, frozen, batch, sample_rng)
  def dataset(_):
    c = batch["completion"].shape[1]
    n = jnp.sum(batch["loss_mask"], axis=1)
    return batch, {"sample_len": jnp.mean(n), "sample_hit_limit": jnp.mean((n >= c) * 1.0)}
  batch, metrics = jax.lax.cond(on, sampled, dataset, None)
  return batch, {**metrics, "onpolicy_share": on.astype(jnp.float32)}


def loss_sum(ctx, params, frozen, teacher, batch):
  return offpolicy.divergence_sum(ctx, params, frozen, teacher, batch), {}
