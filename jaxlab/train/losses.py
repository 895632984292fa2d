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


# ---------------------------------------------------------------------------------------------
# Divergences between teacher and student token distributions (the distillation channels).
#
# All take logits [..., V] and return one value per position [...], in float32; the temperature
# divides both sides' logits first (no T^2 factor, as in TRL's GKD loss). Conventions, written out
# because swapping them is the classic distillation bug:
#   forward KL(p_T || p_S) = sum_v p_T (log p_T - log p_S)   (mode covering; offpolicy)
#   reverse KL(p_S || p_T) = sum_v p_S (log p_S - log p_T)   (mode seeking; onpolicy)
#   generalized JSD (TRL): M = beta p_T + (1-beta) p_S,
#                          beta KL(p_T || M) + (1-beta) KL(p_S || M); beta=0 is forward KL,
#                          beta=1 reverse KL (exactly, not the limit of the mixture formula).
# ---------------------------------------------------------------------------------------------
DIVERGENCES = ("forward", "reverse", "jsd")


def _log_softmax(logits: jax.Array, temperature: float) -> jax.Array:
  return jax.nn.log_softmax(logits.astype(jnp.float32) / jnp.float32(temperature), axis=-1)


def _kl(logp: jax.Array, logq: jax.Array) -> jax.Array:
  """KL(p || q) over the last axis from log-probs; 0 log 0 = 0."""
  p = jnp.exp(logp)
  return jnp.sum(jnp.where(p > 0, p * (logp - logq), 0.0), axis=-1)


def forward_kl(student_logits, teacher_logits, temperature: float = 1.0) -> jax.Array:
  """KL(p_T || p_S) per position."""
  return _kl(_log_softmax(teacher_logits, temperature), _log_softmax(student_logits, temperature))


def reverse_kl(student_logits, teacher_logits, temperature: float = 1.0) -> jax.Array:
  """KL(p_S || p_T) per position."""
  return _kl(_log_softmax(student_logits, temperature), _log_softmax(teacher_logits, temperature))


def generalized_jsd(student_logits, teacher_logits, beta: float,
                    temperature: float = 1.0) -> jax.Array:
  """TRL's generalized JSD per position (beta=0 forward KL, beta=1 reverse KL)."""
  if not 0.0 <= beta <= 1.0:
    raise ValueError(f"config key distill.beta={beta}: must be in [0, 1]")
  if beta == 0.0:
    return forward_kl(student_logits, teacher_logits, temperature)
  if beta == 1.0:
    return reverse_kl(student_logits, teacher_logits, temperature)
  ls = _log_softmax(student_logits, temperature)
  lt = _log_softmax(teacher_logits, temperature)
  lm = jnp.logaddexp(lt + jnp.log(beta), ls + jnp.log1p(-beta))
  return beta * _kl(lt, lm) + (1.0 - beta) * _kl(ls, lm)


def divergence(kind: str, student_logits, teacher_logits, *, beta: float = 0.5,
               temperature: float = 1.0) -> jax.Array:
  """`kind` in DIVERGENCES, per position."""
  if kind == "forward":
    return forward_kl(student_logits, teacher_logits, temperature)
  if kind == "reverse":
    return reverse_kl(student_logits, teacher_logits, temperature)
  if kind == "jsd":
    return generalized_jsd(student_logits, teacher_logits, beta, temperature)
  raise ValueError(f"config key distill.kl={kind!r}: expected one of {DIVERGENCES}")


def topk_forward_kl(student_logits, topk_ids, topk_logp, temperature: float = 1.0) -> jax.Array:
  """KL(p_T || p_S) from the teacher's top-k log-probs plus one tail bucket, per position.

  The teacher's distribution is coarsened to k+1 outcomes: its top-k tokens and "anything else"
  (mass 1 - sum of the top-k); the student's is coarsened the same way. This is the exact KL
  between the coarsened distributions: a lower bound of the full KL (data processing) that grows
  with k and equals it when the top-k covers the vocabulary. topk_logp must be the teacher's
  log-probs at the same temperature; a position whose entries are all -inf (a row the cache
  never scored) gives 0, never a loss against an empty target.

  The student's tail is a logsumexp over the ids outside the top-k, not 1 - sum(top-k probs):
  in float32 that difference cancels to 0 once the tail is below ~1e-7, flattening the loss
  and cutting the gradient that should push mass back into the tail.
  """
  ls = _log_softmax(student_logits, temperature)
  ls_k = jnp.take_along_axis(ls, topk_ids, axis=-1)
  lt_k = topk_logp.astype(jnp.float32)
  known = lt_k > -jnp.inf
  head = jnp.sum(jnp.where(known, jnp.exp(lt_k) * (lt_k - ls_k), 0.0), axis=-1)
  in_top = jnp.put_along_axis(jnp.zeros(ls.shape, bool), topk_ids, True, axis=-1,
                              inplace=False)
  # (A top-k that covers the vocabulary leaves no tail: the logsumexp then runs over zeros
  # instead of all -inf, whose gradient would be NaN even where the result is unused.)
  all_top = jnp.all(in_top, axis=-1, keepdims=True)
  log_tail_s = jax.nn.logsumexp(jnp.where(all_top, 0.0, jnp.where(in_top, -jnp.inf, ls)), axis=-1)
  tail_t = jnp.clip(1.0 - jnp.sum(jnp.where(known, jnp.exp(lt_k), 0.0), axis=-1), 0.0, 1.0)
  # Below float32's resolution of 1 - sum(top-k) the teacher's tail is indistinguishable from 0.
  has_tail = (tail_t > 1e-6) & ~all_top[..., 0]
  tail = jnp.where(has_tail, tail_t * (jnp.log(jnp.where(has_tail, tail_t, 1.0))
                                       - jnp.where(has_tail, log_tail_s, 0.0)), 0.0)
  return jnp.where(jnp.any(known, axis=-1), head + tail, 0.0)


def sampled_reverse_kl_surrogate(student_logits, teacher_logits, tokens,
                                 temperature: float = 1.0) -> tuple[jax.Array, jax.Array]:
  """(surrogate, estimate) per position for the sampled-token reverse-KL estimator.

  estimate_t = log p_S(y_t) - log p_T(y_t) at the student's own sample y_t: an unbiased
  per-token estimate of KL(p_S || p_T). Used as a negative advantage in a policy-gradient
  loss (Thinking Machines' on-policy distillation): surrogate_t = stop_grad(estimate_t) *
  log p_S(y_t), whose expected gradient over y_t ~ p_S is the gradient of the exact reverse KL
  at that position (E[grad log p_S] = 0 removes the other term).
  """
  ls = jnp.take_along_axis(_log_softmax(student_logits, temperature), tokens[..., None], -1)[..., 0]
  lt = jnp.take_along_axis(_log_softmax(teacher_logits, temperature), tokens[..., None], -1)[..., 0]
  estimate = ls - lt
  return jax.lax.stop_gradient(estimate) * ls, estimate
