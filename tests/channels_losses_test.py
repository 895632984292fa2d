"""Distillation divergences against independent NumPy formulas, TRL's GKD loss and finite
differences; top-k + tail KL; the sampled reverse-KL estimator's expected gradient."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from jaxlab.train import losses

jax.config.update("jax_enable_x64", False)


def _np_logsoftmax(x):
  x = x.astype(np.float64)
  m = x.max(-1, keepdims=True)
  return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


def np_divergence(kind, s, t, beta=0.5, temp=1.0):
  """Written from the definitions: sum_v p (log p - log q), M = beta p_T + (1 - beta) p_S."""
  ls, lt = _np_logsoftmax(s / temp), _np_logsoftmax(t / temp)
  ps, pt = np.exp(ls), np.exp(lt)
  if kind == "forward":
    return (pt * (lt - ls)).sum(-1)
  if kind == "reverse":
    return (ps * (ls - lt)).sum(-1)
  m = beta * pt + (1 - beta) * ps
  return beta * (pt * (lt - np.log(m))).sum(-1) + (1 - beta) * (ps * (ls - np.log(m))).sum(-1)


def _logits(seed, shape=(3, 5, 11), scale=3.0):
  rng = np.random.default_rng(seed)
  return (rng.normal(size=shape) * scale).astype(np.float32)


CASES = [("forward", 0.0), ("reverse", 1.0), ("jsd", 0.25), ("jsd", 0.5), ("jsd", 0.75)]


@pytest.mark.parametrize("kind,beta", CASES)
@pytest.mark.parametrize("temp", [1.0, 2.0])
def test_divergence_matches_numpy_with_mask(kind, beta, temp):
  s, t = _logits(0), _logits(1)
  mask = (np.random.default_rng(2).random(s.shape[:2]) < 0.6).astype(np.float32)
  got = losses.divergence(kind, s, t, beta=beta, temperature=temp)
  want = np_divergence(kind, s, t, beta, temp)
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(float(jnp.sum(got * mask)), float((want * mask).sum()), rtol=1e-5)


def test_directions_are_not_swapped():
  # A peaked teacher, a flat student: forward and reverse KL differ, each matching its formula.
  s = np.zeros((1, 1, 4), np.float32)
  t = np.array([[[5.0, 0.0, 0.0, 0.0]]], np.float32)
  fwd = float(losses.forward_kl(s, t)[0, 0])
  rev = float(losses.reverse_kl(s, t)[0, 0])
  assert abs(fwd - rev) > 0.1
  pt = np.exp(_np_logsoftmax(t[0, 0]))
  assert fwd == pytest.approx((pt * (np.log(pt) - np.log(0.25))).sum(), rel=1e-5)


@pytest.mark.parametrize("beta", [0.0, 0.25, 0.5, 0.75, 1.0])
@pytest.mark.parametrize("temp", [1.0, 0.7])
def test_generalized_jsd_matches_trl(beta, temp):
  from trl.experimental.gkd.gkd_trainer import GKDTrainer
  s, t = _logits(3, (2, 6, 13)), _logits(4, (2, 6, 13))
  labels = np.random.default_rng(5).integers(0, 13, (2, 6))
  labels[0, :2] = -100
  labels[1, 4:] = -100
  mask = (labels != -100).astype(np.float32)
  want = GKDTrainer.generalized_jsd_loss(torch.tensor(s), torch.tensor(t),
                                         labels=torch.tensor(labels), beta=beta,
                                         temperature=temp).item()
  per_pos = losses.generalized_jsd(s, t, beta, temp)
  got = float(jnp.sum(per_pos * mask) / mask.sum())
  assert got == pytest.approx(want, rel=1e-5, abs=1e-7)


@pytest.mark.parametrize("kind,beta", CASES)
def test_gradients_match_finite_differences(kind, beta):
  s, t = _logits(6, (2, 7), 2.0), _logits(7, (2, 7), 2.0)
  mask = np.array([1.0, 0.0], np.float32)
  f = lambda x: jnp.sum(losses.divergence(kind, x, t, beta=beta, temperature=1.5) * mask)
  g = np.asarray(jax.grad(f)(jnp.asarray(s)))
  num = np.zeros_like(s, np.float64)
  eps = 1e-3
  for idx in np.ndindex(s.shape):
    e = np.zeros_like(s)
    e[idx] = eps
    fp = (np_divergence(kind, s + e, t, beta, 1.5) * mask).sum()
    fm = (np_divergence(kind, s - e, t, beta, 1.5) * mask).sum()
    num[idx] = (fp - fm) / (2 * eps)
  np.testing.assert_allclose(g, num, atol=2e-4)
  assert np.abs(g[1]).max() == 0.0  # masked row gets no gradient
  assert np.abs(g[0]).max() > 1e-3


def test_topk_tail_kl_approaches_full_kl_and_equals_it_at_full_vocab():
  v = 64
  s, t = _logits(8, (4, v), 2.0), _logits(9, (4, v), 2.0)
  full = np_divergence("forward", s, t)
  lt = np.asarray(jax.nn.log_softmax(jnp.asarray(t), -1))
  gaps = []
  for k in (1, 4, 16, 48, v):
    vals, ids = jax.lax.top_k(jnp.asarray(lt), k)
    got = np.asarray(losses.topk_forward_kl(s, ids, vals))
    assert np.all(got <= full + 1e-5)  # a coarsening never increases the KL
    gaps.append(float(np.abs(full - got).max()))
  assert all(a >= b - 1e-6 for a, b in zip(gaps, gaps[1:])), gaps
  assert gaps[0] > 0.05 and gaps[-1] < 1e-5, gaps


def test_sampled_estimator_expected_gradient_matches_exact_reverse_kl():
  v, n = 6, 200_000
  s = _logits(10, (v,), 1.0)
  t = _logits(11, (v,), 1.0)
  exact = np.asarray(jax.grad(lambda x: losses.reverse_kl(x, t))(jnp.asarray(s)))
  ps = np.exp(_np_logsoftmax(s))
  tokens = np.random.default_rng(12).choice(v, size=n, p=ps / ps.sum())
  def surrogate_mean(x):
    xs = jnp.broadcast_to(x, (n, v))
    sur, _ = losses.sampled_reverse_kl_surrogate(xs, jnp.broadcast_to(t, (n, v)),
                                                 jnp.asarray(tokens))
    return jnp.mean(sur)
  est = np.asarray(jax.grad(surrogate_mean)(jnp.asarray(s)))
  # Monte-Carlo error ~ std/sqrt(n): per-sample gradients here are O(1), so 1/sqrt(2e5) ~ 2e-3.
  np.testing.assert_allclose(est, exact, atol=1e-2)
  assert np.abs(exact).max() > 0.05
  _, estimate = losses.sampled_reverse_kl_surrogate(jnp.broadcast_to(s, (n, v)),
                                                    jnp.broadcast_to(t, (n, v)),
                                                    jnp.asarray(tokens))
  assert float(jnp.mean(estimate)) == pytest.approx(np_divergence("reverse", s, t), abs=1e-2)


def _student_with_tail(teacher_logits, k, tail, seed):
  """Student logits (float32) whose mass outside the teacher's top-k is `tail` (in float64)."""
  rng = np.random.default_rng(seed)
  s = rng.normal(size=teacher_logits.shape) * 2.0
  top = np.argsort(-teacher_logits, axis=-1)[..., :k]
  inside = np.zeros(s.shape, bool)
  np.put_along_axis(inside, top, True, axis=-1)
  a = np.where(inside, np.exp(s), 0.0).sum(-1, keepdims=True)
  b = np.where(inside, 0.0, np.exp(s)).sum(-1, keepdims=True)
  shift = np.log(tail * a / ((1.0 - tail) * b))
  return np.where(inside, s, s + shift).astype(np.float32), top


@pytest.mark.parametrize("tail", [0.5, 1e-7, 1e-12])
def test_topk_tail_kl_loss_and_gradient_match_float64_for_tiny_student_tails(tail):
  # Vocabulary 1000, k = 20, a teacher whose tail holds ~0.28 of its mass (the case):
  # the student's tail must come from its own logits, not from 1 - sum(top-k) in float32.
  v, k = 1000, 20
  rng = np.random.default_rng(0)
  t = np.concatenate([rng.normal(size=(3, k)) + 6.0, rng.normal(size=(3, v - k))], -1)
  t = t.astype(np.float32)
  lt = _np_logsoftmax(t)
  s, top = _student_with_tail(t, k, tail, seed=1)
  lt_k = np.take_along_axis(lt, top, -1)
  tail_t = 1.0 - np.exp(lt_k).sum(-1)
  assert 0.05 < tail_t.min() and tail_t.max() < 0.6

  def ref(s64):  # float64 torch, from the definition of the coarsened KL
    ls = torch.log_softmax(s64, -1)
    ls_k = torch.gather(ls, -1, torch.as_tensor(top))
    inside = torch.zeros_like(ls, dtype=torch.bool).scatter_(-1, torch.as_tensor(top), True)
    log_tail_s = torch.logsumexp(ls.masked_fill(inside, -np.inf), -1)
    lt_k64, tt = torch.as_tensor(lt_k), torch.as_tensor(tail_t)
    return (lt_k64.exp() * (lt_k64 - ls_k)).sum(-1) + tt * (tt.log() - log_tail_s)

  s64 = torch.tensor(s.astype(np.float64), requires_grad=True)
  want = ref(s64)
  want.sum().backward()
  fn = lambda x: losses.topk_forward_kl(x, jnp.asarray(top, jnp.int32),
                                        jnp.asarray(lt_k, jnp.float32))
  got = np.asarray(fn(jnp.asarray(s)))
  grad = np.asarray(jax.grad(lambda x: fn(x).sum())(jnp.asarray(s)))
  np.testing.assert_allclose(got, want.detach().numpy(), rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(grad, s64.grad.numpy(), atol=1e-5)
  # The gradient mass on the tail ids is tail_s - tail_t: about -0.28 however small tail_s is.
  outside = np.ones(s.shape, bool)
  np.put_along_axis(outside, top, False, axis=-1)
  np.testing.assert_allclose(np.where(outside, grad, 0).sum(-1), tail - tail_t, atol=1e-4)


def test_topk_kl_of_an_unscored_position_is_zero_with_finite_gradient():
  s = _logits(13, (2, 16), 2.0)
  ids = jnp.zeros((2, 4), jnp.int32)
  logp = jnp.full((2, 4), -jnp.inf)
  fn = lambda x: losses.topk_forward_kl(x, ids, logp).sum()
  assert float(fn(jnp.asarray(s))) == 0.0
  assert np.all(np.asarray(jax.grad(fn)(jnp.asarray(s))) == 0.0)
