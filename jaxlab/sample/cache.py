"""Preallocated KV cache and the cached forward pass (prefill, decode and tree steps).

The cache holds per layer k and v of shape [B, K, S, E] in the compute dtype
(heads before slots, so attention over the cache is a batched matmul with no
transpose of the cache), sharded with batch over the 'batch' rule
(('data','fsdp')) and kv heads over 'tensor' when it divides them. `forward`
runs Q new tokens through the model, writes their k/v at slots [start, start+Q)
and returns the hidden states; it only uses the Decoder's public pieces (embed,
layers, qkv, attend, o_proj, logits) and computes attention over the cache with
the same float32 math as `Attention.attend`.

A scanned model (`cfg.scan_layers`) has one cache array per layer stack, [N, B, K, S, E],
carried through the scan over the stack and updated in place at (layer, slot), so a decode
step writes only its new slots, as the unrolled loop does.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jaxlab import sharding as sharding_lib
from jaxlab.models.config import ModelConfig
from jaxlab.models.decoder import NEG_INF  # the decoder's finite mask value
from jaxlab.models.decoder import Decoder, layer_runs, rope_inv_freq, rope_tables, scan_stack

CACHE_AXES = ("batch", "kv_heads", None, None)


class KVCache(NamedTuple):
  """Per-layer keys and values, each [B, K, S, E] (per layer stack [N, B, K, S, E] if scanned)."""
  k: tuple[jax.Array, ...]
  v: tuple[jax.Array, ...]


def cache_sharding(cfg: ModelConfig, batch: int, length: int, mesh: Mesh,
                   rules=sharding_lib.DEFAULT_RULES) -> NamedSharding:
  """Sharding of one cache array: batch over ('data','fsdp'), K over 'tensor' (layers of a
  scanned model's [N, B, K, S, E] stack replicated)."""
  shape = (batch, cfg.n_kv_heads, length, cfg.dim_per_head)
  spec = sharding_lib.logical_to_spec(CACHE_AXES, shape, mesh, rules)
  return NamedSharding(mesh, P(None, *spec) if cfg.scan_layers else spec)


def constrain(x: jax.Array, sharding: NamedSharding | None) -> jax.Array:
  return x if sharding is None else jax.lax.with_sharding_constraint(x, sharding)


def init_cache(cfg: ModelConfig, batch: int, length: int, mesh: Mesh | None = None,
               rules=sharding_lib.DEFAULT_RULES) -> KVCache:
  """Zero cache of `length` slots for `batch` rows (sharded when a mesh is given)."""
  sh = None if mesh is None else cache_sharding(cfg, batch, length, mesh, rules)
  shape = (batch, cfg.n_kv_heads, length, cfg.dim_per_head)
  zeros = lambda lead: constrain(jnp.zeros(lead + shape, jnp.dtype(cfg.dtype)), sh)
  leads = ([(stop - start,) for start, stop in layer_runs(cfg)] if cfg.scan_layers
           else [()] * cfg.n_layers)
  return KVCache(tuple(zeros(n) for n in leads), tuple(zeros(n) for n in leads))


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
            sharding: NamedSharding | None = None, last_B: jax.Array | None = None,
            rope: tuple[jax.Array, jax.Array] | None = None) -> tuple[jax.Array, KVCache]:
  """Hidden states [B,Q,D] of Q new tokens and the cache with their k/v at [start, start+Q).

  With prefill=True the tokens attend only to each other (mask [B,Q,Q]), which
  is cheaper when the cache is empty; otherwise they attend to the whole cache
  after the write (mask [B,Q,S]). With `last_B` (one index per row) only that position's
  hidden state is returned, [B,1,D]: the last layer then runs attention output and MLP for
  that position alone (all positions' k/v still enter the cache), which is all a prefill
  needs to draw the first token. A packed prefill (rows holding several prompts, see
  `unpack_prefill`) passes last_B = (row_N, col_N) instead: [N,1,D] at those N places.
  `rope`: precomputed `rope_tables(positions_BxQ, ...)` (see `rope_lookup`), else computed
  here from the positions.
  """
  x = model.embed(tokens_BxQ)
  cfg = model.cfg
  # The rotation tables depend only on the positions: computed once for all layers.
  if rope is None:
    rope = rope_tables(positions_BxQ, rope_inv_freq(cfg), jnp.dtype(cfg.dtype))
  if cfg.scan_layers:
    return _forward_scanned(model, cache, x, rope, start, mask, prefill, sharding, last_B)
  ks, vs = [], []
  n = len(model.layers)
  for i, block in enumerate(model.layers):
    write = lambda c, new: jax.lax.dynamic_update_slice(c, new, (0, 0, start, 0))
    x, ck, cv = _block(block, x, rope, cache.k[i], cache.v[i], mask, prefill, write,
                       lambda c: c, sharding, last_B if i == n - 1 else None)
    ks.append(ck)
    vs.append(cv)
  return x, KVCache(tuple(ks), tuple(vs))


def unpack_prefill(cache: KVCache, row_B: jax.Array, col_B: jax.Array,
                   token_BxP: jax.Array) -> KVCache:
  """The cache of a packed prefill ([R,K,C,E] per layer: prompt b's token j at row row_B[b],
  slot col_B[b] + j) laid out per prompt: [B,K,P,E] with slot s holding prompt b's token
  token_BxP[b, s] (its index in the prompt; slots that hold no token read any packed slot,
  which the decode mask hides)."""
  c = next(iter(cache.k)).shape[-2]
  src_BxP = jnp.clip(col_B[:, None] + token_BxP, 0, c - 1)
  row_Bx1 = row_B[:, None]

  def gather(x):
    # Advanced indices split by a slice put their [B,P] dims first (numpy's rule).
    if x.ndim == 5:  # a scanned stack [N,R,K,C,E] -> [B,P,N,K,E] -> [N,B,K,P,E]
      return x[:, row_Bx1, :, src_BxP].transpose(2, 0, 3, 1, 4)
    return x[row_Bx1, :, src_BxP].transpose(0, 2, 1, 3)  # [B,P,K,E] -> [B,K,P,E]
  return KVCache(tuple(map(gather, cache.k)), tuple(map(gather, cache.v)))


def rope_table(cfg: ModelConfig, length: int) -> tuple[jax.Array, jax.Array]:
  """(cos, sin) of positions 0..length-1, each [length, 1, E/2]: computed once (before a decode
  loop), then `rope_lookup` gathers each step's rows. A decode step that computes cos/sin
  from its positions instead has them fused by XLA into every rotation that uses them, where
  they are evaluated once per head and element (8 x 64 per row and layer, twice: q and k);
  the trace of the d512 benchmark sampler put those fusions at ~5% of its CPU time."""
  cos, sin = rope_tables(jnp.arange(length, dtype=jnp.int32)[None], rope_inv_freq(cfg),
                         jnp.dtype(cfg.dtype))
  return cos[0], sin[0]


def rope_lookup(table: tuple[jax.Array, jax.Array], positions_BxQ: jax.Array):
  """`rope_tables(positions_BxQ, ...)` read from a `rope_table`: each [B,Q,1,E/2]."""
  return tuple(jnp.take(t, positions_BxQ, axis=0, mode="clip") for t in table)


def _rows(x_RxQx___: jax.Array, last) -> jax.Array:
  """x[b, last[b]] for every row b (last: index_B), or x[row_B[b], col_B[b]] for every b
  (last: (row_B, col_B), a packed prefill), keeping the Q axis (length 1)."""
  if isinstance(last, tuple):
    row_B, col_B = last
    return x_RxQx___[row_B, col_B][:, None]
  idx = last.reshape((-1, 1) + (1,) * (x_RxQx___.ndim - 2))
  return jnp.take_along_axis(x_RxQx___, idx, axis=1)


def _block(block, x, rope, ck, cv, mask, prefill, write, read, sharding, last_B=None):
  """One layer of `forward`: (x, k cache, v cache) after it. write(cache, new k/v [B,K,Q,E])
  stores the new slots, read(cache) is this layer's [B,K,S,E]. With last_B the layer's output
  is only computed at those positions ([B,1,D])."""
  attn = block.self_attn
  q, k, v = attn.qkv(block.input_layernorm(x), None, rope=rope)
  heads_first = lambda x: jnp.swapaxes(x, 1, 2).astype(ck.dtype)
  ck = constrain(write(ck, heads_first(k)), sharding)
  cv = constrain(write(cv, heads_first(v)), sharding)
  if last_B is not None:
    x, q, mask = _rows(x, last_B), _rows(q, last_B), _rows(mask, last_B)
    if isinstance(last_B, tuple):  # packed rows: each output row attends in its packed row
      k, v = k[last_B[0]], v[last_B[0]]
  if prefill:
    x = x + attn.attend(q, k, v, mask)
  else:
    x = x + attend_cache(attn, q, read(ck), read(cv), mask)
  return x + block.mlp(block.post_attention_layernorm(x)), ck, cv


def _forward_scanned(model, cache, x, rope, start, mask, prefill, sharding, last_B):
  """`forward` over layer stacks: each stack's cache [N,B,K,S,E] rides in the scan carry, so
  layer i updates it in place at (i, slot) and its attention reads slice i. (With last_B the
  whole last stack keeps every position; the cut is made after it.)"""
  ks, vs = [], []
  for stack, ck, cv in zip(model.stacks, cache.k, cache.v):
    def step(block, carry, i):
      x, ck, cv = carry
      write = lambda c, new: jax.lax.dynamic_update_slice(c, new[None], (i, 0, 0, start, 0))
      read = lambda c: jax.lax.dynamic_index_in_dim(c, i, keepdims=False)
      return _block(block, x, rope, ck, cv, mask, prefill, write, read, sharding), None
    (x, ck, cv), _ = scan_stack(stack, step, (x, ck, cv), jnp.arange(ck.shape[0]))
    ks.append(ck)
    vs.append(cv)
  if last_B is not None:
    x = _rows(x, last_B)
  return x, KVCache(tuple(ks), tuple(vs))
