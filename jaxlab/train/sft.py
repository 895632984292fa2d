"""The SFT step: a pure function (state, batch) -> (state, metrics).

Loss = sum of -log p over trained tokens / number of trained tokens in the
whole global batch. With gradient accumulation the batch is split into
micro-batches scanned in sequence; each micro-batch's token sum is divided by
the global token count, so the update equals the one of the full batch.
"""
from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

from jaxlab.models.params import ModelSpec
from jaxlab.train.losses import masked_nll_sum
from jaxlab.train.state import TrainState

Batch = dict[str, jax.Array]  # inputs, targets, positions, segment_ids, loss_mask: [B, L]


def split_microbatches(batch: Batch, n: int) -> Batch:
  """[B, ...] -> [n, B/n, ...] taking rows j, j+n, ... for micro-batch j (keeps data sharding)."""
  def split(x):
    b = x.shape[0]
    if b % n:
      raise ValueError(f"global batch {b} is not divisible by train.grad_accum={n}")
    return jnp.swapaxes(x.reshape(b // n, n, *x.shape[1:]), 0, 1)
  return jax.tree.map(split, batch)


def sft_loss_sum(spec: ModelSpec, params, frozen, batch: Batch) -> jax.Array:
  """Summed NLL of the trained tokens of `batch`."""
  model = spec.merge(params, frozen)
  logits = model(batch["inputs"], batch["positions"], batch["segment_ids"])
  return masked_nll_sum(logits, batch["targets"], batch["loss_mask"])


def make_train_step(optimizer: optax.GradientTransformation, schedule: optax.Schedule,
                    loss_sum_fn: Callable[..., jax.Array], grad_accum: int = 1):
  """Returns train_step(state, batch, *extra) -> (state, metrics) for any token-summed loss.

  `loss_sum_fn(params, frozen, batch, *extra)` returns the loss summed over the trained tokens
  of `batch` (those where batch["loss_mask"] is 1). `extra` carries what a channel needs beside
  the student: the distillation channels pass the frozen teacher params (and an RNG for
  on-policy sampling) here, and their batches may hold a teacher prompt that differs from the
  student's. No gradient flows into `extra`.
  """

  def train_step(state: TrainState, batch: Batch, *extra) -> tuple[TrainState, dict[str, Any]]:
    n_tokens = jnp.sum(batch["loss_mask"])
    denom = jnp.maximum(n_tokens, 1.0)
    grad_fn = jax.value_and_grad(
        lambda p, b: loss_sum_fn(p, state.frozen, b, *extra) / denom)
    if grad_accum == 1:
      loss, grads = grad_fn(state.params, batch)
    else:
      def micro(carry, mb):
        loss, grads = carry
        l, g = grad_fn(state.params, mb)
        return (loss + l, jax.tree.map(jnp.add, grads, g)), None
      zeros = jax.tree.map(jnp.zeros_like, state.params)
      (loss, grads), _ = jax.lax.scan(micro, (jnp.zeros(()), zeros),
                                      split_microbatches(batch, grad_accum))
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {"loss": loss, "trained_tokens": n_tokens, "grad_norm": optax.tree.norm(grads),
               "lr": schedule(state.step)}
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics

  return train_step


def make_sft_step(spec: ModelSpec, optimizer: optax.GradientTransformation,
                  schedule: optax.Schedule, grad_accum: int = 1):
  """Returns the SFT train_step(state, batch) -> (state, metrics)."""
  return make_train_step(optimizer, schedule, lambda p, f, b: sft_loss_sum(spec, p, f, b),
                         grad_accum)


def jit_step(step_fn, state_sh: TrainState, batch_sh, mesh):
  """jax.jit with explicit shardings and the state donated."""
  from jax.sharding import NamedSharding, PartitionSpec as P
  replicated = NamedSharding(mesh, P())
  return jax.jit(step_fn, in_shardings=(state_sh, batch_sh),
                 out_shardings=(state_sh, replicated), donate_argnums=(0,))
