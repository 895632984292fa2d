"""Token losses as sums over trained tokens (normalised by the caller over the global batch)."""
from __future__ import annotations

import jax
import jax.numpy as jnp


def token_nll(logits_BxLxV: jax.Array, targets_BxL: jax.Array) -> jax.Array:
  """-log p(target) per position, in float32: logsumexp(logits) - logits[target].

  (The same value as -log_softmax(logits)[target] without materialising log_softmax.)"""
  logits = logits_BxLxV.astype(jnp.float32)
  target_logit = jnp.take_along_axis(logits, targets_BxL[..., None], axis=-1)[..., 0]
  return jax.nn.logsumexp(logits, axis=-1) - target_logit


def masked_nll_sum(logits_BxLxV: jax.Array, targets_BxL: jax.Array,
                   mask_BxL: jax.Array) -> jax.Array:
  """Sum of -log p(target) over positions where mask is 1."""
  return jnp.sum(token_nll(logits_BxLxV, targets_BxL) * mask_BxL)
