"""Preallocated KV cache and the cached forward pass (prefill, decode and tree steps).

The cache holds per layer k and v of shape [B, S, K, E] in the compute dtype,
sharded with batch over the 'batch' rule (('data','fsdp')) and kv heads over
'tensor' when it divides them. `forward` runs Q new tokens through the model,
writes their k/v at slots [start, start+Q) and returns the hidden states; it
only uses the Decoder's public pieces (embed, layers, qkv, attend, logits).
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding

from jaxlab import sharding as sharding_lib
from jaxlab.models.config import ModelConfig
from jaxlab.models.decoder import Decoder

CACHE_AXES = ("batch", None, "kv_heads", None)


class KVCache(NamedTuple):
  """Per-layer keys and values, each [B, S, K, E]."""
  k: tuple[jax.Array, ...]
  v: tuple[jax.Array, ...]


def cache_sharding(cfg: ModelConfig, batch: int, length: int, mesh: Mesh,
                   rules=sharding_lib.DEFAULT_RULES) -> NamedSharding:
  """Sharding of one [B, S, K, E] cache array: batch over ('data','fsdp'), K over 'tensor'."""
  shape = (batch, length, cfg.n_kv_heads, cfg.dim_per_head)
  return NamedSharding(mesh, sharding_lib.logical_to_spec(CACHE_AXES, shape, mesh, rules))


def constrain(x: jax.Array, sharding: NamedSharding | None) -> jax.Array:
  return x if sharding is None else jax.lax.with_sharding_constraint(x, sharding)


def init_cache(cfg: ModelConfig, batch: int, length: int, mesh: Mesh | None = None,
               rules=sharding_lib.DEFAULT_RULES) -> KVCache:
  """Zero cache of `length` slots for `batch` rows (sharded when a mesh is given)."""
  sh = None if mesh is None else cache_sharding(cfg, batch, length, mesh, rules)
  shape = (batch, length, cfg.n_kv_heads, cfg.dim_per_head)
  zeros = lambda: constrain(jnp.zeros(shape, jnp.dtype(cfg.dtype)), sh)
  return KVCache(tuple(zeros() for _ in range(cfg.n_layers)),
                 tuple(zeros() for _ in range(cfg.n_layers)))


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
    ck = jax.lax.dynamic_update_slice(cache.k[i], k.astype(cache.k[i].dtype), (0, start, 0, 0))
    cv = jax.lax.dynamic_update_slice(cache.v[i], v.astype(cache.v[i].dtype), (0, start, 0, 0))
    ck, cv = constrain(ck, sharding), constrain(cv, sharding)
    ks.append(ck)
    vs.append(cv)
    if prefill:
      x = x + attn.attend(q, k, v, mask)
    else:
      x = x + attn.attend(q, ck, cv, mask)
    x = x + block.mlp(block.post_attention_layernorm(x))
  return x, KVCache(tuple(ks), tuple(vs))
