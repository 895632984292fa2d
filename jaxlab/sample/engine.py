"""Host-side sampling: batching, prompt-length buckets and a cache of compiled samplers.

Prompts are sorted by length, cut into batches of `batch_size` rows (the last
one filled with dummy rows), left-padded to the smallest bucket that fits, and
run through one compiled `sample` per (batch, bucket, settings) key. A long
eval therefore compiles a handful of times; `compile_count` says how many.
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

from jaxlab import sharding as sharding_lib
from jaxlab.models.params import ModelSpec
from jaxlab.sample.sampler import sample

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
               compiler_options: dict | None = None):
    self.spec, self.mesh, self.rules = spec, mesh, rules
    self.param_shardings = spec.shardings(mesh, rules)
    self.trainable, self.frozen = jax.device_put((trainable, frozen), self.param_shardings)
    self.compiler_options = compiler_options
    self.batch_size, self.buckets = batch_size, tuple(sorted(buckets))
    self.stop_ids, self.pad_id = tuple(int(i) for i in stop_ids), int(pad_id)
    self.compile_count = 0
    self._compiled = {}

  def set_params(self, trainable: dict, frozen: dict) -> None:
    """Swaps in other weights of the same architecture (another checkpoint) without recompiling."""
    self.trainable, self.frozen = jax.device_put((trainable, frozen), self.param_shardings)

  def _fn(self, p: int, max_new_tokens: int, temperature: float, top_p: float, top_k: int,
          min_new_tokens: int = 0):
    key = (self.batch_size, p, max_new_tokens, float(temperature), float(top_p), int(top_k),
           int(min_new_tokens))
    if key not in self._compiled:
      def fn(trainable, frozen, prompts, lengths, seed, row_ids):
        return sample(self.spec, trainable, frozen, prompts, lengths, jax.random.key(seed),
                      max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                      top_k=top_k, stop_ids=self.stop_ids, pad_id=self.pad_id, padding="left",
                      row_ids_B=row_ids, mesh=self.mesh, rules=self.rules,
                      min_new_tokens=min_new_tokens)
      rows = NamedSharding(self.mesh, sharding_lib.logical_to_spec(
          ("batch", None), (self.batch_size, p), self.mesh, self.rules))
      rows1 = NamedSharding(self.mesh, P(*rows.spec[:1]))
      rep = NamedSharding(self.mesh, P())
      jitted = jax.jit(fn, in_shardings=(*self.param_shardings, rows, rows1, rep, rows1))
      b = self.batch_size
      self._compiled[key] = (jitted.lower(
          self.trainable, self.frozen, jax.ShapeDtypeStruct((b, p), jnp.int32),
          jax.ShapeDtypeStruct((b,), jnp.int32), jax.ShapeDtypeStruct((), jnp.uint32),
          jax.ShapeDtypeStruct((b,), jnp.int32)).compile(self.compiler_options), rows, rows1)
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
    for start in range(0, len(order), self.batch_size):
      idx = order[start:start + self.batch_size]
      p = bucket_length(max(len(prompts[i]) for i in idx), self.buckets)
      fn, rows, rows1 = self._fn(p, max_new_tokens, temperature, top_p, top_k, min_new_tokens)
      tok = np.full((self.batch_size, p), self.pad_id, np.int32)
      lengths = np.ones((self.batch_size,), np.int32)
      ids = np.zeros((self.batch_size,), np.int32)
      for r, i in enumerate(idx):
        tok[r, p - len(prompts[i]):] = prompts[i]
        lengths[r] = len(prompts[i])
        ids[r] = np.int64(row_ids[i]) & 0x7FFFFFFF
      res = jax.device_get(fn(self.trainable, self.frozen, jax.device_put(tok, rows),
                              jax.device_put(lengths, rows1), np.uint32(seed % 2**32),
                              jax.device_put(ids, rows1)))
      for r, i in enumerate(idx):
        n = int(res.lengths[r])
        out[i] = Completion(res.tokens[r, :n], res.logprobs[r, :n], res.sample_logprobs[r, :n],
                            bool(res.stopped[r]))
    return out
