"""Preallocated KV cache and the cached forward pass (prefill, decode and tree steps).

The cache holds per layer k and v of shape [B, K, S, E] in the compute dtype
(heads before slots, so attention over the cache is a batched matmul with no
transpose of the cache), sharded with batch over the 'batch' rule
(('data','fsdp')) and kv heads over 'tensor' when it divides them. `forward`
runs Q new tokens through the model, writes their k/v at slots [start, start+Q)
and returns the hidden states; it only uses the Decoder's public pieces (embed,
layers, qkv, attend, o_proj, logits) and computes attention over the cache with
the same float32 math as `Attention.attend`.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding

from jaxlab import sharding as sharding_lib
from jaxlab.models.config import ModelConfig
from jaxlab.models.decoder import _NEG_INF as NEG_INF  # the decoder's finite mask value
from jaxlab.models.decoder import Decoder

CACHE_AXES = ("batch", "kv_heads", None, None)


class KVCache(NamedTuple):
  """Per-layer keys and values, each [B, K, S, E]."""
  k: tuple[jax.Array, ...]
  v: tuple[jax.Array, ...]


def cache_sharding(cfg: ModelConfig, batch: int, length: int, mesh: Mesh,
                   rules=sharding_lib.DEFAULT_RULES) -> NamedSharding:
  """Sharding of one [B, K, S, E] cache array: batch over ('data','fsdp'), K over 'tensor'."""
  shape = (batch, cfg.n_kv_heads, length, cfg.dim_per_head)
  return NamedSharding(mesh, sharding_lib.logical_to_spec(CACHE_AXES, shape, mesh, rules))


def constrain(x: jax.Array, sharding: NamedSharding | None) -> jax.Array:
  return x if sharding is None else jax.lax.with_sharding_constraint(x, sharding)


def init_cache(cfg: ModelConfig, batch: int, length: int, mesh: Mesh | None = None,
               rules=sharding_lib.DEFAULT_RULES) -> KVCache:
  """Zero cache of `length` slots for `batch` rows (sharded when a mesh is given)."""
  sh = None if mesh is None else cache_sharding(cfg, batch, length, mesh, rules)
  shape = (batch, cfg.n_kv_heads, length, cfg.dim_per_head)
  zeros = lambda: constrain(jnp.zeros(shape, jnp.dtype(cfg.dtype)), sh)
  return KVCache(tuple(zeros() for _ in range(cfg.n_layers)),
                 tuple(zeros() for _ in range(cfg.n_layers)))


def attend_cache(attn, q_BxQxHxE: jax.Array, k_BxKxSxE: jax.Array, v_BxKxSxE: jax.Array,
                 mask_BxQxS: jax.Array) -> jax.Array:
  """Attention.attend's math (float32 scores, grouped heads, o_proj) over a [B,K,S,E] cache."""
  b, q_len, h, e = q_BxQxHxE.shape
  kh = k_BxKxSxE.shape[1]
  q_BxKxGQxE = q_BxQxHxE.reshape(b, q_len, kh, h // kh, e).transpose(0, 2, 3, 1, 4).reshape(
      b, kh, (h // kh) * q_len, e)
  s = jnp.einsum("bkme,bkse->bkms", q_BxKxGQxE, k_BxKxSxE,
                 preferred_element_type=jnp.float32) / math.sqrt(e)
  s_BxKxGxQxS = s.reshape(b, kh, h // kh, q_len, -1)
  s_BxKxGxQxS = jnp.where(mask_BxQxS[:, None, None], s_BxKxGxQxS, NEG_INF)
  p = jax.nn.softmax(s_BxKxGxQxS, axis=-1).astype(v_BxKxSxE.dtype)
  o = jnp.einsum("bkms,bkse->bkme", p.reshape(b, kh, -1, p.shape[-1]), v_BxKxSxE)
  o_BxQxHxE = o.reshape(b, kh, h // kh, q_len, e).transpose(0, 3, 1, 2, 4)
  return attn.o_proj(o_BxQxHxE.reshape(b, q_len, h * e))


def forward(model: Decoder, cache: KVCache, tokens_BxQ: jax.Array, positions_BxQ: jax.Array,
            start: jax.Array | int, mask: jax.Array, *, prefill: bool = False,
            sharding: NamedSharding | None = None) -> tuple[jax.Array, KVCache]:
  """Hidden states [B,Q,D] of Q new tokens and the cache with their k/v at [start, start+Q).

  With prefill=True the tokens attend only to each other (mask [B,Q,Q]), which
  is cheaper when the cache is empty; otherwise they attend to the whole cache
  after the write (mask [B,Q,S]).
  """
  x = model.embed(tokens_BxQ)
  ks, vs = [], []
  for i, block in enumerate(model.layers):
    attn = block.self_attn
    q, k, v = attn.qkv(block.input_layernorm(x), positions_BxQ)
    heads_first = lambda x, c: jnp.swapaxes(x, 1, 2).astype(c.dtype)
    ck = jax.lax.dynamic_update_slice(cache.k[i], heads_first(k, cache.k[i]), (0, 0, start, 0))
    cv = jax.lax.dynamic_update_slice(cache.v[i], heads_first(v, cache.v[i]), (0, 0, start, 0))
    ck, cv = constrain(ck, sharding), constrain(cv, sharding)
    ks.append(ck)
    vs.append(cv)
    if prefill:
      x = x + attn.attend(q, k, v, mask)
    else:
      x = x + attend_cache(attn, q, ck, cv, mask)
    x = x + block.mlp(block.post_attention_layernorm(x))
  return x, KVCache(tuple(ks), tuple(vs))
