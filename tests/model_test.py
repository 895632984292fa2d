"""Decoder: shapes, causality, packing equivalence."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlab import sharding
from jaxlab.models import ModelConfig
from jaxlab.models.params import init_params, model_spec
from jaxlab.train.losses import token_nll

CFG = ModelConfig(vocab_size=97, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64,
                  qkv_bias=True, qk_norm=True)


@pytest.fixture(scope="module")
def model():
  spec = model_spec(CFG)
  mesh = sharding.make_mesh((1, 1, 1), jax.devices()[:1])
  trainable, frozen = init_params(spec, mesh, seed=0)
  return spec.merge(trainable, frozen)


def test_shapes_and_dtype(model):
  tokens = jnp.zeros((3, 11), jnp.int32)
  logits = model(tokens)
  assert logits.shape == (3, 11, CFG.vocab_size)
  assert logits.dtype == jnp.float32
  assert np.isfinite(np.asarray(logits)).all()


@pytest.mark.parametrize("t", [0, 5, 9])
def test_causality(model, t):
  rng = np.random.default_rng(t)
  tokens = rng.integers(0, CFG.vocab_size, (2, 10)).astype(np.int32)
  changed = tokens.copy()
  changed[:, t] = (changed[:, t] + 1) % CFG.vocab_size
  a, b = np.asarray(model(jnp.asarray(tokens))), np.asarray(model(jnp.asarray(changed)))
  np.testing.assert_array_equal(a[:, :t], b[:, :t])
  assert np.abs(a[:, t:] - b[:, t:]).max() > 1e-4  # the change is visible from t on


def test_packed_equals_unpacked(model):
  rng = np.random.default_rng(0)
  seqs = [rng.integers(0, CFG.vocab_size, n).astype(np.int32) for n in (7, 4, 9)]
  # Unpacked: one sequence per row, right-padded, segment 0 on padding.
  length = 12
  losses_unpacked = []
  for s in seqs:
    tok = np.zeros((1, length), np.int32)
    seg = np.zeros((1, length), np.int32)
    tok[0, :len(s)], seg[0, :len(s)] = s, 1
    pos = np.arange(length)[None].astype(np.int32)
    nll = token_nll(model(tok, pos, seg)[:, :-1], jnp.asarray(tok[:, 1:]))
    losses_unpacked.append(np.asarray(nll)[0, :len(s) - 1])
  # Packed: 7+4 in row 0 then padding, 9 in row 1.
  tok = np.zeros((2, length), np.int32)
  seg = np.zeros((2, length), np.int32)
  pos = np.zeros((2, length), np.int32)
  tok[0, :7], seg[0, :7], pos[0, :7] = seqs[0], 1, np.arange(7)
  tok[0, 7:11], seg[0, 7:11], pos[0, 7:11] = seqs[1], 2, np.arange(4)
  tok[1, :9], seg[1, :9], pos[1, :9] = seqs[2], 1, np.arange(9)
  nll = np.asarray(token_nll(model(tok, pos, seg)[:, :-1], jnp.asarray(tok[:, 1:])))
  np.testing.assert_allclose(nll[0, :6], losses_unpacked[0], atol=1e-5)
  np.testing.assert_allclose(nll[0, 7:10], losses_unpacked[1], atol=1e-5)
  np.testing.assert_allclose(nll[1, :8], losses_unpacked[2], atol=1e-5)


def test_padding_does_not_change_real_positions(model):
  rng = np.random.default_rng(1)
  tok = rng.integers(0, CFG.vocab_size, (1, 8)).astype(np.int32)
  seg = np.ones((1, 8), np.int32)
  padded = np.concatenate([tok, np.full((1, 4), 5, np.int32)], 1)
  seg_padded = np.concatenate([seg, np.zeros((1, 4), np.int32)], 1)
  a = np.asarray(model(tok, None, seg))
  b = np.asarray(model(padded, None, seg_padded))
  np.testing.assert_allclose(a, b[:, :8], atol=1e-5)
  assert np.isfinite(b).all()


def test_remat_and_bf16_run():
  cfg = CFG.replace(remat=True, dtype="bfloat16", param_dtype="bfloat16")
  spec = model_spec(cfg)
  mesh = sharding.make_mesh((1, 1, 1), jax.devices()[:1])
  trainable, frozen = init_params(spec, mesh, seed=0)
  assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(trainable))
  grads = jax.grad(lambda p: spec.merge(p, frozen)(jnp.ones((1, 5), jnp.int32)).sum())(trainable)
  assert all(np.isfinite(np.asarray(g, np.float32)).all() for g in jax.tree.leaves(grads))


def test_llama3_rope_scaling_matches_formula():
  from jaxlab.models.decoder import rope_inv_freq
  cfg = CFG.replace(head_dim=64, rope_theta=500000.0, rope_scaling="llama3", rope_factor=8.0,
                    rope_low_freq_factor=1.0, rope_high_freq_factor=4.0,
                    rope_original_max_position=8192)
  inv = rope_inv_freq(cfg)
  base = 1.0 / 500000.0 ** (np.arange(0, 64, 2) / 64)
  wl = 2 * np.pi / base
  # High frequencies untouched, low frequencies divided by the factor.
  np.testing.assert_allclose(inv[wl < 8192 / 4], base[wl < 8192 / 4], rtol=1e-5)
  np.testing.assert_allclose(inv[wl > 8192], base[wl > 8192] / 8.0, rtol=1e-5)


@pytest.mark.parametrize("n_kv_heads", [2, 4], ids=["gqa", "mha"])
def test_block_skipping_causal_attention_equals_full(n_kv_heads):
  """`attend_causal` (query blocks of 128 skip the keys above the diagonal; used past length
  128) equals the full masked `attend` at length 300 (two full blocks and a partial one), with
  left and right padding, packed segments and a row that is all padding; gradients too."""
  from jaxlab.models.decoder import _CAUSAL_BLOCK, attention_mask
  length = 300
  assert 2 * _CAUSAL_BLOCK < length < 3 * _CAUSAL_BLOCK
  cfg = CFG.replace(n_kv_heads=n_kv_heads)
  spec = model_spec(cfg)
  mesh = sharding.make_mesh((1, 1, 1), jax.devices()[:1])
  attn = spec.merge(*init_params(spec, mesh, seed=0)).layers[0].self_attn
  seg = np.zeros((4, length), np.int32)
  seg[0, :] = 1                                   # one full sequence
  seg[1, 17:] = 1                                 # left padding
  seg[2, :100], seg[2, 100:250] = 1, 2            # packed, right-padded
  seg[2, 250:290] = 3                             # a third segment crossing no block edge
  rng = np.random.default_rng(0)
  e = cfg.dim_per_head
  q = jnp.asarray(rng.normal(size=(4, length, cfg.n_heads, e)), jnp.float32)
  k = jnp.asarray(rng.normal(size=(4, length, n_kv_heads, e)), jnp.float32)
  v = jnp.asarray(rng.normal(size=(4, length, n_kv_heads, e)), jnp.float32)
  mask = attention_mask(jnp.asarray(seg))          # row 3 is all padding: no allowed key at all
  full = jax.jit(attn.attend)(q, k, v, mask)
  blocked = jax.jit(attn.attend_causal)(q, k, v, mask)
  np.testing.assert_allclose(np.asarray(blocked), np.asarray(full), atol=1e-5, rtol=1e-5)
  assert np.abs(np.asarray(full)).max() > 0.1
  loss = lambda f: lambda q, k, v: jnp.sum(jnp.sin(f(q, k, v, mask)))
  g_full = jax.jit(jax.grad(loss(attn.attend), argnums=(0, 1, 2)))(q, k, v)
  g_blocked = jax.jit(jax.grad(loss(attn.attend_causal), argnums=(0, 1, 2)))(q, k, v)
  for a, b in zip(g_blocked, g_full):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5, rtol=1e-5)
