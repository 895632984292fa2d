"""Host-side sampling: batching, prompt-length buckets and a cache of compiled samplers.

Prompts are sorted by length, cut into batches of `batch_size` rows (the last
one filled with dummy rows), left-padded to the smallest bucket that fits, and
run through one compiled `sample` per (batch, bucket, settings) key. A long
eval therefore compiles a handful of times; `compile_count` says how many.

Packed prefill (`pack_prefill=True`, opt-in): when a batch's prompts fit into fewer rows
of the bucket's width (first-fit decreasing, several short prompts to a row), the prefill
runs over those rows instead of the padded batch, and its cache is laid out as the padded
prefill's (`sampler.PackedPrompts`). A batch of mixed lengths then pays for its tokens
rather than for batch x bucket: at the d512 benchmark shape (32 prompts of 8-63 tokens,
bucket 64: 22 rows instead of 32) the prefill is ~30% cheaper and a whole generate ~5%
faster. The price is one compilation per (bucket, packed row count) instead of per bucket
(row counts are rounded up to a multiple of batch_size/16 and of the data shards), which is
why it is off by default: an eval compiles its few buckets once and its length-sorted
batches rarely pack, while repeated sampling of the same prompt batches gains.
Single-process (it device_puts whole host arrays); on a multi-host pod call
`sampler.sample` inside your own jit on global arrays instead.
"""
from __future__ import annotations

import dataclasses
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jaxlab import console
from jaxlab import sharding as sharding_lib
from jaxlab.models.params import ModelSpec
from jaxlab.sample.sampler import PackedPrompts, pack_rows, sample

DEFAULT_BUCKETS = (32, 64, 128, 256, 512, 1024, 2048, 4096)


@dataclasses.dataclass
class Completion:
  """One sampled continuation (numpy), stop token included when `stopped`."""
  tokens: np.ndarray           # int32 [n]
  logprobs: np.ndarray         # float32 [n]; model log-probs at temperature 1
  sample_logprobs: np.ndarray  # float32 [n]; under the processed distribution
  stopped: bool


def bucket_length(n: int, buckets: Sequence[int]) -> int:
  """Smallest bucket >= n; beyond the largest, the next multiple of the largest."""
  for b in buckets:
    if n <= b:
      return b
  top = buckets[-1]
  return -(-n // top) * top


class Sampler:
  """Samples many prompts with fixed-shape batches; params stay on the mesh."""

  def __init__(self, spec: ModelSpec, trainable: dict, frozen: dict, *, mesh: Mesh,
               batch_size: int, stop_ids: Sequence[int], pad_id: int,
               rules=sharding_lib.DEFAULT_RULES, buckets: Sequence[int] = DEFAULT_BUCKETS,
               compiler_options: dict | None = None, pack_prefill: bool = False):
    self.spec, self.mesh, self.rules = spec, mesh, rules
    self.param_shardings = spec.shardings(mesh, rules)
    self.trainable, self.frozen = jax.device_put((trainable, frozen), self.param_shardings)
    self.compiler_options = compiler_options
    self.batch_size, self.buckets = batch_size, tuple(sorted(buckets))
    self.stop_ids, self.pad_id = tuple(int(i) for i in stop_ids), int(pad_id)
    self.pack_prefill = pack_prefill
    self.compile_count = 0
    self._compiled = {}

  def decode(self, tokenizer, completions: Sequence[Completion]) -> list[str]:
    """The text of each completion, without its final stop token (special tokens skipped)."""
    stops = set(self.stop_ids)
    out = []
    for c in completions:
      ends_with_stop = c.stopped and len(c.tokens) and int(c.tokens[-1]) in stops
      toks = c.tokens[:-1] if ends_with_stop else c.tokens
      out.append(tokenizer.decode(toks.tolist(), skip_special_tokens=True))
    return out

  def set_params(self, trainable: dict, frozen: dict) -> None:
    """Swaps in other weights of the same architecture (another checkpoint) without recompiling."""
    self.trainable, self.frozen = jax.device_put((trainable, frozen), self.param_shardings)

  def _rows_sharding(self, n: int, p: int) -> NamedSharding:
    return NamedSharding(self.mesh, sharding_lib.logical_to_spec(
        ("batch", None), (n, p), self.mesh, self.rules))

  def _pack(self, lengths: np.ndarray, p: int):
    """(row_B, col_B, rows) of a packed prefill for this batch, or None when packing saves
    no row."""
    if not self.pack_prefill:
      return None
    b = self.batch_size
    shards = b // self._rows_sharding(b, p).shard_shape((b, p))[0]
    multiple = np.lcm(max(1, b // 16), shards)
    row, col, rows = pack_rows(lengths, p, int(multiple))
    return (row, col, rows) if rows < b else None

  def _fn(self, p: int, max_new_tokens: int, temperature: float, top_p: float, top_k: int,
          min_new_tokens: int = 0, packed_rows: int | None = None):
    key = (self.batch_size, p, max_new_tokens, float(temperature), float(top_p), int(top_k),
           int(min_new_tokens), packed_rows)
    if key not in self._compiled:
      def fn(trainable, frozen, prompts, lengths, seed, row_ids):
        return sample(self.spec, trainable, frozen, prompts, lengths, jax.random.key(seed),
                      max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                      top_k=top_k, stop_ids=self.stop_ids, pad_id=self.pad_id, padding="left",
                      row_ids_B=row_ids, mesh=self.mesh, rules=self.rules,
                      min_new_tokens=min_new_tokens)
      b = self.batch_size
      rows = self._rows_sharding(b, p)
      rows1 = NamedSharding(self.mesh, P(*rows.spec[:1]))
      rep = NamedSharding(self.mesh, P())
      i32 = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.int32)
      if packed_rows is None:
        prompts, prompts_sh = i32(b, p), rows
      else:
        prompts = PackedPrompts(i32(packed_rows, p), i32(b), i32(b))
        prompts_sh = PackedPrompts(self._rows_sharding(packed_rows, p), rows1, rows1)
      jitted = jax.jit(fn, in_shardings=(*self.param_shardings, prompts_sh, rows1, rep, rows1))
      self._compiled[key] = (jitted.lower(
          self.trainable, self.frozen, prompts, i32(b), jax.ShapeDtypeStruct((), jnp.uint32),
          i32(b)).compile(self.compiler_options), prompts_sh, rows1)
      self.compile_count += 1
    return self._compiled[key]

  def generate(self, prompts: Sequence[Sequence[int]], *, seed: int, max_new_tokens: int,
               temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0,
               row_ids: Sequence[int] | None = None, min_new_tokens: int = 0) -> list[Completion]:
    """One Completion per prompt, in order; row_ids (default: the index) key each row's RNG.

    The first `min_new_tokens` tokens are never stop ids (1: no empty answers).
    """
    prompts = [np.asarray(x, np.int32) for x in prompts]
    if any(len(x) == 0 for x in prompts):
      raise ValueError("every prompt needs at least one token")
    row_ids = np.arange(len(prompts)) if row_ids is None else np.asarray(row_ids)
    order = np.argsort([len(x) for x in prompts], kind="stable")
    out: list[Completion | None] = [None] * len(prompts)
    with console.Progress(len(prompts), "sample", "samples") as progress:  # in a stage only
      for start in range(0, len(order), self.batch_size):
        self._generate_batch(prompts, order[start:start + self.batch_size], row_ids, out,
                             seed=seed, max_new_tokens=max_new_tokens, temperature=temperature,
                             top_p=top_p, top_k=top_k, min_new_tokens=min_new_tokens)
        progress.update(start + self.batch_size)
    return out

  def _generate_batch(self, prompts, idx, row_ids, out, *, seed: int, max_new_tokens: int,
                      temperature: float, top_p: float, top_k: int,
                      min_new_tokens: int) -> None:
    """Fills out[i] for the prompts of one batch (`idx`)."""
    p = bucket_length(max(len(prompts[i]) for i in idx), self.buckets)
    lengths = np.ones((self.batch_size,), np.int32)  # dummy rows: one pad token
    ids = np.zeros((self.batch_size,), np.int32)
    for r, i in enumerate(idx):
      lengths[r] = len(prompts[i])
      ids[r] = np.int64(row_ids[i]) & 0x7FFFFFFF
    pack = self._pack(lengths, p)
    fn, prompts_sh, rows1 = self._fn(p, max_new_tokens, temperature, top_p, top_k,
                                     min_new_tokens, None if pack is None else pack[2])
    if pack is None:
      tok = np.full((self.batch_size, p), self.pad_id, np.int32)
      for r, i in enumerate(idx):
        tok[r, p - len(prompts[i]):] = prompts[i]
    else:
      row, col, n_rows = pack
      tok = PackedPrompts(np.full((n_rows, p), self.pad_id, np.int32), row, col)
      for r, i in enumerate(idx):
        tok.tokens[row[r], col[r]:col[r] + len(prompts[i])] = prompts[i]
    res = jax.device_get(fn(self.trainable, self.frozen, jax.device_put(tok, prompts_sh),
                            jax.device_put(lengths, rows1), np.uint32(seed % 2**32),
                            jax.device_put(ids, rows1)))
    for r, i in enumerate(idx):
      n = int(res.lengths[r])
      out[i] = Completion(res.tokens[r, :n], res.logprobs[r, :n], res.sample_logprobs[r, :n],
                          bool(res.stopped[r]))
