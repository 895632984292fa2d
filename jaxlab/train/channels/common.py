"""What every channel shares: the context it runs in, prompt+completion forwards, chunked losses.

A channel is one small module with
  DATA_FORMATS: the rows it can train on, first the default: "packed" (chat/pretraining rows)
      and/or "prompt_completion" (jaxlab.data.prompt_completion; see channels.data_format)
  NEEDS_TEACHER: whether the run loads a teacher (config teacher.path)
  DEFAULT_KL: the divergence it uses unless config distill.kl names another
  USES_TOPK_CACHE: whether it can train on cached teacher top-k log-probs of the dataset's
      completions (config distill.topk > 0; jaxlab.train.topk_cache)
  SAMPLES: whether it draws student rollouts with the sampler (distill.sample_temperature,
      distill.top_p apply)
  SETTINGS: the distill settings it reads beyond the divergence ("estimator", "lmbda")
  prepare(ctx, params, frozen, teacher, batch, rng) -> (batch, metrics)
      what it computes without gradient (student rollouts, the gkd coin); the batch it returns
      has the final `loss_mask`, from which the step counts the token denominator
  loss_sum(ctx, params, frozen, teacher, batch) -> (loss summed over trained tokens, {name: sum})
      the {name: sum} values are summed over trained tokens too and reported per trained token.
`teacher` is a (trainable, frozen) pair of the teacher's params (or None); it is an argument of
the step, never part of the train state.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp

from jaxlab.models.params import ModelSpec


@dataclasses.dataclass(frozen=True)
class Context:
  """Static settings a channel reads (hashable: closed over by the jitted step)."""
  spec: ModelSpec
  teacher_spec: ModelSpec | None = None
  kl: str = "forward"            # forward | reverse | jsd
  beta: float = 0.5              # generalized JSD (TRL convention)
  temperature: float = 1.0       # divides both sides' logits in the divergence
  lmbda: float = 0.5             # gkd: probability that a batch is on-policy
  estimator: str = "exact"       # onpolicy: exact reverse KL | sampled (policy gradient)
  loss_chunk: int = 128          # completion positions per logits chunk (0: all at once)
  sample_temperature: float = 1.0
  top_p: float = 1.0
  stop_ids: tuple[int, ...] = ()
  pad_id: int = 0
  mesh: Any = None
  rules: Any = None


def sequence_inputs(prompt_BxP, prompt_len_B, completion_BxC):
  """tokens, positions, segment ids [B, P+C-1] of a left-padded prompt followed by a completion
  (its last token is never fed: nothing is predicted after it)."""
  b, p = prompt_BxP.shape
  tokens = jnp.concatenate([prompt_BxP, completion_BxC[:, :-1]], axis=1).astype(jnp.int32)
  col = jnp.arange(tokens.shape[1], dtype=jnp.int32)[None, :]
  offset = (p - prompt_len_B.astype(jnp.int32))[:, None]
  valid = col >= offset
  positions = jnp.where(valid, col - offset, 0)
  return tokens, positions, valid.astype(jnp.int32)


def completion_hidden(spec: ModelSpec, trainable, frozen, prompt_BxP, prompt_len_B,
                      completion_BxC) -> tuple[Any, jax.Array]:
  """(model, hidden [B, C, D]) where hidden[:, t] is the state that predicts completion[:, t]."""
  model = spec.merge(trainable, frozen)
  tokens, positions, segments = sequence_inputs(prompt_BxP, prompt_len_B, completion_BxC)
  x = model.hidden(tokens, positions, segments)
  p, c = prompt_BxP.shape[1], completion_BxC.shape[1]
  return model, x[:, p - 1:p - 1 + c]


def student_hidden(ctx: Context, params, frozen, batch):
  return completion_hidden(ctx.spec, params, frozen, batch["prompt"], batch["prompt_len"],
                           batch["completion"])


def teacher_hidden(ctx: Context, teacher, batch):
  """The teacher's states under its own prompt; no gradient flows into the teacher."""
  teacher = jax.lax.stop_gradient(teacher)
  return completion_hidden(ctx.teacher_spec, *teacher, batch["teacher_prompt"],
                           batch["teacher_prompt_len"], batch["completion"])


def chunked_sums(fn: Callable[..., dict[str, jax.Array]], chunk: int,
                 *arrays_BxC: jax.Array) -> dict[str, jax.Array]:
  """sum over chunks of fn(*chunk_arrays) along axis 1 (the completion positions).

  With chunk < C, the chunks run in a `lax.scan` whose body is rematerialised: each chunk's
  [B, chunk, V] logits exist only inside one iteration, forward and backward, so neither the
  student's nor the teacher's [B, C, V] float32 logits are ever held at once.
  """
  c = arrays_BxC[0].shape[1]
  if chunk <= 0 or chunk >= c:
    return fn(*arrays_BxC)
  n = -(-c // chunk)
  pad = n * chunk - c

  def split(x):
    # Padded positions carry a zero mask (every fn multiplies by the mask chunk).
    x = jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))
    return jnp.swapaxes(x.reshape(x.shape[0], n, chunk, *x.shape[2:]), 0, 1)

  @jax.checkpoint
  def body(carry, xs):
    out = fn(*xs)
    return jax.tree.map(jnp.add, carry, out), None

  zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype),
                       jax.eval_shape(fn, *(x[:, :min(chunk, c)] for x in arrays_BxC)))
  out, _ = jax.lax.scan(body, zeros, tuple(split(x) for x in arrays_BxC))
  return out


def completion_mask(lengths_B: jax.Array, c: int) -> jax.Array:
  """float32 [B, C]: 1 on the first lengths[b] positions."""
  return (jnp.arange(c)[None, :] < lengths_B[:, None]).astype(jnp.float32)


def rollout(ctx: Context, params, frozen, batch, rng):
  """The batch with its completion replaced by the student's own samples (no gradient), and
  the sampling metrics."""
  from jaxlab.sample.sampler import sample
  c = batch["completion"].shape[1]
  params, frozen = jax.lax.stop_gradient((params, frozen))
  out = sample(ctx.spec, params, frozen, batch["prompt"], batch["prompt_len"], rng,
               max_new_tokens=c, temperature=ctx.sample_temperature, top_p=ctx.top_p,
               stop_ids=ctx.stop_ids, pad_id=ctx.pad_id, padding="left", mesh=ctx.mesh,
               rules=ctx.rules)
  mask = completion_mask(out.lengths, c)
  metrics = {"sample_len": jnp.mean(out.lengths.astype(jnp.float32)),
             "sample_hit_limit": jnp.mean((~out.stopped).astype(jnp.float32))}
  return {**batch, "completion": out.tokens, "loss_mask": mask}, metrics
