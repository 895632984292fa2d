"""Choosing the next token from logits: greedy, temperature, top-k and top-p (nucleus)."""
from __future__ import annotations

import jax
import jax.numpy as jnp

_NEG_INF = -jnp.inf


def processed_logits(logits_BxV: jax.Array, temperature: float, top_k: int = 0,
                     top_p: float = 1.0) -> jax.Array:
  """logits / T with tokens outside the top-k set and outside the top-p nucleus set to -inf.

  Top-k keeps the k largest (ties at the k-th value are kept); top-p keeps the
  smallest set of most likely tokens (after temperature and top-k) whose mass
  reaches p, always at least the most likely token. temperature must be > 0.
  """
  if temperature <= 0:
    raise ValueError(f"temperature must be > 0 here, got {temperature}")
  x = logits_BxV.astype(jnp.float32) / jnp.float32(temperature)
  v = x.shape[-1]
  if 0 < top_k < v:
    kth_Bx1 = jax.lax.top_k(x, top_k)[0][:, -1:]
    x = jnp.where(x < kth_Bx1, _NEG_INF, x)
  if top_p < 1.0:
    sorted_BxV = jnp.sort(x, axis=-1)[:, ::-1]
    p_BxV = jax.nn.softmax(sorted_BxV, axis=-1)
    before_BxV = jnp.cumsum(p_BxV, axis=-1) - p_BxV  # mass strictly before each sorted token
    keep_BxV = before_BxV < jnp.float32(top_p)
    n_keep_Bx1 = jnp.maximum(jnp.sum(keep_BxV, axis=-1, keepdims=True), 1)
    cut_Bx1 = jnp.take_along_axis(sorted_BxV, n_keep_Bx1 - 1, axis=-1)
    x = jnp.where(x < cut_Bx1, _NEG_INF, x)
  return x


def select(logits_BxV: jax.Array, keys_B: jax.Array, *, temperature: float, top_k: int = 0,
           top_p: float = 1.0) -> tuple[jax.Array, jax.Array, jax.Array]:
  """(token_B, model log-prob_B at temperature 1, log-prob_B under the processed distribution).

  temperature == 0 is greedy (argmax; processed log-prob 0). Each row draws
  with its own key, so a row's sample never depends on the other rows.
  """
  logp_BxV = jax.nn.log_softmax(logits_BxV.astype(jnp.float32), axis=-1)
  if temperature == 0:
    token_B = jnp.argmax(logits_BxV, axis=-1).astype(jnp.int32)
    sample_lp_B = jnp.zeros(token_B.shape, jnp.float32)
  else:
    x_BxV = processed_logits(logits_BxV, temperature, top_k, top_p)
    token_B = jax.vmap(jax.random.categorical)(keys_B, x_BxV).astype(jnp.int32)
    plp_BxV = jax.nn.log_softmax(x_BxV, axis=-1)
    sample_lp_B = jnp.take_along_axis(plp_BxV, token_B[:, None], axis=-1)[:, 0]
  model_lp_B = jnp.take_along_axis(logp_BxV, token_B[:, None], axis=-1)[:, 0]
  return token_B, model_lp_B, sample_lp_B
