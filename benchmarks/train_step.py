"""SFT step throughput: jaxlab's jitted, donated train step against an equivalent PyTorch loop.

  python benchmarks/train_step.py [--steps 6] [--rounds 1] [--alloc both] [--out results.json]

Same shapes on both sides (defaults: 4 layers, d_model 512, 8 heads / 8 kv heads, MLP 1376,
vocab 8192, batch 8, length 512, float32) and the same math: full causal attention, full-vocab
softmax cross-entropy averaged over every token of the batch (loss mask all ones), AdamW on all
parameters (weight decay on matrices only, on both sides), no gradient clipping unless --clip.

* jaxlab: `make_sft_step` + `jit_step` (explicit shardings, donated state) on a 1-device mesh.
* PyTorch: transformers' `LlamaForCausalLM` (untied head), `torch.optim.AdamW`, a plain loop of
  forward(labels -> loss), backward, step, zero_grad, `torch.set_num_threads(--threads)`.
  Both attention implementations ("sdpa", "eager") are timed; the faster is the reference.

Each configuration runs in its own child process, one after the other (never two at once, so
neither framework's thread pool competes with the other's), `--rounds` times interleaved. Each
child also measures its framework's float32 matmul peak (best of several n x n products,
FLOPs = 2 n^3); the peak used for MFU is the largest measured. MFU = flops_per_token(cfg,
length) * tokens/s / peak, with jaxlab's `jaxlab.models.config.flops_per_token` (6N + attention,
the causal half not subtracted). tokens/s uses the median step time (robust to a noisy
neighbour); the best step is reported too.

Host allocator (`--alloc`): XLA:CPU allocates one temp buffer per step (about 1.7 GB here) and
glibc by default serves it from a fresh mmap every time: ~420k page faults a step. jaxlab's
entry points call `jaxlab.runtime.setup()`, which on the CPU backend turns that off with
`mallopt` (no mmap for big blocks, no trim, one arena; see jaxlab/runtime.py), so "tuned" is
how jaxlab ships and the jaxlab child calls exactly that. "default" runs jaxlab with
JAXLAB_HOST_MALLOC=default (stock glibc). PyTorch ships with stock glibc ("default"); its
"tuned" child gets the same settings (plus transparent huge pages) through
GLIBC_TUNABLES=TUNED_GLIBC, so like-for-like allocators can be compared too. Ratios printed:
jaxlab as shipped vs PyTorch as shipped, and tuned vs tuned, default vs default.
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

TUNED_GLIBC = ("glibc.malloc.hugetlb=1:glibc.malloc.arena_max=1:glibc.malloc.mmap_max=0:"
               "glibc.malloc.trim_threshold=100000000000")

SIZES = dict(n_layers=4, d_model=512, n_heads=8, n_kv_heads=8, d_ff=1376, vocab=8192,
             batch=8, length=512)


def _batch_np(sizes, seed=0):
  import numpy as np
  rng = np.random.default_rng(seed)
  toks = rng.integers(0, sizes["vocab"], (sizes["batch"], sizes["length"] + 1)).astype(np.int32)
  return toks[:, :-1], toks[:, 1:]


def _timeit(fn, sync, warmup, steps):
  """Runs fn warmup times, then `steps` timed calls; returns (per-step seconds, first-call s)."""
  t0 = time.perf_counter()
  sync(fn())
  first = time.perf_counter() - t0
  for _ in range(warmup - 1):
    sync(fn())
  times = []
  for _ in range(steps):
    t0 = time.perf_counter()
    sync(fn())
    times.append(time.perf_counter() - t0)
  return times, first


# ----------------------------------------------------------------------------------- jaxlab


def jax_matmul_peak(sizes=(2048, 3072), repeats=5):
  import jax
  import jax.numpy as jnp
  best = 0.0
  for n in sizes:
    ka, kb = jax.random.split(jax.random.key(n))
    a = jax.random.normal(ka, (n, n), jnp.float32)
    b = jax.random.normal(kb, (n, n), jnp.float32)
    f = jax.jit(lambda a, b: jnp.dot(a, b, precision="highest"))
    f(a, b).block_until_ready()
    for _ in range(repeats):
      t0 = time.perf_counter()
      f(a, b).block_until_ready()
      best = max(best, 2 * n**3 / (time.perf_counter() - t0))
  return best


def run_jax(args, sizes):
  from jaxlab import runtime
  setup = runtime.setup()  # what jaxlab.main does first: the host allocator on CPU
  import jax
  import ml_collections
  import numpy as np

  from jaxlab import sharding
  from jaxlab.models import ModelConfig
  from jaxlab.models.config import flops_per_token, num_params
  from jaxlab.models.params import model_spec
  from jaxlab.train import optim, sft_step
  from jaxlab.train import step as step_lib
  from jaxlab.train import state as state_lib

  cfg = ModelConfig(vocab_size=sizes["vocab"], d_model=sizes["d_model"],
                    n_layers=sizes["n_layers"], n_heads=sizes["n_heads"],
                    n_kv_heads=sizes["n_kv_heads"], d_ff=sizes["d_ff"], norm_eps=1e-6,
                    dtype="float32", param_dtype="float32")
  mesh = sharding.make_mesh((1, 1, 1), jax.devices()[:1])
  spec = model_spec(cfg)
  ocfg = ml_collections.ConfigDict(dict(
      lr=1e-4, warmup_steps=0, decay="constant", end_ratio=1.0, weight_decay=0.01,
      clip_norm=1.0 if args.clip else 0.0, b1=0.9, b2=0.999, eps=1e-8))
  opt, sched = optim.make_optimizer(ocfg, 1000)
  state_sh = state_lib.state_shardings(spec, opt, mesh, sharding.DEFAULT_RULES)
  inputs, targets = _batch_np(sizes)
  b, l = inputs.shape
  host = {"inputs": inputs, "targets": targets,
          "positions": np.tile(np.arange(l, dtype=np.int32), (b, 1)),
          "segment_ids": np.ones((b, l), np.int32),
          "loss_mask": np.ones((b, l), np.float32)}
  batch_sh = {k: sharding.batch_sharding(mesh, 2) for k in host}
  batch = {k: jax.device_put(v, batch_sh[k]) for k, v in host.items()}
  step = step_lib.jit_step(sft_step.make_sft_step(spec, opt, sched), state_sh, batch_sh, mesh,
                           with_teacher=False)
  state = state_lib.create_state(spec, opt, mesh, sharding.DEFAULT_RULES, seed=0)

  holder = {"state": state, "m": None}

  def one():
    holder["state"], holder["m"] = step(holder["state"], batch)
    return holder["m"]

  times, first = _timeit(one, jax.block_until_ready, args.warmup, args.steps)
  losses = [float(holder["m"]["loss"])]
  cost = None
  if args.cost:
    compiled = step.lower(holder["state"], batch).compile()
    ca = compiled.cost_analysis()
    ca = ca[0] if isinstance(ca, (list, tuple)) else ca
    cost = {k: float(v) for k, v in (ca or {}).items() if k in ("flops", "bytes accessed")}
  return {
      "side": "jaxlab", "step_s": times, "first_call_s": first, "final_loss": losses[-1],
      "params": num_params(cfg), "flops_per_token": flops_per_token(cfg, sizes["length"]),
      "matmul_peak_flops": jax_matmul_peak(), "jax": jax.__version__,
      "devices": str(jax.devices()), "xla_flags": os.environ.get("XLA_FLAGS", ""),
      "host_malloc_tuned": setup["host_malloc_tuned"],
      "hlo_cost": cost,
  }


# ---------------------------------------------------------------------------------- PyTorch


def torch_matmul_peak(sizes=(2048, 3072), repeats=5):
  import torch
  best = 0.0
  for n in sizes:
    g = torch.Generator().manual_seed(n)
    a = torch.randn(n, n, generator=g)
    b = torch.randn(n, n, generator=g)
    torch.mm(a, b)
    for _ in range(repeats):
      t0 = time.perf_counter()
      torch.mm(a, b)
      best = max(best, 2 * n**3 / (time.perf_counter() - t0))
  return best


def run_torch(args, sizes, attn):
  import torch
  import transformers

  torch.set_num_threads(args.threads)
  torch.manual_seed(0)
  config = transformers.LlamaConfig(
      vocab_size=sizes["vocab"], hidden_size=sizes["d_model"], intermediate_size=sizes["d_ff"],
      num_hidden_layers=sizes["n_layers"], num_attention_heads=sizes["n_heads"],
      num_key_value_heads=sizes["n_kv_heads"], max_position_embeddings=sizes["length"],
      rms_norm_eps=1e-6, rope_theta=10000.0, tie_word_embeddings=False, attention_bias=False,
      mlp_bias=False, attn_implementation=attn, dtype="float32")
  model = transformers.LlamaForCausalLM(config).float().train()
  decay = [p for p in model.parameters() if p.ndim >= 2]
  no_decay = [p for p in model.parameters() if p.ndim < 2]
  opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.01},
                           {"params": no_decay, "weight_decay": 0.0}],
                          lr=1e-4, betas=(0.9, 0.999), eps=1e-8)
  inputs, targets = _batch_np(sizes)
  inputs = torch.from_numpy(inputs).long()
  targets = torch.from_numpy(targets).long()
  holder = {}

  def one():
    # `shift_labels` = the already-shifted targets: the loss covers all batch*length tokens.
    out = model(input_ids=inputs, labels=targets, shift_labels=targets)
    out.loss.backward()
    if args.clip:
      torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    holder["loss"] = out.loss
    return out.loss

  times, first = _timeit(one, lambda x: x.item(), args.warmup, args.steps)
  return {"side": f"torch-{attn}", "step_s": times, "first_call_s": first,
          "final_loss": float(holder["loss"]), "attn_implementation": attn,
          "params": sum(p.numel() for p in model.parameters()),
          "matmul_peak_flops": torch_matmul_peak(), "torch": torch.__version__,
          "transformers": transformers.__version__, "threads": torch.get_num_threads()}


# ------------------------------------------------------------------------------------ driver


def _child(args, side, alloc):
  cmd = [sys.executable, os.path.abspath(__file__), "--child", side,
         "--steps", str(args.steps), "--warmup", str(args.warmup),
         "--threads", str(args.threads), "--sizes", json.dumps(args.sizes_dict)]
  cmd += ["--clip"] if args.clip else []
  cmd += ["--cost"] if args.cost else []
  env = dict(os.environ)
  env.pop("GLIBC_TUNABLES", None)
  env.pop("JAXLAB_HOST_MALLOC", None)
  if side == "jax" and alloc == "default":
    env["JAXLAB_HOST_MALLOC"] = "default"  # jaxlab's own tuning off
  elif side != "jax" and alloc == "tuned":
    env["GLIBC_TUNABLES"] = TUNED_GLIBC
  load0 = os.getloadavg()[0]
  proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env)
  if proc.returncode:
    sys.stderr.write(proc.stdout + proc.stderr)
    raise SystemExit(f"{side} ({alloc}) child failed with exit code {proc.returncode}")
  res = json.loads(proc.stdout.strip().splitlines()[-1])
  if side == "jax" and res["host_malloc_tuned"] != (alloc == "tuned"):
    raise SystemExit(f"jaxlab child ({alloc}): host allocator tuning is {res['host_malloc_tuned']}")
  res["loadavg_1m"] = [load0, os.getloadavg()[0]]
  return res


def _merge(acc, res):
  if acc is None:
    return res
  acc["step_s"] += res["step_s"]
  acc["matmul_peak_flops"] = max(acc["matmul_peak_flops"], res["matmul_peak_flops"])
  acc["loadavg_1m"] += res["loadavg_1m"]
  return acc


def _summarise(res, tokens):
  import statistics
  times = res["step_s"]
  res["median_step_s"] = statistics.median(times)
  res["mean_step_s"] = sum(times) / len(times)
  res["best_step_s"] = min(times)
  res["tokens_per_s"] = tokens / res["median_step_s"]
  res["tokens_per_s_best_step"] = tokens / res["best_step_s"]
  return res


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--steps", type=int, default=6, help="timed steps per child")
  p.add_argument("--warmup", type=int, default=2, help="untimed steps first (1st compiles)")
  p.add_argument("--rounds", type=int, default=1, help="run every configuration this often")
  p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
  p.add_argument("--attn", default="sdpa,eager", help="torch attention implementations to time")
  p.add_argument("--alloc", default="both", choices=["both", "default", "tuned"],
                 help="glibc allocator setting of the children (see the module docstring)")
  p.add_argument("--clip", action="store_true", help="clip gradients to norm 1 on both sides")
  p.add_argument("--cost", action="store_true", help="add XLA's HLO cost analysis of the step")
  p.add_argument("--sides", default="jax,torch", help="which sides to run")
  p.add_argument("--sizes", default=None, help="JSON dict overriding the default shapes")
  p.add_argument("--out", default=None, help="write the results as JSON here")
  p.add_argument("--child", default=None, help=argparse.SUPPRESS)
  args = p.parse_args()
  sizes = dict(SIZES, **(json.loads(args.sizes) if args.sizes else {}))
  args.sizes_dict = sizes

  if args.child:
    res = run_jax(args, sizes) if args.child == "jax" else run_torch(args, sizes, args.child)
    print(json.dumps(res))
    return

  tokens = sizes["batch"] * sizes["length"]
  sides = args.sides.split(",")
  allocs = ["default", "tuned"] if args.alloc == "both" else [args.alloc]
  configs = []
  for alloc in allocs:
    if "jax" in sides:
      configs.append(("jaxlab", "jax", alloc))
    if "torch" in sides:
      configs += [(f"torch-{a}", a, alloc) for a in args.attn.split(",")]
  results = {}
  for _ in range(args.rounds):
    for name, side, alloc in configs:
      key = f"{name} [{alloc}]"
      print(f"running {key} ...", file=sys.stderr, flush=True)
      results[key] = _merge(results.get(key), _child(args, side, alloc))
      results[key].update(name=name, alloc=alloc)
  for r in results.values():
    _summarise(r, tokens)

  jax_keys = [k for k in results if results[k]["name"] == "jaxlab"]
  torch_keys = [k for k in results if results[k]["name"].startswith("torch")]
  fastest = lambda keys: max(keys, key=lambda k: results[k]["tokens_per_s"]) if keys else None
  best_jax, best_torch = fastest(jax_keys), fastest(torch_keys)
  jax_peak = max((results[k]["matmul_peak_flops"] for k in jax_keys), default=0.0)
  torch_peak = max((results[k]["matmul_peak_flops"] for k in torch_keys), default=0.0)
  peak = max(jax_peak, torch_peak)
  from jaxlab.models import ModelConfig
  from jaxlab.models.config import flops_per_token
  fpt = flops_per_token(ModelConfig(
      vocab_size=sizes["vocab"], d_model=sizes["d_model"], n_layers=sizes["n_layers"],
      n_heads=sizes["n_heads"], n_kv_heads=sizes["n_kv_heads"], d_ff=sizes["d_ff"]),
      sizes["length"])
  for r in results.values():
    r["mfu"] = fpt * r["tokens_per_s"] / peak
    r["model_gflops_per_s"] = fpt * r["tokens_per_s"] / 1e9
  summary = {
      "sizes": sizes, "tokens_per_step": tokens, "flops_per_token": fpt,
      "matmul_peak_flops": {"jax": jax_peak, "torch": torch_peak, "used": peak},
      "jaxlab_best": best_jax, "torch_reference": best_torch, "results": results,
  }
  # (jaxlab key, torch key) pairs; each compared on median and on best single step.
  pairs = {}
  if best_jax and best_torch:
    pairs["best_vs_best"] = (best_jax, best_torch)
    pick = lambda keys, alloc: fastest([k for k in keys if results[k]["alloc"] == alloc])
    for alloc in allocs:
      if pick(jax_keys, alloc) and pick(torch_keys, alloc):
        pairs[f"{alloc}_vs_{alloc}"] = (pick(jax_keys, alloc), pick(torch_keys, alloc))
    if pick(jax_keys, "tuned") and pick(torch_keys, "default"):  # each framework as it ships
      pairs["shipped_vs_shipped"] = (pick(jax_keys, "tuned"), pick(torch_keys, "default"))
  ratios = {k: {"jaxlab": j, "torch": t,
                "median": results[j]["tokens_per_s"] / results[t]["tokens_per_s"],
                "best_step": results[j]["tokens_per_s_best_step"] / results[t]["tokens_per_s_best_step"]}
            for k, (j, t) in pairs.items()}
  summary["ratio_jaxlab_over_torch"] = ratios

  print(f"\nSFT train step, {sizes['n_layers']} layers, d_model {sizes['d_model']}, "
        f"{sizes['n_heads']}/{sizes['n_kv_heads']} heads, MLP {sizes['d_ff']}, vocab "
        f"{sizes['vocab']}, batch {sizes['batch']} x length {sizes['length']} "
        f"({tokens} trained tokens/step), float32, AdamW; {args.rounds} x {args.steps} timed "
        f"steps per configuration after {args.warmup} warm-up")
  print(f"model FLOPs/token {fpt / 1e6:.1f} M; float32 matmul peak: jax {jax_peak / 1e9:.1f} "
        f"GFLOP/s, torch {torch_peak / 1e9:.1f} GFLOP/s -> peak used {peak / 1e9:.1f} GFLOP/s")
  hdr = (f"{'configuration':<24} {'median s':>8} {'best s':>7} {'tokens/s':>9} {'best tok/s':>10} "
         f"{'GFLOP/s':>8} {'MFU':>6} {'loss':>7}  load")
  print(hdr)
  print("-" * len(hdr))
  for k, r in results.items():
    mark = " *" if k in (best_jax, best_torch) else ""
    load = "/".join(f"{x:.1f}" for x in r["loadavg_1m"])
    print(f"{k:<24} {r['median_step_s']:>8.3f} {r['best_step_s']:>7.3f} {r['tokens_per_s']:>9.0f} "
          f"{r['tokens_per_s_best_step']:>10.0f} {r['model_gflops_per_s']:>8.1f} {r['mfu']:>6.1%} "
          f"{r['final_loss']:>7.3f}  {load}{mark}")
  labels = {"shipped_vs_shipped": "jaxlab as shipped (tuned) vs PyTorch as shipped (default)",
            "tuned_vs_tuned": "both with the tuned allocator",
            "default_vs_default": "both with stock glibc",
            "best_vs_best": "fastest configuration of each"}
  for k, r in ratios.items():
    print(f"jaxlab / torch tokens/s, {labels[k]} ({r['jaxlab']} vs {r['torch']}): "
          f"{r['median']:.3f}x on medians, {r['best_step']:.3f}x on best steps (target >= 1.15x)")
  if args.out:
    with open(args.out, "w") as f:
      json.dump(summary, f, indent=2)
  return summary


if __name__ == "__main__":
  main()
