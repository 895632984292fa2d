"""The worker pool of a study: chains of stages run in parallel processes (config.workers).

Each worker is a spawned process with its own JAX runtime; its stages write their folders
(jaxlab.pipelines.stages) exactly as they would here, so where a stage runs changes nothing.
"""
from __future__ import annotations

import json

import ml_collections
from etils import epath

from jaxlab import console
from jaxlab.pipelines import stages
from jaxlab.pipelines.stages import completed_with, stderr_log


def _run_chain(config_json: str, workdir: str, chain, stage_fn, jax_flags: dict,
               plan=None) -> None:
  """A worker process: its own JAX runtime (with the parent's numerics flags), then the
  chain's stages in order, numbered by the parent's plan; whole lines only on the console
  (jaxlab.console.worker_mode)."""
  from jaxlab import runtime
  runtime.setup()
  import jax
  console.worker_mode()
  if plan is not None:
    stages.Plan.resume(plan)
  for k, v in jax_flags.items():
    jax.config.update(k, v)
  run_stages(ml_collections.ConfigDict(json.loads(config_json)), epath.Path(workdir), chain,
             stage_fn, stderr_log)


def run_stages(config, workdir: epath.Path, chain, stage_fn, log) -> None:
  """A chain's stages in order, here (each skipped when complete)."""
  for name, settings, kind, kw in chain:
    stages.run_stage(workdir, name, settings, stage_fn(config, workdir, kind, kw), log=log)


# JAX settings that change numerics: a worker takes the parent's, so where a stage runs does
# not change its result (e.g. the tests' float32 matmul precision).
_WORKER_FLAGS = ("jax_default_matmul_precision", "jax_enable_x64")


def run_parallel(config, workdir: epath.Path, chains, stage_fn, log) -> None:
  """Runs chains of stages (each chain in order), `config.workers` chains at once.

  A chain is a list of (stage name, settings, kind, keyword arguments); stage_fn(config,
  workdir, kind, kwargs) -> fn(folder) is a module-level function (a worker process imports it
  by name), so a chain carries only plain values.

  The tiny models use about one core each (their XLA ops are too small to spread), so on
  a CPU host two independent trainings in two processes take the time of one. Each worker
  is a fresh spawned process with its own JAX runtime (no state shared with this one but the
  persistent compilation cache); a stage already complete is skipped there as here. With
  workers = 1 (accelerators: one process owns the devices) the chains run here, in order.
  """
  todo = [ch for ch in chains
          if not all(completed_with(workdir / name, settings) for name, settings, _, _ in ch)]
  # A settings check (--plan) walks every chain here, in order, running nothing.
  workers = 1 if stages.checking() else min(int(config.get("workers", 1)), len(todo))
  for chain in chains:  # all of them here with one worker; else the finished ones log a skip
    if workers <= 1 or chain not in todo:
      run_stages(config, workdir, chain, stage_fn, log)
  if workers <= 1:
    return
  import concurrent.futures
  import multiprocessing
  log(f"jaxlab: {len(todo)} stage chain(s) in {workers} worker processes")
  with concurrent.futures.ProcessPoolExecutor(
      workers, mp_context=multiprocessing.get_context("spawn")) as pool:
    import jax
    flags = {k: getattr(jax.config, k) for k in _WORKER_FLAGS}
    plan = stages.active_plan()
    futures = [pool.submit(_run_chain, config.to_json(), str(workdir), ch, stage_fn, flags,
                           plan.state() if plan else None) for ch in todo]
    for fut in futures:
      fut.result()  # a failed stage raises here, naming itself
  if plan is not None:
    log(f"jaxlab: {len(todo)} stage chain(s) done; {plan.progress()}")
