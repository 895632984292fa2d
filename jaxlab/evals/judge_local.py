"""Local JAX judges: any chat model jaxlab can load scores answers 0..100, in two modes.

- LocalJudge (logprob mode, the EM protocol without an API): for each batch of
  judge prompts one jitted function runs the prompt (prefill) and, for
  tokenizers that split integers into several tokens, one small tree step over
  the inner nodes of the integer trie (see numbers.py), returning log-probs at
  the trie tokens; the score is aggregated on the host.
- LocalTextJudge (text mode, the study's protocol without an API): greedy
  decoding of a short reply with the KV-cache sampler, then the study's parser
  (numbers.parse_text_score).
Both return {score, status, raw} per judge prompt.
"""
from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jaxlab import sharding as sharding_lib
from jaxlab.data.chat import pad_id as tokenizer_pad_id
from jaxlab.evals.number_scores import MIN_MASS, OK, NumberTrie, parse_text_score
from jaxlab.evals.prompts import chat_prompt_ids
from jaxlab.models.params import ModelSpec
from jaxlab.sample import cache as cache_lib
from jaxlab.sample.engine import DEFAULT_BUCKETS, Sampler, bucket_length
from jaxlab.sample.sampler import prompt_layout


def trie_logprobs(spec: ModelSpec, trainable: dict, frozen: dict, prompts_BxP: jax.Array,
                  lengths_B: jax.Array, trie: NumberTrie, mesh: Mesh | None = None,
                  rules=sharding_lib.DEFAULT_RULES) -> jax.Array:
  """Log-probs [B, 1+Q, U] at the trie's nodes (prompt end, then inner nodes); prompts left-padded."""
  model = spec.merge(trainable, frozen)
  b, p = prompts_BxP.shape
  q = len(trie.node_tokens)
  sh = None if mesh is None else cache_lib.cache_sharding(spec.cfg, b, p + q, mesh, rules)
  valid_BxP, pos_BxP, _ = prompt_layout(lengths_B, p, "left")
  mask_BxPxP = jnp.tril(jnp.ones((p, p), bool))[None] & valid_BxP[:, None, :]
  cache = cache_lib.init_cache(spec.cfg, b, p + q, mesh, rules)
  x, cache = cache_lib.forward(model, cache, prompts_BxP, pos_BxP, 0, mask_BxPxP, prefill=True,
                               sharding=sh, last_B=jnp.full((b,), p - 1, jnp.int32))
  xs = [x]
  if q:
    tok_BxQ = jnp.broadcast_to(jnp.asarray(trie.node_tokens)[None], (b, q))
    pos_BxQ = lengths_B.astype(jnp.int32)[:, None] + jnp.asarray(trie.node_depth)[None] - 1
    tree_BxQxQ = jnp.broadcast_to(jnp.asarray(trie.ancestors)[None], (b, q, q))
    prompt_BxQxP = jnp.broadcast_to(valid_BxP[:, None, :], (b, q, p))
    mask = jnp.concatenate([prompt_BxQxP, tree_BxQxQ], axis=-1)
    x_tree, _ = cache_lib.forward(model, cache, tok_BxQ, pos_BxQ, p, mask, sharding=sh)
    xs.append(x_tree)
  logp = jax.nn.log_softmax(model.logits(jnp.concatenate(xs, axis=1)), axis=-1)
  return jnp.take(logp, jnp.asarray(trie.vocab), axis=-1)


class LocalJudge:
  """Scores judge prompts with a local chat model; one compiled function per prompt bucket."""

  def __init__(self, spec: ModelSpec, trainable: dict, frozen: dict, tokenizer, *, mesh: Mesh,
               batch_size: int, min_mass: float = MIN_MASS, rules=sharding_lib.DEFAULT_RULES,
               buckets: Sequence[int] = DEFAULT_BUCKETS, compiler_options: dict | None = None):
    self.spec, self.tokenizer, self.compiler_options = spec, tokenizer, compiler_options
    self.param_shardings = spec.shardings(mesh, rules)
    self.trainable, self.frozen = jax.device_put((trainable, frozen), self.param_shardings)
    self.mesh, self.rules, self.batch_size, self.min_mass = mesh, rules, batch_size, min_mass
    self.buckets = tuple(sorted(buckets))
    self.trie = NumberTrie.build(tokenizer)
    self.pad_id = tokenizer_pad_id(tokenizer)
    self.compile_count = 0
    self._compiled = {}

  def _fn(self, p: int):
    if p not in self._compiled:
      rows = NamedSharding(self.mesh, sharding_lib.logical_to_spec(
          ("batch", None), (self.batch_size, p), self.mesh, self.rules))
      rows1 = NamedSharding(self.mesh, P(*rows.spec[:1]))
      fn = lambda tr, fr, x, n: trie_logprobs(self.spec, tr, fr, x, n, self.trie, self.mesh,
                                              self.rules)
      jitted = jax.jit(fn, in_shardings=(*self.param_shardings, rows, rows1))
      b = self.batch_size
      self._compiled[p] = (jitted.lower(self.trainable, self.frozen,
                                        jax.ShapeDtypeStruct((b, p), jnp.int32),
                                        jax.ShapeDtypeStruct((b,), jnp.int32)).compile(
                                            self.compiler_options), rows, rows1)
      self.compile_count += 1
    return self._compiled[p]

  def logprobs(self, texts: Sequence[str]) -> list[np.ndarray]:
    """Trie log-probs [1+Q, U] for each judge prompt (sent as one user message)."""
    ids = [np.asarray(chat_prompt_ids(self.tokenizer, [{"role": "user", "content": t}]), np.int32)
           for t in texts]
    order = np.argsort([len(x) for x in ids], kind="stable")
    out: list[np.ndarray | None] = [None] * len(ids)
    for start in range(0, len(order), self.batch_size):
      idx = order[start:start + self.batch_size]
      p = bucket_length(max(len(ids[i]) for i in idx), self.buckets)
      fn, rows, rows1 = self._fn(p)
      tok = np.full((self.batch_size, p), self.pad_id, np.int32)
      lengths = np.ones((self.batch_size,), np.int32)
      for r, i in enumerate(idx):
        tok[r, p - len(ids[i]):], lengths[r] = ids[i], len(ids[i])
      res = np.asarray(jax.device_get(fn(self.trainable, self.frozen, jax.device_put(tok, rows),
                                         jax.device_put(lengths, rows1))))
      for r, i in enumerate(idx):
        out[i] = res[r]
    return out

  def judge_texts(self, texts: Sequence[str]) -> list[dict]:
    """{score, status, raw} per judge prompt; status "low_mass" when integers hold < min_mass."""
    out = []
    for lp in self.logprobs(texts):
      score, mass = self.trie.score(lp, self.min_mass)
      out.append({"score": score, "status": OK if score is not None else "low_mass",
                  "raw": f"mass={mass:.6f}"})
    return out

  def score_texts(self, texts: Sequence[str]) -> list[float | None]:
    """Scores 0..100 (None when the integers hold < min_mass) of formatted judge prompts."""
    return [r["score"] for r in self.judge_texts(texts)]


class LocalTextJudge:
  """The judge model writes its reply (greedy, at most max_tokens); the study's parser scores it."""

  def __init__(self, spec: ModelSpec, trainable: dict, frozen: dict, tokenizer, *, mesh: Mesh,
               batch_size: int, max_tokens: int = 20, stop_ids: Sequence[int] = (),
               rules=sharding_lib.DEFAULT_RULES, buckets: Sequence[int] = DEFAULT_BUCKETS,
               compiler_options: dict | None = None):
    from jaxlab.data.chat import end_of_turn_ids  # pylint: disable=g-import-not-at-top
    self.tokenizer, self.max_tokens = tokenizer, max_tokens
    self.sampler = Sampler(spec, trainable, frozen, mesh=mesh, batch_size=batch_size,
                           stop_ids=tuple(stop_ids) or tuple(end_of_turn_ids(tokenizer)),
                           pad_id=tokenizer_pad_id(tokenizer), rules=rules, buckets=buckets,
                           compiler_options=compiler_options)

  @property
  def compile_count(self) -> int:
    return self.sampler.compile_count

  def replies(self, texts: Sequence[str]) -> list[str]:
    """The judge's greedy reply to each prompt (sent as one user message), stop token cut."""
    ids = [chat_prompt_ids(self.tokenizer, [{"role": "user", "content": t}]) for t in texts]
    comps = self.sampler.generate(ids, seed=0, max_new_tokens=self.max_tokens, temperature=0.0)
    return self.sampler.decode(self.tokenizer, comps)

  def judge_texts(self, texts: Sequence[str]) -> list[dict]:
    out = []
    for reply in self.replies(texts):
      score, status = parse_text_score(reply)
      out.append({"score": score, "status": status, "raw": reply})
    return out

  def score_texts(self, texts: Sequence[str]) -> list[float | None]:
    return [r["score"] for r in self.judge_texts(texts)]
