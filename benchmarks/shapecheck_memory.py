"""The shape check's per-device memory estimate against a real CPU training run's peak memory.

  python benchmarks/shapecheck_memory.py [--remat] [--layers 4] [--d-model 512] [--batch 8] \
      [--seq-len 512] [--vocab 8192] [--steps 3]

One process, one CPU device: builds a float32 model like configs/sft.py's, runs
`jaxlab.shapecheck.check_train` on it (the estimate: params + grads + AdamW + activations), then
compiles the jitted, donated SFT step, and only then records the resident set (the baseline:
runtime, compiler, code). It creates the train state and runs `--steps` steps while a thread
samples VmRSS every millisecond; measured = peak RSS - baseline (state + batch + XLA's temp
buffer). glibc's mmap threshold is pinned (MALLOC_MMAP_THRESHOLD_, set before the process
starts) so large freed blocks go back to the kernel and RSS follows live memory. XLA's own
buffer assignment (compiled.memory_analysis(): arguments + temporaries) is printed as a third
figure.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time

GiB = 2**30


def _rss() -> int:
  with open("/proc/self/status") as f:
    for line in f:
      if line.startswith("VmRSS:"):
        return int(line.split()[1]) * 1024
  raise RuntimeError("no VmRSS in /proc/self/status")


def child(args) -> dict:
  import jax
  import jax.numpy as jnp
  import ml_collections
  import numpy as np
  from jaxlab import shapecheck, sharding
  from jaxlab.models.config import ModelConfig
  from jaxlab.models.params import model_spec
  from jaxlab.train import optim, sft_step
  from jaxlab.train import step as step_lib
  from jaxlab.train import state as state_lib

  cfg = ModelConfig(vocab_size=args.vocab, d_model=args.d_model, n_layers=args.layers,
                    n_heads=8, n_kv_heads=4, d_ff=int(args.d_model * 2.75), remat=args.remat)
  config = ml_collections.ConfigDict(dict(
      optim=dict(lr=1e-4, warmup_steps=1, decay="linear", end_ratio=0.0, weight_decay=0.01,
                 clip_norm=1.0, b1=0.9, b2=0.95, eps=1e-8),
      train=dict(steps=args.steps, global_batch_size=args.batch, grad_accum=1),
      data=dict(seq_len=args.seq_len), mesh=dict(shape=(1, 1, 1), rules={})))
  report = shapecheck.check_train(config, cfg, shapecheck.parse_accelerator("cpu"), (1, 1, 1),
                                  lower=False)
  mesh = sharding.make_mesh((1, 1, 1))
  rules = sharding.DEFAULT_RULES
  spec = model_spec(cfg)
  optimizer, schedule = optim.make_optimizer(config.optim, args.steps)
  state_sh = state_lib.state_shardings(spec, optimizer, mesh, rules)
  batch_sh = {k: sharding.batch_sharding(mesh, 2, rules=rules)
              for k in ("inputs", "targets", "positions", "segment_ids", "loss_mask")}
  step = step_lib.jit_step(sft_step.make_sft_step(spec, optimizer, schedule), state_sh, batch_sh, mesh,
                           with_teacher=False)
  shape = (args.batch, args.seq_len)
  rng = np.random.default_rng(0)
  batch = {"inputs": rng.integers(0, args.vocab, shape, dtype=np.int32),
           "targets": rng.integers(0, args.vocab, shape, dtype=np.int32),
           "positions": np.broadcast_to(np.arange(args.seq_len, dtype=np.int32), shape).copy(),
           "segment_ids": np.ones(shape, np.int32), "loss_mask": np.ones(shape, np.float32)}
  abstract = state_lib.abstract_state(spec, optimizer, state_sh)
  batch_abs = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=batch_sh[k])
               for k, v in batch.items()}
  compiled = step.lower(abstract, batch_abs).compile()
  ma = compiled.memory_analysis()
  xla = ma.argument_size_in_bytes + ma.temp_size_in_bytes + ma.output_size_in_bytes \
      - ma.alias_size_in_bytes

  time.sleep(0.5)
  base = _rss()
  peak = [base]
  stop = threading.Event()

  def sample():
    while not stop.is_set():
      peak[0] = max(peak[0], _rss())
      time.sleep(0.001)
  t = threading.Thread(target=sample, daemon=True)
  t.start()
  state = state_lib.create_state(spec, optimizer, mesh, rules, seed=0)
  gbatch = {k: jax.device_put(v, batch_sh[k]) for k, v in batch.items()}
  for _ in range(args.steps):
    state, metrics = compiled(state, gbatch)
    jax.block_until_ready(metrics)
  stop.set()
  t.join()
  measured = peak[0] - base
  return {"model": {"layers": args.layers, "d_model": args.d_model, "vocab": args.vocab,
                    "batch": args.batch, "seq_len": args.seq_len, "remat": args.remat},
          "estimate": report.per_device, "estimate_total": report.total,
          "measured_peak_minus_baseline": measured, "xla_memory_analysis": xla,
          "ratio_estimate_over_measured": report.total / measured,
          "ratio_estimate_over_xla": report.total / xla,
          "loss": float(metrics["loss"])}


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--layers", type=int, default=4)
  p.add_argument("--d-model", type=int, default=512)
  p.add_argument("--vocab", type=int, default=8192)
  p.add_argument("--batch", type=int, default=8)
  p.add_argument("--seq-len", type=int, default=512)
  p.add_argument("--steps", type=int, default=3)
  p.add_argument("--remat", action="store_true")
  p.add_argument("--child", action="store_true")
  args = p.parse_args()
  if args.child:
    print(json.dumps(child(args)))
    return
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "MALLOC_MMAP_THRESHOLD_": "131072",
         "MALLOC_TRIM_THRESHOLD_": "131072", "JAXLAB_HOST_MALLOC": "default"}
  out = subprocess.run([sys.executable, __file__, "--child", *sys.argv[1:]], env=env,
                       capture_output=True, text=True, check=True)
  r = json.loads(out.stdout.strip().splitlines()[-1])
  print(json.dumps(r, indent=1))
  print(f"estimate {r['estimate_total'] / GiB:.3f} GiB, measured peak "
        f"{r['measured_peak_minus_baseline'] / GiB:.3f} GiB (ratio "
        f"{r['ratio_estimate_over_measured']:.2f}), XLA buffer assignment "
        f"{r['xla_memory_analysis'] / GiB:.3f} GiB (ratio {r['ratio_estimate_over_xla']:.2f})")


if __name__ == "__main__":
  main()
