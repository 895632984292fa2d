"""The training step of every channel: a pure function step(state, batch, teacher) -> (state, metrics).

1. The step's RNG is fold_in(state.rng, state.step), so a resumed run draws exactly what the
   straight run would have; micro-batch j of gradient accumulation draws fold_in(that, j).
2. The channel prepares every micro-batch without gradient (student rollouts, the gkd coin);
   only then is the token denominator counted, because an on-policy mask exists only after
   sampling.
3. Gradients of (token-summed loss / global token count) are accumulated over the micro-batches
   (a scan), so grad_accum=k gives the update of one batch k times larger.
The teacher is an argument, never part of the state: frozen (stop_gradient), not donated, not
checkpointed, no optimizer state.
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax

from jaxlab.train.channels.common import Context
from jaxlab.train.state import TrainState

Batch = dict[str, jax.Array]


def split_microbatches(batch: Batch, n: int) -> Batch:
  """[B, ...] -> [n, B/n, ...] taking rows j, j+n, ... for micro-batch j (keeps data sharding)."""
  def split(x):
    b = x.shape[0]
    if b % n:
      raise ValueError(f"global batch {b} is not divisible by train.grad_accum={n}")
    return jnp.swapaxes(x.reshape(b // n, n, *x.shape[1:]), 0, 1)
  return jax.tree.map(split, batch)


def step_rng(state: TrainState) -> jax.Array:
  return jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)


def _scan(f, init, xs):
  return jax.lax.scan(f, init, xs)


def _call_once(f, init, xs):
  """lax.scan over a leading axis of size 1, without the loop (keeps grad_accum=1 lean)."""
  carry, y = f(init, jax.tree.map(lambda x: x[0], xs))
  return carry, jax.tree.map(lambda a: a[None], y)


def make_step(channel, ctx: Context, optimizer: optax.GradientTransformation,
              schedule: optax.Schedule, grad_accum: int = 1):
  """Returns step(state, batch, teacher=None) -> (state, metrics) for `channel`."""

  def step(state: TrainState, batch: Batch, teacher=None) -> tuple[TrainState, dict[str, Any]]:
    rng = step_rng(state)
    mbs = split_microbatches(batch, grad_accum)

    def prep(_, xs):
      j, mb = xs
      return None, channel.prepare(ctx, state.params, state.frozen, teacher, mb,
                                   jax.random.fold_in(rng, j))
    scan = _scan if grad_accum > 1 else _call_once
    _, (mbs, prep_metrics) = scan(prep, None, (jnp.arange(grad_accum), mbs))
    n_tokens = jnp.sum(mbs["loss_mask"])
    denom = jnp.maximum(n_tokens, 1.0)

    def loss_fn(params, mb):
      total, aux = channel.loss_sum(ctx, params, state.frozen, teacher, mb)
      return total / denom, jax.tree.map(lambda a: a / denom, aux)
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def micro(carry, mb):
      (loss, aux), grads = grad_fn(state.params, mb)
      return jax.tree.map(jnp.add, carry, (loss, aux, grads)), None
    zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype),
                         jax.eval_shape(grad_fn, state.params, jax.tree.map(lambda x: x[0], mbs)))
    zeros = (zeros[0][0], zeros[0][1], zeros[1])
    (loss, aux, grads), _ = scan(micro, zeros, mbs)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {"loss": loss, "trained_tokens": n_tokens, "grad_norm": optax.tree.norm(grads),
               "lr": schedule(state.step), **aux,
               **jax.tree.map(lambda m: jnp.mean(m, axis=0), prep_metrics)}
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics

  return step


def jit_step(step_fn, state_sh: TrainState, batch_sh, mesh, teacher_sh=None, *,
             with_teacher: bool = True):
  """jax.jit with explicit shardings; the state is donated, the teacher never is.

  step_fn(state, batch, teacher); with_teacher=False: step_fn(state, batch), a step without a
  teacher argument (jaxlab.train.sft_step.make_sft_step).
  """
  from jax.sharding import NamedSharding, PartitionSpec as P
  replicated = NamedSharding(mesh, P())
  in_shardings = (state_sh, batch_sh, teacher_sh) if with_teacher else (state_sh, batch_sh)
  return jax.jit(step_fn, in_shardings=in_shardings,
                 out_shardings=(state_sh, replicated), donate_argnums=(0,))
