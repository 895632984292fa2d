"""The sampler: a pure function (params, prompts, rng) -> tokens, log-probs, lengths.

One prefill over the padded prompts, then a `lax.while_loop` that decodes one
token per step for the whole batch from a preallocated KV cache; everything is
traced once, so `sample` can be jitted on its own or called inside a training
step (on-policy distillation).

Layout: the prompt occupies cache slots [0, P), generated token t is written at
slot P + t. Padding slots are masked out, so left- and right-padded prompts of
different lengths give the same result as each prompt alone; positions count
only real tokens (prompt token j of a prompt of length n has position j, and
generated token t has position n + t).

Log-probs: `logprobs` are those of the model distribution at temperature 1
(log_softmax of the raw logits) at the sampled tokens, i.e. log p_model(y_t | y_<t),
what a distillation loss needs; `sample_logprobs` are those of the distribution
actually sampled from (after temperature, top-k and top-p; 0 for greedy).
"""
from __future__ import annotations

from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding

from jaxlab import sharding as sharding_lib
from jaxlab.models.params import ModelSpec
from jaxlab.sample import cache as cache_lib
from jaxlab.sample.sampling import select


class SampleOutput(NamedTuple):
  """Generated tokens [B,T] (pad_id after a row ends) and per-token values (0 after the end)."""
  tokens: jax.Array           # int32 [B, T]; a row's stop token is included
  logprobs: jax.Array         # float32 [B, T]; log p_model(token) at temperature 1
  sample_logprobs: jax.Array  # float32 [B, T]; log-prob under the processed distribution
  lengths: jax.Array          # int32 [B]; generated tokens including the stop token
  stopped: jax.Array          # bool [B]; the row ended with one of stop_ids


class PackedPrompts(NamedTuple):
  """Prompts packed into rows for the prefill: prompt b's n_b tokens are tokens[row[b],
  col[b] : col[b] + n_b]; a row holds several short prompts (see `pack_rows`). `sample`
  then prefills R rows instead of B padded ones and lays the cache out per prompt, as if
  the prompts had been padded (results equal up to float rounding)."""
  tokens: jax.Array  # int32 [R, P]; P = the prompt bucket (the width of a padded prompt row)
  row: jax.Array     # int32 [B]
  col: jax.Array     # int32 [B]


def pack_rows(lengths: Sequence[int], width: int,
              multiple: int = 1) -> tuple[np.ndarray, np.ndarray, int]:
  """(row_B, col_B, rows): first-fit-decreasing packing of prompts of these lengths into rows
  of `width` tokens (each prompt whole, in one row); rows rounded up to a multiple of
  `multiple` (fewer distinct shapes to compile)."""
  lengths = np.asarray(lengths, np.int64)
  if len(lengths) and (lengths.max() > width or lengths.min() < 1):
    raise ValueError(f"prompt lengths must be in [1, {width}], "
                     f"got {lengths.min()}..{lengths.max()}")
  row, col = np.zeros(len(lengths), np.int32), np.zeros(len(lengths), np.int32)
  used: list[int] = []
  for i in np.argsort(-lengths, kind="stable"):
    r = next((r for r, u in enumerate(used) if u + lengths[i] <= width), len(used))
    if r == len(used):
      used.append(0)
    row[i], col[i] = r, used[r]
    used[r] += int(lengths[i])
  return row, col, -(-len(used) // multiple) * multiple


def prompt_layout(prompt_lengths_B: jax.Array, p: int, padding: str):
  """(valid_BxP, positions_BxP, last_index_B) for left- or right-padded prompts."""
  col_1xP = jnp.arange(p, dtype=jnp.int32)[None, :]
  n_Bx1 = prompt_lengths_B.astype(jnp.int32)[:, None]
  if padding == "left":
    offset_Bx1 = p - n_Bx1
    valid = col_1xP >= offset_Bx1
    positions = jnp.maximum(col_1xP - offset_Bx1, 0)
    last = jnp.full(prompt_lengths_B.shape, p - 1, jnp.int32)
  elif padding == "right":
    valid = col_1xP < n_Bx1
    positions = jnp.broadcast_to(col_1xP, valid.shape)
    last = prompt_lengths_B.astype(jnp.int32) - 1
  else:
    raise ValueError(f"padding must be 'left' or 'right', got {padding!r}")
  return valid, positions, last


def row_keys(rng: jax.Array, row_ids_B: jax.Array) -> jax.Array:
  """One key per row: fold_in(rng, row_id); accepts typed or raw uint32[2] keys."""
  if not jnp.issubdtype(rng.dtype, jax.dtypes.prng_key):
    rng = jax.random.wrap_key_data(rng)
  return jax.vmap(jax.random.fold_in, (None, 0))(rng, row_ids_B)


def _constrain_batch(x: jax.Array, mesh: Mesh | None, rules) -> jax.Array:
  if mesh is None:
    return x
  spec = sharding_lib.logical_to_spec(("batch",) + (None,) * (x.ndim - 1), x.shape, mesh, rules)
  return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))


def decode_segments(max_new_tokens: int, n: int = 8, multiple: int = 16) -> list[int]:
  """Ends (exclusive) of the decode-step segments: about `n` equal runs of the
  max_new_tokens - 1 steps, cut at multiples of `multiple` steps; [] when there are none."""
  steps = max_new_tokens - 1
  size = max(multiple, -(-steps // (n * multiple)) * multiple)
  return sorted({min(e, steps) for e in range(size, steps + size, size)}) if steps > 0 else []


def _grow_cache(cache, extra: int, sharding):
  """The cache with `extra` zero slots appended to every k/v array (slots are the next-to-last
  axis), constrained to `sharding`."""
  pad = lambda c: jnp.pad(c, ((0, 0),) * (c.ndim - 2) + ((0, extra), (0, 0)))
  return jax.tree.map(lambda c: cache_lib.constrain(pad(c), sharding), cache)


def _packed_prefill(model, packed: PackedPrompts, n_B, pos_BxP, rope_table, cache_len, shard,
                    mesh, rules):
  """Prefill of packed rows ([R,P], each a few whole prompts attending only within
  themselves): (hidden state at each prompt's last token [B,1,D], the cache laid out per prompt
  as the padded prefill would leave it, cache_len slots)."""
  cfg = model.cfg
  r, p = packed.tokens.shape
  b = n_B.shape[0]
  j_1xP = jnp.arange(p, dtype=jnp.int32)[None]
  # Which prompt fills each packed cell (-1: none); a prompt's cells past its length are dropped.
  cols_BxP = jnp.where(j_1xP < n_B[:, None], packed.col[:, None] + j_1xP, p)
  seg_RxP = jnp.full((r, p), -1, jnp.int32).at[packed.row[:, None], cols_BxP].set(
      jnp.broadcast_to(jnp.arange(b, dtype=jnp.int32)[:, None], (b, p)), mode="drop")
  pos_RxP = jnp.where(seg_RxP >= 0, j_1xP - packed.col[jnp.maximum(seg_RxP, 0)], 0)
  same_RxPxP = seg_RxP[:, :, None] == seg_RxP[:, None, :]
  mask_RxPxP = jnp.tril(jnp.ones((p, p), bool))[None] & same_RxPxP & (seg_RxP[:, None, :] >= 0)
  rows_sh = None if mesh is None else cache_lib.cache_sharding(cfg, r, p, mesh, rules)
  pcache = cache_lib.init_cache(cfg, r, p, mesh, rules)
  x_Bx1xD, pcache = cache_lib.forward(
      model, pcache, _constrain_batch(packed.tokens.astype(jnp.int32), mesh, rules), pos_RxP, 0,
      mask_RxPxP, prefill=True, sharding=rows_sh, last_B=(packed.row, packed.col + n_B - 1),
      rope=cache_lib.rope_lookup(rope_table, pos_RxP))
  cache = cache_lib.unpack_prefill(pcache, packed.row, packed.col, pos_BxP)
  return x_Bx1xD, _grow_cache(cache, cache_len - p, shard(cache_len))


def sample(spec: ModelSpec, trainable: dict, frozen: dict,
           prompt_tokens_BxP: jax.Array | PackedPrompts,
           prompt_lengths_B: jax.Array, rng: jax.Array, *, max_new_tokens: int,
           temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0,
           stop_ids: Sequence[int] = (), pad_id: int = 0, padding: str = "left",
           row_ids_B: jax.Array | None = None, mesh: Mesh | None = None,
           rules=sharding_lib.DEFAULT_RULES, min_new_tokens: int = 0) -> SampleOutput:
  """Samples up to max_new_tokens per row after each prompt (pure; jit it or call it under jit).

  Row b draws with key fold_in(rng, row_ids_B[b]) (default b), folded with the
  step index, so its tokens depend only on its prompt, its row id and rng.
  With a mesh the cache and batch arrays are constrained to batch-over-
  ('data','fsdp') and kv-heads-over-'tensor' shardings. The first
  `min_new_tokens` steps cannot draw a stop id (as HF's min_new_tokens: their
  logits are -inf, so log-probs at those steps exclude the stop ids).
  prompt_tokens_BxP may be `PackedPrompts` (prompts packed into fewer rows for the prefill;
  `Sampler(pack_prefill=True)` packs a batch when that saves rows); the layout of the cache
  and everything after the prefill are then as if they were padded per `padding`.
  """
  if max_new_tokens < 1:
    raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
  cfg = spec.cfg
  model = spec.merge(trainable, frozen)
  packed = prompt_tokens_BxP if isinstance(prompt_tokens_BxP, PackedPrompts) else None
  b, p = (prompt_lengths_B.shape[0], packed.tokens.shape[1]) if packed else prompt_tokens_BxP.shape
  t_max = max_new_tokens
  stop_K = jnp.asarray(list(stop_ids) or [-1], jnp.int32)
  is_stop = lambda tok_B: jnp.any(tok_B[:, None] == stop_K[None, :], axis=-1)
  row_ids_B = jnp.arange(b, dtype=jnp.int32) if row_ids_B is None else row_ids_B
  keys_B = row_keys(rng, row_ids_B.astype(jnp.uint32))
  # Every step's keys at once (one vectorised hash instead of one small one per decode step).
  keys_TxB = jax.vmap(lambda t: jax.vmap(jax.random.fold_in, (0, None))(keys_B, t))(
      jnp.arange(t_max, dtype=jnp.uint32))
  ban_V = None
  if min_new_tokens > 0 and stop_ids:
    ban_V = jnp.zeros((spec.cfg.vocab_size,), bool).at[stop_K].set(True)

  def pick(logits, t):
    if ban_V is not None:
      logits = jnp.where(ban_V[None, :logits.shape[-1]] & (t < min_new_tokens), -jnp.inf, logits)
    return select(logits, keys_TxB[t], temperature=temperature, top_k=top_k, top_p=top_p)
  ends = decode_segments(t_max)
  cache_len = lambda i: p + ends[i] if ends else p  # slots segment i attends to
  shard = lambda n: None if mesh is None else cache_lib.cache_sharding(cfg, b, n, mesh, rules)

  # Rotations of every position the sampler meets (all below p + t_max), computed once.
  rope_table = cache_lib.rope_table(cfg, p + t_max)
  # Prefill: the prompt attends to itself; its k/v land in slots [0, P).
  valid_BxP, pos_BxP, last_B = prompt_layout(prompt_lengths_B, p, padding)
  if packed is not None:
    x_Bx1xD, cache = _packed_prefill(model, packed, prompt_lengths_B.astype(jnp.int32), pos_BxP,
                                     rope_table, cache_len(0), shard, mesh, rules)
  else:
    causal_PxP = jnp.tril(jnp.ones((p, p), bool))
    mask_BxPxP = causal_PxP[None] & valid_BxP[:, None, :]
    cache = cache_lib.init_cache(cfg, b, cache_len(0), mesh, rules)
    tokens_BxP = _constrain_batch(prompt_tokens_BxP.astype(jnp.int32), mesh, rules)
    x_Bx1xD, cache = cache_lib.forward(model, cache, tokens_BxP, pos_BxP, 0, mask_BxPxP,
                                       prefill=True, sharding=shard(cache_len(0)), last_B=last_B,
                                       rope=cache_lib.rope_lookup(rope_table, pos_BxP))
  tok_B, lp_B, slp_B = pick(model.logits(x_Bx1xD)[:, 0], 0)

  out_tok = jnp.full((b, t_max), pad_id, jnp.int32).at[:, 0].set(tok_B)
  out_lp = jnp.zeros((b, t_max), jnp.float32).at[:, 0].set(lp_B)
  out_slp = jnp.zeros((b, t_max), jnp.float32).at[:, 0].set(slp_B)
  valid_BxS = jnp.concatenate([valid_BxP, jnp.zeros((b, cache_len(0) - p), bool)], axis=1)
  state = dict(t=jnp.int32(0), tok=tok_B, done=is_stop(tok_B), n=jnp.ones((b,), jnp.int32),
               out_tok=_constrain_batch(out_tok, mesh, rules), out_lp=out_lp, out_slp=out_slp,
               valid=valid_BxS, cache=cache)

  def body(st, sh):
    t = st["t"]
    slot = p + t
    valid = jax.lax.dynamic_update_slice(st["valid"], jnp.ones((b, 1), bool), (0, slot))
    pos_Bx1 = (prompt_lengths_B.astype(jnp.int32) + t)[:, None]
    x, cache = cache_lib.forward(model, st["cache"], st["tok"][:, None], pos_Bx1, slot,
                                 valid[:, None, :], sharding=sh,
                                 rope=cache_lib.rope_lookup(rope_table, pos_Bx1))
    tok, lp, slp = pick(model.logits(x)[:, 0], t + 1)
    done = st["done"]
    tok = jnp.where(done, pad_id, tok)
    lp, slp = jnp.where(done, 0.0, lp), jnp.where(done, 0.0, slp)
    write = lambda buf, val: jax.lax.dynamic_update_slice(buf, val[:, None], (0, t + 1))
    return dict(t=t + 1, tok=tok, done=done | is_stop(tok), n=st["n"] + (~done).astype(jnp.int32),
                out_tok=write(st["out_tok"], tok), out_lp=write(st["out_lp"], lp),
                out_slp=write(st["out_slp"], slp), valid=valid, cache=cache)

  # Step t (t = 0 .. t_max-2) writes slot p+t and attends to slots [0, p+t]. The steps run in
  # segments, each over a cache only as long as its last step needs (grown with zeros in
  # between): decode reads the whole cache every step, so a shorter cache is a faster step.
  for i, end in enumerate(ends):
    if i > 0:
      grow = cache_len(i) - cache_len(i - 1)
      state["cache"] = _grow_cache(state["cache"], grow, shard(cache_len(i)))
      state["valid"] = jnp.pad(state["valid"], ((0, 0), (0, grow)))
    state = jax.lax.while_loop(lambda st, end=end: (st["t"] < end) & ~jnp.all(st["done"]),
                               lambda st, i=i: body(st, shard(cache_len(i))), state)
  return SampleOutput(tokens=state["out_tok"], logprobs=state["out_lp"],
                      sample_logprobs=state["out_slp"], lengths=state["n"], stopped=state["done"])
