"""The training loop (the runner's "loop" step): steps, metrics one step late, held-out KL,
checkpoints.

Writes WORKDIR/metrics.jsonl and tb/ (jaxlab.run_metrics.MetricsWriter) and the checkpoints
(jaxlab.checkpoint.Checkpointer). A step's metrics are fetched one step late, so the host never
waits on the device it just fed; a checkpointed step's metrics are on disk before its
checkpoint, so a killed and resumed run has every row.
"""
from __future__ import annotations

import math
import time

import jax
import jax.numpy as jnp

from jaxlab import sharding as sharding_lib
from jaxlab.run_metrics import MetricsWriter
from jaxlab.train import losses
from jaxlab.train.channels import common


class NonFiniteError(FloatingPointError):
  """The loss or gradient norm became NaN/Inf (train.on_nonfinite='stop')."""


def guard_nonfinite(step_fn, skip: bool):
  """With `skip`, a step whose loss or gradient norm is not finite keeps the previous params and
  optimizer state (the step counter still advances) and reports metrics["skipped"] = 1."""
  if not skip:
    return step_fn

  def guarded(state, batch, *extra):
    new, metrics = step_fn(state, batch, *extra)
    ok = jnp.isfinite(metrics["loss"]) & jnp.isfinite(metrics["grad_norm"])
    kept = jax.tree.map(lambda n, o: jnp.where(ok, n, o), new, state)
    return kept.replace(step=new.step), {**metrics, "skipped": 1 - ok.astype(jnp.int32)}
  return guarded


def _last_row(workdir, step: int) -> dict:
  """The metrics row logged at `step` (for counters that continue across a resume)."""
  from jaxlab.run_metrics import read_metrics
  rows = [r for r in read_metrics(workdir) if r["step"] <= step] if step else []
  return rows[-1] if rows else {}


def heldout_kl_fn(ctx: common.Context):
  """(params, frozen, teacher, batch) -> mean forward and reverse KL per completion token on a
  fixed held-out batch of teacher-generated completions (top-k forward KL from a cache)."""
  def fn(params, frozen, teacher, batch):
    model, xs = common.student_hidden(ctx, params, frozen, batch)
    mask = batch["loss_mask"]
    n = jnp.maximum(mask.sum(), 1.0)
    if teacher is None:
      d = losses.topk_forward_kl(model.logits(xs), batch["topk_ids"], batch["topk_logp"],
                                 ctx.temperature)
      return {"heldout_kl_forward_topk": (d * mask).sum() / n}
    tmodel, xt = common.teacher_hidden(ctx, teacher, batch)
    ls, lt = model.logits(xs), tmodel.logits(xt)
    return {"heldout_kl_forward": (losses.forward_kl(ls, lt, ctx.temperature) * mask).sum() / n,
            "heldout_kl_reverse": (losses.reverse_kl(ls, lt, ctx.temperature) * mask).sum() / n}
  return fn


def heldout_metrics_fn(ctx: common.Context, teacher, held_ids, held_batch, mesh, rules):
  """state -> held-out KL metrics on the fixed held-out rows (None: nothing to measure)."""
  heldout_fn = jax.jit(heldout_kl_fn(ctx))
  # Every host builds the same held-out rows, so each contributes only its share.
  per = len(held_ids) // jax.process_count()
  mine = {k: v[jax.process_index() * per:(jax.process_index() + 1) * per]
          for k, v in held_batch.items()}
  held_global = sharding_lib.host_local_to_global(mine, mesh, rules=rules)

  def metrics(state):
    out = jax.device_get(heldout_fn(state.params, state.frozen, teacher, held_global))
    return {k: float(v) for k, v in out.items()}
  return metrics


def train(config, workdir, state, start: int, step_fn, data, ckpt, config_json: str, *, kl,
          heldout, frozen_external: bool, mesh, rules):
  """Runs steps start..config.train.steps; returns (state, the last metrics row).
  `heldout`: state -> metrics or None; `kl`: the divergence, logged as loss_{kl} (None: not a
  distillation run)."""
  total = config.train.steps
  skip_nonfinite = config.train.get("on_nonfinite", "stop") == "skip"
  eval_every = int(config.get("distill", {}).get("eval_every", 0) or 0)
  writer = MetricsWriter(workdir, total, start, progress=config.train.progress)
  pending, last, t_last = None, {}, time.perf_counter()
  skipped = int(_last_row(workdir, start).get("skipped_steps", 0))
  heldout_metrics = heldout or (lambda state: {})

  if heldout is not None and start == 0:
    writer.write(0, heldout_metrics(state))

  def flush(pending):
    # Fetch one step late so the host never waits on the device it just fed.
    step, metrics, extra = pending
    metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
    nonlocal t_last
    now = time.perf_counter()
    metrics["trained_tokens_per_s"] = metrics["trained_tokens"] / max(now - t_last, 1e-9)
    t_last = now
    if kl is not None:
      metrics[f"loss_{kl}"] = metrics["loss"]
    nonlocal skipped
    finite = math.isfinite(metrics["loss"]) and math.isfinite(metrics.get("grad_norm", 0.0))
    if skip_nonfinite:
      skipped += int(metrics.pop("skipped"))
      metrics["skipped_steps"] = skipped
    if step % config.train.log_every == 0 or step == total or extra or not finite:
      writer.write(step, {**metrics, **data.metrics, **extra})
    else:
      writer.advance(step, metrics)
    if not finite and not skip_nonfinite:
      raise NonFiniteError(
          f"step {step}: loss {metrics['loss']}, grad_norm {metrics.get('grad_norm')}: the run "
          f"stopped (nothing non-finite is saved; last good checkpoint: step "
          f"{ckpt.latest_step()} in {ckpt.directory}). Lower optim.lr, check the data, or set "
          "--config.train.on_nonfinite=skip to drop such steps and count them")
    return metrics

  try:
    for step in range(start, total):
      batch = sharding_lib.host_local_to_global(next(data.batches), mesh, rules=rules)
      state, metrics = step_fn(state, batch)
      extra = heldout_metrics(state) if eval_every and ((step + 1) % eval_every == 0
                                                        or step + 1 == total) else {}
      if pending is not None:
        last = flush(pending)
      pending = (step + 1, metrics, extra)
      if ckpt.should_save(step + 1) or step + 1 == total:
        # Metrics of a checkpointed step are on disk before its checkpoint, so a killed
        # and resumed run has every row; a non-finite step stops here, before saving.
        last, pending = flush(pending), None
        writer.flush()
        ckpt.save(step + 1, state.replace(frozen={}) if frozen_external else state,
                  data.batches.get_state(), config_json, force=True)
    if pending is not None:
      last = flush(pending)
  finally:  # an error still leaves every finished checkpoint and metric row on disk
    ckpt.wait()
    ckpt.close()
    writer.close()
  return state, last
