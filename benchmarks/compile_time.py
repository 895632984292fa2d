"""Train-step compile time against depth, layers unrolled vs under `lax.scan`; spec build time.

  python benchmarks/compile_time.py [--layers 32,64] [--d-model 256] [--remat-policy full] \
      [--step-layers 4] [--spec-preset qwen2.5-32b] [--out results.json]
  python benchmarks/compile_time.py --hf_path runs/models/smollm2-135m-instruct [--out F]

`--hf_path DIR` measures a real HF model instead (its config.json and weights, loaded with
`load_hf` unrolled and scanned, the default for HF folders): the sampler's compilation for
one prompt bucket (`Sampler`, batch `--hf_batch`, prompts of `--hf_prompt` tokens,
`--hf_new_tokens` new tokens) and the LoRA train step's (r 32, alpha 64, rsLoRA on all
projections, float32 adapters, batch `--hf_train_batch` x `--hf_train_len`), each split into
trace, lowering (jaxpr -> StableHLO) and XLA compile from JAX's own compile-time events.

For each depth and layout a fresh child process (no warm caches; JAX's persistent compilation
cache is off) builds the abstract spec (`model_spec`), the SFT train step exactly as the runner
does (`sft.make_sft_step` + `step.jit_step`: explicit shardings, donated state, AdamW), and times
`lower` (trace + StableHLO) and `compile` (XLA) separately on abstract inputs. Sizes: d_model
`--d-model`, 4 heads / 2 kv heads, d_ff 2.75 x d_model, vocab 1024, batch 2 x 128, float32.
`--step-layers K` also runs a K-layer model of that width for a few steps in both layouts
(median step seconds), to choose the layout of small CPU configs. `--spec-preset` times
`model_spec` of a real model (abstract: no weights) in both layouts, best of 3.
CPU is shared on the dev machine: the load average is printed with the figures.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)


def _model(n_layers: int, d_model: int, scan: bool, policy: str):
  from jaxlab.models import ModelConfig
  return ModelConfig(vocab_size=1024, d_model=d_model, n_layers=n_layers, n_heads=4,
                     n_kv_heads=2, d_ff=int(d_model * 2.75), scan_layers=scan,
                     remat_policy=policy)


def child(job: dict) -> dict:
  """One measurement in this (fresh) process."""
  import jax
  import numpy as np

  from jaxlab import sharding
  from jaxlab.models import presets
  from jaxlab.models.params import model_spec
  from jaxlab.train import state as state_lib

  if job["kind"] == "hf":
    return _hf_child(job)
  if job["kind"] == "spec":
    cfg = presets.get_preset(job["preset"]).replace(scan_layers=job["scan"])
    times = []
    for _ in range(3):
      t0 = time.perf_counter()
      spec = model_spec(cfg)
      times.append(time.perf_counter() - t0)
    n = sum(int(np.prod(a.shape)) for a in jax.tree.leaves(spec.abstract))
    return {"spec_s": times, "n_params": n}

  cfg = _model(job["layers"], job["d_model"], job["scan"], job["policy"])
  t0 = time.perf_counter()
  spec = model_spec(cfg)
  spec_s = time.perf_counter() - t0
  mesh = sharding.make_mesh((1, 1, 1), jax.devices()[:1])
  b, l = 2, 128
  step, state, batch, opt = _abstract_sft_step(spec, mesh, b, l)
  t0 = time.perf_counter()
  lowered = step.lower(state, batch)
  lower_s = time.perf_counter() - t0
  t0 = time.perf_counter()
  compiled = lowered.compile()
  compile_s = time.perf_counter() - t0
  out = {"spec_s": spec_s, "lower_s": lower_s, "compile_s": compile_s}
  if job.get("steps"):
    rng = np.random.default_rng(0)
    toks = rng.integers(0, cfg.vocab_size, (b, l + 1)).astype(np.int32)
    host = {"inputs": toks[:, :-1], "targets": toks[:, 1:],
            "positions": np.tile(np.arange(l, dtype=np.int32), (b, 1)),
            "segment_ids": np.ones((b, l), np.int32), "loss_mask": np.ones((b, l), np.float32)}
    real = {k: jax.device_put(v, batch[k].sharding) for k, v in host.items()}
    st = state_lib.create_state(spec, opt, mesh, sharding.DEFAULT_RULES, seed=0)
    times = []
    for _ in range(job["steps"] + 1):
      t0 = time.perf_counter()
      st, m = compiled(st, real)
      jax.block_until_ready(m)
      times.append(time.perf_counter() - t0)
    out["step_s"] = float(np.median(times[1:]))
  return out


def _abstract_sft_step(spec, mesh, b: int, l: int):
  """(jitted SFT step as the runner builds it, abstract state, abstract [b, l] batch,
  optimizer) of `spec` on `mesh`: what lowering and compiling need, no weights."""
  import jax
  import ml_collections
  import numpy as np

  from jaxlab import sharding
  from jaxlab.train import optim, sft_step
  from jaxlab.train import step as step_lib
  from jaxlab.train import state as state_lib
  ocfg = ml_collections.ConfigDict(dict(
      lr=1e-4, warmup_steps=0, decay="constant", end_ratio=1.0, weight_decay=0.01,
      clip_norm=1.0, b1=0.9, b2=0.999, eps=1e-8))
  opt, sched = optim.make_optimizer(ocfg, 1000)
  state_sh = state_lib.state_shardings(spec, opt, mesh, sharding.DEFAULT_RULES)
  keys = ("inputs", "targets", "positions", "segment_ids", "loss_mask")
  batch_sh = {k: sharding.batch_sharding(mesh, 2) for k in keys}
  step = step_lib.jit_step(sft_step.make_sft_step(spec, opt, sched), state_sh, batch_sh, mesh,
                           with_teacher=False)
  state = state_lib.abstract_state(spec, opt, state_sh)
  dt = {"loss_mask": np.float32}
  batch = {k: jax.ShapeDtypeStruct((b, l), dt.get(k, np.int32), sharding=batch_sh[k])
           for k in keys}
  return step, state, batch, opt


# JAX's compile-time events (jax.monitoring) -> the phase they time.
_PHASES = {"/jax/core/compile/jaxpr_trace_duration": "trace",
           "/jax/core/compile/jaxpr_to_mlir_module_duration": "lower",
           "/jax/core/compile/backend_compile_duration": "compile"}


def _hf_child(job: dict) -> dict:
  """Sampler and LoRA train-step compile times of the HF model job["hf_path"] in one layout."""
  import jax

  from jaxlab import sharding
  from jaxlab.data.chat import end_of_turn_ids, pad_id
  from jaxlab.models.config import LoraConfig
  from jaxlab.models.hf import load_hf
  from jaxlab.models.hf_tokenizer import load_tokenizer
  from jaxlab.models.params import model_spec
  from jaxlab.sample.engine import Sampler

  events: dict[str, float] = {}

  def listen(name, secs, **_):
    if name in _PHASES:
      events[_PHASES[name]] = events.get(_PHASES[name], 0.0) + secs
  jax.monitoring.register_event_duration_secs_listener(listen)

  def timed(fn) -> dict:
    events.clear()
    t0 = time.perf_counter()
    fn()
    return {"wall_s": time.perf_counter() - t0, **{k: events.get(k, 0.0) for k in
                                                   ("trace", "lower", "compile")}}

  mesh = sharding.make_mesh((1, 1, 1), jax.devices()[:1])
  tok = load_tokenizer(job["hf_path"])
  cfg, tr, fr = load_hf(job["hf_path"], mesh, scan_layers=job["scan"])
  out = {"n_layers": cfg.n_layers}
  b, p, new = job["batch"], job["prompt"], job["new_tokens"]
  sampler = Sampler(model_spec(cfg), tr, fr, mesh=mesh, batch_size=b,
                    stop_ids=end_of_turn_ids(tok), pad_id=pad_id(tok), buckets=(p,))
  out["sampler"] = timed(lambda: sampler._fn(p, new, 1.0, 1.0, 0, 1))  # what generate compiles
  del sampler, tr, fr

  lora = LoraConfig(rank=32, alpha=64.0, rslora=True)
  lcfg, _, _ = load_hf(job["hf_path"], mesh, lora=lora, trainable_dtype="float32",
                       scan_layers=job["scan"])
  step, state, batch, _ = _abstract_sft_step(model_spec(lcfg), mesh, job["train_batch"],
                                             job["train_len"])
  out["train_step"] = timed(lambda: step.lower(state, batch).compile())
  return out


def _hf_main(args, results: dict) -> None:
  print(f"{args.hf_path}: sampler batch {args.hf_batch} x prompt {args.hf_prompt} + "
        f"{args.hf_new_tokens} new tokens; LoRA r32 train step batch {args.hf_train_batch} x "
        f"{args.hf_train_len}; seconds (trace / lower / XLA compile / wall); "
        f"load average {os.getloadavg()[0]:.2f}")
  for scan in (False, True):
    load = os.getloadavg()
    r = _run_child({"kind": "hf", "hf_path": args.hf_path, "scan": scan,
                    "batch": args.hf_batch, "prompt": args.hf_prompt,
                    "new_tokens": args.hf_new_tokens, "train_batch": args.hf_train_batch,
                    "train_len": args.hf_train_len})
    r.update(scan=scan, load_before=load, load_after=os.getloadavg())
    results.setdefault("hf", []).append(r)
    line = " | ".join(f"{what} {r[what]['trace']:.1f} / {r[what]['lower']:.1f} / "
                      f"{r[what]['compile']:.1f} / {r[what]['wall_s']:.1f}"
                      for what in ("sampler", "train_step"))
    print(f"{r['n_layers']} layers {'scanned' if scan else 'unrolled':>8}: {line}  "
          f"(load average {load[0]:.2f} before, {r['load_after'][0]:.2f} after)", flush=True)


def _run_child(job: dict) -> dict:
  env = dict(os.environ, JAXLAB_COMPILE_CACHE="off")
  proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", json.dumps(job)],
                        env=env, capture_output=True, text=True, check=False)
  if proc.returncode:
    raise RuntimeError(f"child {job} failed:\n{proc.stderr[-3000:]}")
  return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv=None) -> dict:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--layers", default="32,64")
  p.add_argument("--d-model", type=int, default=256)
  p.add_argument("--remat-policy", default="full")
  p.add_argument("--step-layers", type=int, default=0)
  p.add_argument("--steps", type=int, default=5)
  p.add_argument("--spec-preset", default="qwen2.5-32b")
  p.add_argument("--out", default="")
  p.add_argument("--child", default="")
  p.add_argument("--hf_path", default="", help="a real HF model folder (see the docstring)")
  p.add_argument("--hf_batch", type=int, default=16)
  p.add_argument("--hf_prompt", type=int, default=128)
  p.add_argument("--hf_new_tokens", type=int, default=64)
  p.add_argument("--hf_train_batch", type=int, default=8)
  p.add_argument("--hf_train_len", type=int, default=384)
  args = p.parse_args(argv)
  if args.child:
    print(json.dumps(child(json.loads(args.child))))
    return {}
  results = {"load_before": os.getloadavg(), "rows": []}
  if args.hf_path:
    _hf_main(args, results)
    if args.out:
      with open(args.out, "w", encoding="utf-8") as f:
        json.dump(results, f, indent=2)
    return results
  print(f"train step, d_model {args.d_model}, remat {args.remat_policy}, batch 2x128, float32; "
        f"load average {os.getloadavg()[0]:.2f}")
  print(f"{'layers':>6} {'layout':>8} {'spec s':>7} {'lower s':>8} {'compile s':>9} "
        f"{'total s':>8} {'step s':>7}")
  depths = [int(x) for x in args.layers.split(",") if x]
  jobs = [(n, 0) for n in depths] + ([(args.step_layers, args.steps)] if args.step_layers else [])
  for n, steps in jobs:
    for scan in (False, True):
      r = _run_child({"kind": "step", "layers": n, "d_model": args.d_model, "scan": scan,
                      "policy": args.remat_policy, "steps": steps})
      r.update(layers=n, scan=scan, load=os.getloadavg()[0])
      results["rows"].append(r)
      total = r["lower_s"] + r["compile_s"]
      step = f"{r['step_s']:7.3f}" if "step_s" in r else f"{'-':>7}"
      print(f"{n:>6} {'scanned' if scan else 'unrolled':>8} {r['spec_s']:7.2f} "
            f"{r['lower_s']:8.2f} {r['compile_s']:9.2f} {total:8.2f} {step}  "
            f"(load {r['load']:.2f})", flush=True)
  if args.spec_preset:
    for scan in (False, True):
      r = _run_child({"kind": "spec", "preset": args.spec_preset, "scan": scan})
      r.update(preset=args.spec_preset, scan=scan, load=os.getloadavg()[0])
      results.setdefault("spec", []).append(r)
      print(f"model_spec({args.spec_preset}, scan_layers={scan}): best {min(r['spec_s']):.3f} s "
            f"of {', '.join(f'{t:.3f}' for t in r['spec_s'])} ({r['n_params']:,} params; "
            f"load {r['load']:.2f})", flush=True)
  if args.out:
    with open(args.out, "w", encoding="utf-8") as f:
      json.dump(results, f, indent=2)
  return results


if __name__ == "__main__":
  main()
