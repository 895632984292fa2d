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


def draw(keys_B: jax.Array, x_BxV: jax.Array) -> jax.Array:
  """One token per row from softmax(x) by inverse CDF: one uniform per row, not one per token.

  u is drawn in (0, total], and the token is the first whose cumulative
  probability reaches u, so a token of probability 0 (outside top-k/top-p) is
  never drawn. Per row this needs one random number instead of V Gumbel noises,
  which is what makes sampling cheap next to a small model's forward. The float32
  cumulative sum is off from float64 by < 2e-7 of mass at V = 152k, so no token's
  probability moves by more than that.
  """
  p_BxV = jax.nn.softmax(x_BxV.astype(jnp.float32), axis=-1)
  cdf_BxV = jnp.cumsum(p_BxV, axis=-1)
  u_B = 1.0 - jax.vmap(lambda k: jax.random.uniform(k, (), jnp.float32))(keys_B)  # (0, 1]
  u_Bx1 = (u_B * cdf_BxV[:, -1])[:, None]
  token_B = jnp.sum(cdf_BxV < u_Bx1, axis=-1, dtype=jnp.int32)
  return jnp.minimum(token_B, x_BxV.shape[-1] - 1)


def _logprob_at(x_BxV: jax.Array, token_B: jax.Array) -> jax.Array:
  x = x_BxV.astype(jnp.float32)
  return (jnp.take_along_axis(x, token_B[:, None], axis=-1)[:, 0]
          - jax.nn.logsumexp(x, axis=-1))


def select(logits_BxV: jax.Array, keys_B: jax.Array, *, temperature: float, top_k: int = 0,
           top_p: float = 1.0) -> tuple[jax.Array, jax.Array, jax.Array]:
  """(token_B, model log-prob_B at temperature 1, log-prob_B under the processed distribution).

  temperature == 0 is greedy (argmax; processed log-prob 0). Each row draws
  with its own key, so a row's sample never depends on the other rows.
  """
  if temperature == 0:
    token_B = jnp.argmax(logits_BxV, axis=-1).astype(jnp.int32)
    sample_lp_B = jnp.zeros(token_B.shape, jnp.float32)
  else:
    x_BxV = processed_logits(logits_BxV, temperature, top_k, top_p)
    token_B = draw(keys_B, x_BxV)
    sample_lp_B = _logprob_at(x_BxV, token_B)
  return token_B, _logprob_at(logits_BxV, token_B), sample_lp_B
