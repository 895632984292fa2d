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


def draw(keys_B: jax.Array, x_BxV: jax.Array, block: int = 128) -> jax.Array:
  """One token per row from softmax(x) by inverse CDF: one uniform per row, not one per token.

  u is drawn in (0, total], and the token is the first whose cumulative
  probability reaches u, so a token of probability 0 (outside top-k/top-p) is
  never drawn. Per row this needs one random number instead of V Gumbel noises,
  which is what makes sampling cheap next to a small model's forward. The
  cumulative sum is two-level (over blocks of `block` tokens, then inside the one
  block u falls in): a full cumulative sum over V costs more on CPU than the rest
  of the draw. Sums are float32 (off from float64 by < 2e-7 of mass at V = 152k).
  """
  b, v = x_BxV.shape
  x = x_BxV.astype(jnp.float32)
  e_BxV = jnp.exp(x - jnp.max(x, axis=-1, keepdims=True))  # unnormalised; 0 where x = -inf
  n = -(-v // block)
  e_BxNxC = jnp.pad(e_BxV, ((0, 0), (0, n * block - v))).reshape(b, n, block)
  cdf_BxN = jnp.cumsum(jnp.sum(e_BxNxC, axis=-1), axis=-1)
  u_B = 1.0 - jax.vmap(lambda k: jax.random.uniform(k, (), jnp.float32))(keys_B)  # (0, 1]
  u_Bx1 = (u_B * cdf_BxN[:, -1])[:, None]
  blk_B = jnp.minimum(jnp.sum(cdf_BxN < u_Bx1, axis=-1, dtype=jnp.int32), n - 1)
  before_B = jnp.where(blk_B > 0, jnp.take_along_axis(cdf_BxN, jnp.maximum(blk_B - 1, 0)[:, None],
                                                      axis=-1)[:, 0], 0.0)
  cdf_BxC = jnp.cumsum(jnp.take_along_axis(e_BxNxC, blk_B[:, None, None], axis=1)[:, 0], axis=-1)
  # u - before > 0 is the mass still to cover inside the block (at most the block's own sum, so
  # rounding between the two levels can never step past the block's last nonzero token).
  rest_Bx1 = jnp.minimum(u_Bx1[:, 0] - before_B, cdf_BxC[:, -1])[:, None]
  token_B = blk_B * block + jnp.sum(cdf_BxC < rest_Bx1, axis=-1, dtype=jnp.int32)
  return jnp.minimum(token_B, v - 1)


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
