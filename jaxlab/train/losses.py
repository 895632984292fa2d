"""Token losses as sums over trained tokens (normalised by the caller over the global batch)."""
from __future__ import annotations

import jax
import jax.numpy as jnp


def token_nll(logits_BxLxV: jax.Array, targets_BxL: jax.Array) -> jax.Array:
  """-log p(target) per position, in float32."""
  logp = jax.nn.log_softmax(logits_BxLxV.astype(jnp.float32), axis=-1)
  return -jnp.take_along_axis(logp, targets_BxL[..., None], axis=-1)[..., 0]


def masked_nll_sum(logits_BxLxV: jax.Array, targets_BxL: jax.Array,
                   mask_BxL: jax.Array) -> jax.Array:
  """Sum of -log p(target) over positions where mask is 1."""
  return jnp.sum(token_nll(logits_BxLxV, targets_BxL) * mask_BxL)
