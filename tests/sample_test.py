"""Sampler: cache vs full forward, padding, distributions, stops, buckets, determinism."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlab import sharding
from jaxlab.models import ModelConfig
from jaxlab.models.params import init_params, model_spec, stack_layers
from jaxlab.sample import Sampler, bucket_length, sample
from jaxlab.sample import sampler as sampler_lib
from jaxlab.sample.sampler import decode_segments
from jaxlab.sample.sampling import draw, processed_logits

CFG = ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64,
                  qkv_bias=True, qk_norm=True)
PROMPTS = [[5, 9, 11, 3, 7], [12, 2], [30, 31, 32, 33, 34, 35, 36, 37, 38], [40]]
# Tiny models compile in half the time without LLVM's expensive passes (tests only).
FAST = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


@pytest.fixture(scope="module")
def setup():
  spec = model_spec(CFG)
  mesh = sharding.make_mesh((1, 1, 1), jax.devices()[:1])
  trainable, frozen = init_params(spec, mesh, seed=0)
  return spec, mesh, trainable, frozen


@pytest.fixture(scope="module")
def scanned(setup):
  """The same model with its layers stacked under lax.scan (stacked KV cache)."""
  _, mesh, trainable, frozen = setup
  spec = model_spec(CFG.replace(scan_layers=True))
  return spec, mesh, stack_layers(trainable, spec.cfg), stack_layers(frozen, spec.cfg)


@pytest.fixture(scope="module")
def peaked(setup):
  """The same model with logits scaled up, so its next-token distributions are far from uniform."""
  spec, mesh, trainable, frozen = setup
  trainable = dict(trainable, lm_head=trainable["lm_head"] * 60.0)
  return spec, mesh, trainable, frozen


def pad(prompts, p, padding):
  tok = np.zeros((len(prompts), p), np.int32)
  for i, x in enumerate(prompts):
    if padding == "left":
      tok[i, p - len(x):] = x
    else:
      tok[i, :len(x)] = x
  return tok, np.asarray([len(x) for x in prompts], np.int32)


_JITTED = {}


def _jitted(spec, padding, kw):
  key = (padding, tuple(sorted(kw.items())))
  if key not in _JITTED:
    _JITTED[key] = jax.jit(
        lambda tr, fr, t, n, k, rows: sample(spec, tr, fr, t, n, k, padding=padding,
                                             row_ids_B=rows, **kw), compiler_options=FAST)
  return _JITTED[key]


def run(setup, prompts, p=12, padding="left", seed=0, row_ids=None, **kw):
  spec, _, trainable, frozen = setup
  tok, lengths = pad(prompts, p, padding)
  rows = np.arange(len(prompts), dtype=np.int32) if row_ids is None else np.asarray(row_ids)
  fn = _jitted(spec, padding, kw)
  return jax.device_get(fn(trainable, frozen, tok, lengths, jax.random.key(seed), rows))


def full_logits(setup, seq, length=32):
  """Logits of the full forward without cache (right-padded to a fixed length: causal)."""
  spec, _, trainable, frozen = setup
  tok = np.zeros((1, length), np.int32)
  tok[0, :len(seq)] = seq
  fn = jax.jit(lambda tr, fr, t: spec.merge(tr, fr)(t)[0], compiler_options=FAST)
  key = ("full", id(trainable))
  if key not in _JITTED:
    _JITTED[key] = fn
  return np.asarray(_JITTED[key](trainable, frozen, tok))[:len(seq)]


@pytest.mark.parametrize("padding", ["left", "right"])
def test_greedy_equals_stepwise_argmax_of_full_forward(setup, padding):
  out = run(setup, PROMPTS, padding=padding, max_new_tokens=6, temperature=0.0)
  assert out.tokens.shape == (4, 6) and (out.lengths == 6).all()
  for i, prompt in enumerate(PROMPTS):
    seq = list(prompt)
    for t in range(6):
      logits = full_logits(setup, seq)[-1]
      assert out.tokens[i, t] == int(np.argmax(logits)), (i, t)
      logp = logits - np.logaddexp.reduce(logits)
      np.testing.assert_allclose(out.logprobs[i, t], logp[out.tokens[i, t]], atol=2e-5)
      seq.append(int(out.tokens[i, t]))
  np.testing.assert_array_equal(out.sample_logprobs, 0.0)


def test_greedy_row_independent_of_other_rows(setup):
  batch = run(setup, PROMPTS, max_new_tokens=8, temperature=0.0)
  for i, prompt in enumerate(PROMPTS):
    alone = run(setup, [prompt], max_new_tokens=8, temperature=0.0)
    np.testing.assert_array_equal(alone.tokens[0], batch.tokens[i])
    np.testing.assert_allclose(alone.logprobs[0], batch.logprobs[i], atol=2e-5)


def test_sampled_row_independent_of_batch_and_padding(setup):
  """Per-row RNG streams: a row's sample does not depend on the batch or on the padding side."""
  ids = np.asarray([7, 8, 9, 10], np.int32)
  full = run(setup, PROMPTS, p=12, padding="left", seed=3, row_ids=ids, max_new_tokens=6)
  part = run(setup, PROMPTS[2:0:-1], p=16, padding="right", seed=3, row_ids=ids[2:0:-1],
             max_new_tokens=6)
  np.testing.assert_array_equal(part.tokens, full.tokens[2:0:-1])


def _chi2_critical(df: int, z: float = 3.09) -> float:
  """Upper 0.1% point of chi-square(df) by the Wilson-Hilferty approximation."""
  return df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3


def _chi2(counts, probs):
  n = counts.sum()
  expected = n * probs
  big = expected >= 5
  obs = np.append(counts[big], counts[~big].sum())
  exp = np.append(expected[big], expected[~big].sum())
  keep = exp > 0
  return float(((obs[keep] - exp[keep]) ** 2 / exp[keep]).sum()), int(keep.sum() - 1)


@pytest.mark.parametrize("temperature", [0.7, 1.5])
def test_temperature_sampling_goodness_of_fit(peaked, temperature):
  n = 4000
  out = run(peaked, [PROMPTS[0]] * n, p=8, max_new_tokens=1, temperature=temperature)
  logits = full_logits(peaked, PROMPTS[0])[-1].astype(np.float64)
  counts = np.bincount(out.tokens[:, 0], minlength=CFG.vocab_size)
  probs = np.exp(logits / temperature - np.logaddexp.reduce(logits / temperature))
  stat, df = _chi2(counts, probs)
  assert stat < _chi2_critical(df), (stat, df)
  wrong = np.exp(logits - np.logaddexp.reduce(logits))  # the temperature-1 distribution
  stat_wrong, df_wrong = _chi2(counts, wrong)
  assert stat_wrong > _chi2_critical(df_wrong), "test has no power to tell temperatures apart"
  # Returned log-probs are the model's at temperature 1; sample_logprobs the tempered ones.
  np.testing.assert_allclose(out.logprobs[:, 0], np.log(wrong[out.tokens[:, 0]]), atol=1e-4)
  np.testing.assert_allclose(out.sample_logprobs[:, 0], np.log(probs[out.tokens[:, 0]]), atol=1e-4)


@pytest.mark.parametrize("kw", [dict(top_k=3), dict(top_p=0.6), dict(top_k=5, top_p=0.8)])
def test_top_k_top_p_stay_in_their_set(peaked, kw):
  temperature = 1.3
  prompts = [PROMPTS[i % 4] for i in range(48)]
  out = run(peaked, prompts, max_new_tokens=5, temperature=temperature, **kw)
  for i, prompt in enumerate(prompts):
    logits = full_logits(peaked, list(prompt) + out.tokens[i].tolist())
    allowed = np.asarray(processed_logits(jnp.asarray(logits[len(prompt) - 1:-1]), temperature,
                                          kw.get("top_k", 0), kw.get("top_p", 1.0)))
    for t in range(5):
      x = logits[len(prompt) - 1 + t] / temperature
      order = np.argsort(-x)
      rank = int(np.where(order == out.tokens[i, t])[0][0])
      if "top_k" in kw:
        assert rank < kw["top_k"]
      if "top_p" in kw:
        p = np.exp(x - np.logaddexp.reduce(x))[order]
        assert p[:rank].sum() < kw["top_p"] + 1e-6  # mass before it is below p
      assert np.isfinite(allowed[t, out.tokens[i, t]])


def test_two_level_draw_frequencies_and_zero_probability_tokens():
  """draw's block-then-token inverse CDF over several blocks (V not a multiple of the block)."""
  v, n = 50, 20000
  x = (2.0 * np.random.default_rng(0).normal(size=v)).astype(np.float32)
  x[::7] = -np.inf
  keys = jax.random.split(jax.random.key(0), n)
  x_NxV = jnp.tile(jnp.asarray(x), (n, 1))
  tok = np.asarray(jax.jit(lambda k, x: draw(k, x, block=8))(keys, x_NxV))
  counts = np.bincount(tok, minlength=v)
  assert tok.max() < v and counts[::7].sum() == 0
  probs = np.exp(x - x.max()) / np.exp(x - x.max()).sum()
  chi2, df = _chi2(counts, probs)
  assert chi2 < _chi2_critical(df), (chi2, df)
  one_block = np.asarray(jax.jit(lambda k, x: draw(k, x, block=64))(keys, x_NxV))
  assert np.mean(one_block == tok) > 0.999  # the same inverse CDF up to float rounding


def test_processed_logits_top_p_by_hand():
  logits = jnp.log(jnp.asarray([[0.5, 0.3, 0.15, 0.05]]))
  keep = lambda p: np.isfinite(np.asarray(processed_logits(logits, 1.0, 0, p)))[0].tolist()
  assert keep(0.5) == [True, False, False, False]
  assert keep(0.6) == [True, True, False, False]
  assert keep(0.81) == [True, True, True, False]
  assert keep(0.01) == [True, False, False, False]
  topk = np.isfinite(np.asarray(processed_logits(logits, 1.0, 2, 1.0)))[0].tolist()
  assert topk == [True, True, False, False]


def test_stop_ids_end_rows_and_max_new_tokens_holds(setup):
  free = run(setup, PROMPTS, max_new_tokens=10, temperature=0.0)
  stop_a, stop_b = int(free.tokens[0, 3]), int(free.tokens[2, 1])
  out = run(setup, PROMPTS, max_new_tokens=10, temperature=0.0, stop_ids=(stop_a, stop_b),
            pad_id=63)
  for i in range(4):
    row = free.tokens[i].tolist()
    hits = [t for t, tok in enumerate(row) if tok in (stop_a, stop_b)]
    n = hits[0] + 1 if hits else 10
    assert out.lengths[i] == n and out.stopped[i] == bool(hits)
    np.testing.assert_array_equal(out.tokens[i, :n], row[:n])
    assert (out.tokens[i, n:] == 63).all() and (out.logprobs[i, n:] == 0).all()
  # Sampled rows: nothing after the first stop id, and never more than max_new_tokens.
  out = run(setup, PROMPTS * 8, max_new_tokens=7, temperature=1.0, stop_ids=(1, 2, 3, 4, 5),
            pad_id=0)
  assert out.tokens.shape == (32, 7) and (out.lengths <= 7).all()
  for i in range(32):
    n = int(out.lengths[i])
    first = next((t for t in range(7) if out.tokens[i, t] in (1, 2, 3, 4, 5)), None)
    assert n == (first + 1 if first is not None else 7)
    assert (out.tokens[i, n:] == 0).all()


def test_deterministic_for_seed(setup):
  a = run(setup, PROMPTS, max_new_tokens=6, seed=1)
  b = run(setup, PROMPTS, max_new_tokens=6, seed=1)
  c = run(setup, PROMPTS, max_new_tokens=6, seed=2)
  np.testing.assert_array_equal(a.tokens, b.tokens)
  assert (a.tokens != c.tokens).any()


def test_usable_inside_outer_jit_with_grad(setup):
  """On-policy use: sample inside a jitted step, then differentiate a loss on the samples."""
  spec, _, trainable, frozen = setup
  tok, n = pad(PROMPTS, 12, "left")

  def step(tr, key):
    out = sample(spec, jax.lax.stop_gradient(tr), frozen, tok, n, key, max_new_tokens=4)
    seq = jnp.concatenate([jnp.asarray(tok), out.tokens], axis=1)
    logits = spec.merge(tr, frozen)(seq)
    lp = jax.nn.log_softmax(logits[:, 11:-1], axis=-1)
    return -jnp.take_along_axis(lp, out.tokens[..., None], axis=-1).mean()

  loss, grads = jax.jit(jax.value_and_grad(step), compiler_options=FAST)(trainable,
                                                                       jax.random.key(0))
  assert np.isfinite(float(loss))
  assert all(np.isfinite(np.asarray(g)).all() for g in jax.tree.leaves(grads))


def test_decode_segments_cover_the_steps():
  assert decode_segments(1) == [] and decode_segments(2) == [1]
  assert decode_segments(40) == [16, 32, 39]
  assert decode_segments(128) == [16, 32, 48, 64, 80, 96, 112, 127]
  for t in range(2, 600):
    ends = decode_segments(t)
    assert ends == sorted(set(ends)) and ends[-1] == t - 1 and len(ends) <= 8, (t, ends)


@pytest.mark.parametrize("layout", ["setup", "scanned"])
def test_segmented_decode_equals_one_segment(layout, request, monkeypatch):
  """Growing the cache between decode segments changes nothing: tokens, log-probs, stops."""
  spec, _, trainable, frozen = request.getfixturevalue(layout)
  tok, lengths = pad(PROMPTS * 2, 12, "right")
  rows = np.arange(8, dtype=np.int32)
  kw = dict(max_new_tokens=40, temperature=1.0, stop_ids=(1, 2), padding="right", row_ids_B=rows)
  run_once = lambda: jax.device_get(jax.jit(
      lambda tr, fr, t, n, k: sample(spec, tr, fr, t, n, k, **kw), compiler_options=FAST)(
          trainable, frozen, tok, lengths, jax.random.key(5)))
  segmented = run_once()
  monkeypatch.setattr(sampler_lib, "decode_segments", lambda t: [t - 1])
  one = run_once()
  assert len(decode_segments(40)) == 3
  # Some rows stop early, some run through segment boundaries or to the end.
  assert segmented.stopped.any() and (segmented.lengths > 33).any(), segmented.lengths
  np.testing.assert_array_equal(segmented.tokens, one.tokens)
  np.testing.assert_array_equal(segmented.lengths, one.lengths)
  np.testing.assert_array_equal(segmented.stopped, one.stopped)
  np.testing.assert_allclose(segmented.logprobs, one.logprobs, atol=1e-6)
  np.testing.assert_allclose(segmented.sample_logprobs, one.sample_logprobs, atol=1e-6)


def test_bucket_length():
  assert [bucket_length(n, (8, 16)) for n in (1, 8, 9, 16, 17, 33)] == [8, 8, 16, 16, 32, 48]


@pytest.mark.parametrize("pack", [False, True])
def test_sampler_compiles_once_per_bucket_and_keeps_order(setup, pack):
  """Padded: one compilation per bucket. Packed prefill: one per (bucket, packed row count),
  here 1 row of 8 for the batch of lengths 1,1,2,3 and 3 rows for both others; same tokens."""
  spec, mesh, trainable, frozen = setup
  s = Sampler(spec, trainable, frozen, mesh=mesh, batch_size=4, stop_ids=(), pad_id=0,
              buckets=(8, 16), compiler_options=FAST, pack_prefill=pack)
  rng = np.random.default_rng(0)
  prompts = [rng.integers(1, 64, rng.integers(1, 9)).tolist() for _ in range(11)]
  out = s.generate(prompts, seed=0, max_new_tokens=5, temperature=0.0)
  packed_rows = sorted(k[-1] for k in s._compiled)
  assert packed_rows == ([1, 3] if pack else [None]), packed_rows
  n = s.compile_count
  assert n == len(packed_rows)
  s.generate(prompts[::-1], seed=1, max_new_tokens=5, temperature=0.0)
  assert s.compile_count == n  # same buckets, packings and settings: no recompilation
  ref = run(setup, prompts, p=8, max_new_tokens=5, temperature=0.0)
  for i, c in enumerate(out):  # in input order despite sorting by length
    np.testing.assert_array_equal(c.tokens, ref.tokens[i])
  s.generate([list(range(1, 14))], seed=0, max_new_tokens=5, temperature=0.0)
  assert s.compile_count == n + 1  # a longer bucket compiles once more
  s.generate([list(range(1, 12))], seed=0, max_new_tokens=5, temperature=0.0)
  assert s.compile_count == n + 1


@pytest.mark.parametrize("layout", ["setup", "scanned"])
def test_prefill_last_position_equals_full_prefill_row(layout, request):
  """forward(last_B=...) returns each row's hidden state at its index, as the full prefill does
  there, and writes the same cache (its last layer skips the other positions' attention output
  and MLP)."""
  from jaxlab.sample import cache as cache_lib
  from jaxlab.sample.sampler import prompt_layout
  spec, _, trainable, frozen = request.getfixturevalue(layout)
  tok, lengths = pad(PROMPTS, 12, "right")
  valid, pos, last = prompt_layout(jnp.asarray(lengths), 12, "right")
  mask = jnp.tril(jnp.ones((12, 12), bool))[None] & valid[:, None, :]

  def prefill(tr, fr, last_B):
    model = spec.merge(tr, fr)
    cache = cache_lib.init_cache(spec.cfg, len(PROMPTS), 16)
    return cache_lib.forward(model, cache, jnp.asarray(tok), pos, 0, mask, prefill=True,
                             last_B=last_B)

  x_full, cache_full = jax.jit(lambda tr, fr: prefill(tr, fr, None))(trainable, frozen)
  x_last, cache_last = jax.jit(prefill)(trainable, frozen, last)
  assert x_last.shape == (len(PROMPTS), 1, CFG.d_model)
  want = np.take_along_axis(np.asarray(x_full), np.asarray(last)[:, None, None], axis=1)
  np.testing.assert_allclose(np.asarray(x_last), want, rtol=1e-5, atol=1e-5)
  assert not np.allclose(np.asarray(x_last[:, 0]), np.asarray(x_full[:, -1]))  # indices matter
  for a, b in zip(jax.tree.leaves(cache_full), jax.tree.leaves(cache_last)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_pack_rows_places_every_prompt_whole_without_overlap():
  from jaxlab.sample.sampler import pack_rows
  rng = np.random.default_rng(0)
  for _ in range(20):
    lengths = rng.integers(1, 17, rng.integers(1, 40))
    row, col, rows = pack_rows(lengths, 16, multiple=4)
    assert rows % 4 == 0 and rows >= row.max() + 1
    used = np.zeros((rows, 16), int)
    for r, c, n in zip(row, col, lengths):
      assert c + n <= 16
      used[r, c:c + n] += 1
    assert used.max() == 1 and used.sum() == lengths.sum()
    assert rows - 4 < -(-2 * lengths.sum() // 16)  # first-fit decreasing: < 2x the ideal rows
  with pytest.raises(ValueError, match=r"\[1, 16\]"):
    pack_rows([3, 17], 16)


@pytest.mark.parametrize("layout,padding", [("setup", "left"), ("setup", "right"),
                                            ("scanned", "left")])
def test_packed_prefill_samples_as_the_padded_prefill(layout, padding, request):
  """PROMPTS (lengths 5, 2, 9, 1) packed into 2 rows of 12 (one row filled to its end): the same
  tokens and log-probs as the padded batch, whose cache layout it reproduces."""
  from jaxlab.sample.sampler import PackedPrompts, pack_rows
  spec, _, trainable, frozen = request.getfixturevalue(layout)
  tok, lengths = pad(PROMPTS, 12, padding)
  row, col, rows = pack_rows(lengths, 12)
  assert rows == 2
  packed = np.zeros((rows, 12), np.int32)
  for x, r, c in zip(PROMPTS, row, col):
    packed[r, c:c + len(x)] = x
  kw = dict(max_new_tokens=6, temperature=1.0, padding=padding)
  fn = jax.jit(lambda tr, fr, t, n: sample(spec, tr, fr, t, n, jax.random.key(3), **kw),
               compiler_options=FAST)
  want = jax.device_get(fn(trainable, frozen, tok, lengths))
  got = jax.device_get(fn(trainable, frozen, PackedPrompts(packed, row, col), lengths))
  np.testing.assert_array_equal(got.tokens, want.tokens)
  np.testing.assert_allclose(got.logprobs, want.logprobs, rtol=1e-5, atol=1e-5)
  # A wrong placement (rows swapped) samples other tokens: the packing is really read.
  bad = jax.device_get(fn(trainable, frozen, PackedPrompts(packed, 1 - row, col), lengths))
  assert not np.array_equal(bad.tokens, want.tokens)
