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
`--alloc shipped` runs only each as it ships (jaxlab tuned, PyTorch default). `--threads 1,2`
times torch at each thread count (on a loaded machine 2 threads can be 10x slower than 1).

Real model, LoRA (`--hf_path DIR`, an HF folder such as `python -m jaxlab.models.fetch
smollm2-135m-instruct DIR` writes): the model's own sizes replace the synthetic ones; batch
`--batch` x `--length` (default 8 x 256) of README.md tokenized with DIR's tokenizer (consecutive
chunks; loss on every token, mask all ones), float32 compute and float32 adapters of rank
`--lora_rank` / alpha `--lora_alpha` on `--lora_targets` (default all seven projections),
AdamW (weight decay 0.01) on the adapters only, no clipping unless --clip.

* jaxlab: the runner's loader (`jaxlab.train.runner.load_model_params`: frozen base + adapters,
  scanned layers) and step (`make_sft_step` = `step.make_step` with the sft channel, `jit_step`,
  donated state).
* PyTorch: `AutoModelForCausalLM.from_pretrained(DIR, dtype=float32)` wrapped by
  `peft.get_peft_model` with the same `LoraConfig` (lora_dropout 0), `torch.optim.AdamW` on the
  adapters, sdpa and eager attention.

Both sides start from the same adapters (`lora_init`: A and B from a seeded RNG, B non-zero so
the adapters act and A has a gradient), so the first step's loss and gradient norm must agree
(float32: ~1e-5 relative; printed with their relative difference): the same work. Time per
step after warm-up, wall and process CPU seconds, and the ratio of the medians; "first s" is
the first step, compilation included (the jaxlab child runs with JAXLAB_COMPILE_CACHE=off).
A step at batch 8 x 256 takes roughly 10 s on 2 quiet cores (estimated from smoke runs under
load), so each child takes 1-1.5 minutes. Quiet-machine command for SmolLM2-135M-Instruct,
about 3 minutes (each side as it ships, torch sdpa at 2 threads):

  .venv/bin/python -m jaxlab.models.fetch smollm2-135m-instruct runs/smollm2-135m-instruct
  .venv/bin/python benchmarks/train_step.py --hf_path runs/smollm2-135m-instruct --batch 8 \
      --length 256 --steps 3 --warmup 1 --alloc shipped --attn sdpa --threads 2 \
      --out lora_smollm2.json

and a fuller one, about 15 minutes (torch sdpa and eager at 1 and 2 threads, 2 rounds):

  .venv/bin/python benchmarks/train_step.py --hf_path runs/smollm2-135m-instruct --batch 8 \
      --length 256 --steps 5 --warmup 1 --rounds 2 --alloc shipped --attn sdpa,eager \
      --threads 1,2
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
HF_BATCH, HF_LENGTH = 8, 256  # --hf_path defaults
LORA_TARGETS = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"


def _batch_np(sizes, seed=0):
  import numpy as np
  rng = np.random.default_rng(seed)
  toks = rng.integers(0, sizes["vocab"], (sizes["batch"], sizes["length"] + 1)).astype(np.int32)
  return toks[:, :-1], toks[:, 1:]


def _hf_batch_np(path, sizes):
  """(inputs, targets) [batch, length]: README.md tokenized by `path`'s tokenizer, cut into
  consecutive rows of length + 1 tokens (the text repeats if it is too short)."""
  import numpy as np
  from jaxlab.models.hf_tokenizer import load_tokenizer
  with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
    ids = load_tokenizer(path)(f.read(), add_special_tokens=False)["input_ids"]
  b, l = sizes["batch"], sizes["length"]
  ids = np.resize(np.asarray(ids, np.int32), b * (l + 1)).reshape(b, l + 1)
  return ids[:, :-1], ids[:, 1:]


def lora_init(module: str, layer: int, kind: str, shape, seed=0):
  """One adapter matrix in jaxlab's layout (kind "lora_a": A [in, r], "lora_b": B [r, out]) of
  `module` (e.g. "self_attn.q_proj") in `layer`, float32, the same in both children:
  A ~ N(0, 1/in), B ~ N(0, 0.01^2) (non-zero, unlike a fresh adapter's)."""
  import zlib
  import numpy as np
  rng = np.random.default_rng([seed, layer, zlib.crc32(module.encode()), kind == "lora_b"])
  std = shape[0] ** -0.5 if kind == "lora_a" else 0.01
  return rng.normal(0.0, std, shape).astype(np.float32)


def _timeit(fn, sync, warmup, steps):
  """Runs fn warmup times, then `steps` timed calls; returns (per-step seconds, first-call s,
  per-step process CPU seconds)."""
  t0 = time.perf_counter()
  sync(fn())
  first = time.perf_counter() - t0
  for _ in range(warmup - 1):
    sync(fn())
  times, cpu = [], []
  for _ in range(steps):
    t0, c0 = time.perf_counter(), time.process_time()
    sync(fn())
    times.append(time.perf_counter() - t0)
    cpu.append(time.process_time() - c0)
  return times, first, cpu


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

  mesh = sharding.make_mesh((1, 1, 1), jax.devices()[:1])
  params = None
  if args.hf_path:  # the runner's loader: frozen float32 base, float32 adapters, scanned
    from jaxlab.models.config import LoraConfig
    from jaxlab.train.runner import load_model_params
    lora = LoraConfig(rank=args.lora_rank, alpha=args.lora_alpha,
                      targets=tuple(args.lora_targets.split(",")))
    cfg, trainable, frozen = load_model_params(
        args.hf_path, mesh, sharding.DEFAULT_RULES, key="--hf_path", dtype="float32",
        param_dtype="float32", lora=lora, trainable_dtype="float32", scan_layers=True)
    params = (_jax_adapters(cfg, trainable), frozen)
  else:
    cfg = ModelConfig(vocab_size=sizes["vocab"], d_model=sizes["d_model"],
                      n_layers=sizes["n_layers"], n_heads=sizes["n_heads"],
                      n_kv_heads=sizes["n_kv_heads"], d_ff=sizes["d_ff"], norm_eps=1e-6,
                      dtype="float32", param_dtype="float32")
  spec = model_spec(cfg)
  ocfg = ml_collections.ConfigDict(dict(
      lr=1e-4, warmup_steps=0, decay="constant", end_ratio=1.0, weight_decay=0.01,
      clip_norm=1.0 if args.clip else 0.0, b1=0.9, b2=0.999, eps=1e-8))
  opt, sched = optim.make_optimizer(ocfg, 1000)
  state_sh = state_lib.state_shardings(spec, opt, mesh, sharding.DEFAULT_RULES)
  inputs, targets = _hf_batch_np(args.hf_path, sizes) if args.hf_path else _batch_np(sizes)
  b, l = inputs.shape
  host = {"inputs": inputs, "targets": targets,
          "positions": np.tile(np.arange(l, dtype=np.int32), (b, 1)),
          "segment_ids": np.ones((b, l), np.int32),
          "loss_mask": np.ones((b, l), np.float32)}
  batch_sh = {k: sharding.batch_sharding(mesh, 2) for k in host}
  batch = {k: jax.device_put(v, batch_sh[k]) for k, v in host.items()}
  step = step_lib.jit_step(sft_step.make_sft_step(spec, opt, sched), state_sh, batch_sh, mesh,
                           with_teacher=False)
  state = state_lib.create_state(spec, opt, mesh, sharding.DEFAULT_RULES, seed=0, params=params)
  del params

  holder = {"state": state, "m": None, "m0": None}

  def one():
    holder["state"], holder["m"] = step(holder["state"], batch)
    holder["m0"] = holder["m0"] or holder["m"]
    return holder["m"]

  times, first, cpu = _timeit(one, jax.block_until_ready, args.warmup, args.steps)
  losses = [float(holder["m"]["loss"])]
  cost = None
  if args.cost:
    compiled = step.lower(holder["state"], batch).compile()
    ca = compiled.cost_analysis()
    ca = ca[0] if isinstance(ca, (list, tuple)) else ca
    cost = {k: float(v) for k, v in (ca or {}).items() if k in ("flops", "bytes accessed")}
  return {
      "side": "jaxlab", "step_s": times, "cpu_s": cpu, "first_call_s": first,
      "final_loss": losses[-1], "loss0": float(holder["m0"]["loss"]),
      "grad_norm0": float(holder["m0"]["grad_norm"]),
      "params": num_params(cfg), "flops_per_token": flops_per_token(cfg, sizes["length"]),
      "trainable_params": sum(x.size for x in jax.tree.leaves(holder["state"].params)),
      "matmul_peak_flops": 0.0 if args.hf_path else jax_matmul_peak(), "jax": jax.__version__,
      "devices": str(jax.devices()), "xla_flags": os.environ.get("XLA_FLAGS", ""),
      "host_malloc_tuned": setup["host_malloc_tuned"], "compile_cache": setup["compile_cache"],
      "hlo_cost": cost,
  }


def _jax_adapters(cfg, trainable):
  """`trainable` (fresh adapters, either layout) with every A and B set to `lora_init`'s."""
  import jax
  import numpy as np
  from jaxlab.models.decoder import layer_runs
  starts = [start for start, _ in layer_runs(cfg)]

  def leaf(path, x):
    keys = [getattr(k, "key", getattr(k, "idx", None)) for k in path]
    module, kind = ".".join(keys[-3:-1]), keys[-1]
    if keys[0] == "stacks":  # [layers, ...] of run keys[1]
      layers = range(starts[keys[1]], starts[keys[1]] + x.shape[0])
    else:
      layers = [keys[1]]
    out = np.stack([lora_init(module, i, kind, x.shape[-2:]) for i in layers])
    return jax.device_put(out if keys[0] == "stacks" else out[0], x.sharding)
  return jax.tree_util.tree_map_with_path(leaf, trainable)


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

  torch.set_num_threads(int(args.threads))
  torch.manual_seed(0)
  extra = {}
  if args.hf_path:
    model, params, opt, extra = _peft_model(args, attn)
    inputs, targets = _hf_batch_np(args.hf_path, sizes)
  else:
    config = transformers.LlamaConfig(
        vocab_size=sizes["vocab"], hidden_size=sizes["d_model"], intermediate_size=sizes["d_ff"],
        num_hidden_layers=sizes["n_layers"], num_attention_heads=sizes["n_heads"],
        num_key_value_heads=sizes["n_kv_heads"], max_position_embeddings=sizes["length"],
        rms_norm_eps=1e-6, rope_theta=10000.0, tie_word_embeddings=False, attention_bias=False,
        mlp_bias=False, attn_implementation=attn, dtype="float32")
    model = transformers.LlamaForCausalLM(config).float().train()
    params = list(model.parameters())
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
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
    if "loss0" not in holder:  # the first call (untimed); a float64 sum, as optax.tree.norm's
      holder["loss0"] = float(out.loss)
      holder["grad_norm0"] = float(torch.sqrt(sum((p.grad.double() ** 2).sum() for p in params)))
    if args.clip:
      torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    holder["loss"] = out.loss
    return out.loss

  times, first, cpu = _timeit(one, lambda x: x.item(), args.warmup, args.steps)
  return {"side": f"torch-{attn}", "step_s": times, "cpu_s": cpu, "first_call_s": first,
          "final_loss": float(holder["loss"]), "loss0": holder["loss0"],
          "grad_norm0": holder["grad_norm0"], "attn_implementation": attn,
          "params": sum(p.numel() for p in model.parameters()),
          "trainable_params": sum(p.numel() for p in params),
          "matmul_peak_flops": 0.0 if args.hf_path else torch_matmul_peak(),
          "torch": torch.__version__, "transformers": transformers.__version__,
          "threads": torch.get_num_threads(), **extra}


def _peft_model(args, attn):
  """(PEFT model, its adapters, AdamW on them, {"peft": version}) on the HF folder, adapters
  from `lora_init`; see the module docstring."""
  import peft
  import torch
  import transformers
  model = transformers.AutoModelForCausalLM.from_pretrained(
      args.hf_path, dtype=torch.float32, attn_implementation=attn, local_files_only=True)
  targets = args.lora_targets.split(",")
  model = peft.get_peft_model(model, peft.LoraConfig(
      r=args.lora_rank, lora_alpha=args.lora_alpha, target_modules=targets, lora_dropout=0.0))
  with torch.no_grad():
    for i, layer in enumerate(model.base_model.model.model.layers):
      for name, mod in layer.named_modules():
        if name.split(".")[-1] in targets:
          a, b = mod.lora_A["default"].weight, mod.lora_B["default"].weight  # [r, in], [out, r]
          a.copy_(torch.from_numpy(lora_init(name, i, "lora_a", a.shape[::-1]).T))
          b.copy_(torch.from_numpy(lora_init(name, i, "lora_b", b.shape[::-1]).T))
  model.train()
  params = [p for p in model.parameters() if p.requires_grad]
  opt = torch.optim.AdamW(params, lr=1e-4, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01)
  return model, params, opt, {"peft": peft.__version__}


# ------------------------------------------------------------------------------------ driver


def _child(args, side, alloc, threads):
  cmd = [sys.executable, os.path.abspath(__file__), "--child", side,
         "--steps", str(args.steps), "--warmup", str(args.warmup),
         "--threads", str(threads), "--sizes", json.dumps(args.sizes_dict)]
  cmd += ["--clip"] if args.clip else []
  cmd += ["--cost"] if args.cost else []
  if args.hf_path:
    cmd += ["--hf_path", args.hf_path, "--lora_rank", str(args.lora_rank),
            "--lora_alpha", str(args.lora_alpha), "--lora_targets", args.lora_targets]
  env = dict(os.environ)
  env.pop("GLIBC_TUNABLES", None)
  env.pop("JAXLAB_HOST_MALLOC", None)
  env["JAXLAB_COMPILE_CACHE"] = "off"  # first_call_s includes a real compilation, every run
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
  acc["cpu_s"] += res["cpu_s"]
  acc["matmul_peak_flops"] = max(acc["matmul_peak_flops"], res["matmul_peak_flops"])
  acc["loadavg_1m"] += res["loadavg_1m"]
  return acc


def _summarise(res, tokens):
  import statistics
  times = res["step_s"]
  res["median_step_s"] = statistics.median(times)
  res["median_cpu_s"] = statistics.median(res["cpu_s"])
  res["mean_step_s"] = sum(times) / len(times)
  res["best_step_s"] = min(times)
  res["tokens_per_s"] = tokens / res["median_step_s"]
  res["tokens_per_s_best_step"] = tokens / res["best_step_s"]
  return res


def _describe(sizes) -> str:
  """The model's and the batch's shapes, for the reports' first line."""
  return (f"{sizes['n_layers']} layers, d_model {sizes['d_model']}, {sizes['n_heads']}/"
          f"{sizes['n_kv_heads']} heads, MLP {sizes['d_ff']}, vocab {sizes['vocab']}, batch "
          f"{sizes['batch']} x length {sizes['length']} "
          f"({sizes['batch'] * sizes['length']} trained tokens/step)")


def _report_hf(args, sizes, results, ratios, labels, best):
  """Prints the --hf_path (LoRA vs PEFT) results: step times, CPU, first-step parity."""
  any_r = next(iter(results.values()))
  print(f"\nLoRA train step on {args.hf_path}: {_describe(sizes)}, float32; LoRA rank "
        f"{args.lora_rank}, alpha {args.lora_alpha:g} on {args.lora_targets} "
        f"({any_r['trainable_params']:,} float32 adapter params), AdamW; {args.rounds} x "
        f"{args.steps} timed steps per configuration after {args.warmup} warm-up; torch "
        f"threads: {args.threads}")
  hdr = (f"{'configuration':<24} {'median s':>8} {'best s':>7} {'CPU s':>6} {'tokens/s':>9} "
         f"{'first s':>7} {'loss@0':>9} {'|g|@0':>9} {'loss':>7}  load before/after")
  print(f"{hdr}\n{'-' * len(hdr)}")
  for k, r in results.items():
    mark = " *" if k in best else ""
    load = ", ".join(f"{a:.1f}/{b:.1f}" for a, b in zip(r["loadavg_1m"][::2],
                                                      r["loadavg_1m"][1::2]))
    print(f"{k:<24} {r['median_step_s']:>8.3f} {r['best_step_s']:>7.3f} "
          f"{r['median_cpu_s']:>6.2f} {r['tokens_per_s']:>9.0f} {r['first_call_s']:>7.1f} "
          f"{r['loss0']:>9.6f} {r['grad_norm0']:>9.6f} {r['final_loss']:>7.4f}  {load}{mark}")
  ref = next((r for r in results.values() if r["name"] == "jaxlab"), None)
  for k, r in results.items():
    if ref is not None and r["name"] != "jaxlab":
      print(f"step 0, {k} vs jaxlab: loss {r['loss0']:.7f} vs {ref['loss0']:.7f} (relative "
            f"difference {abs(r['loss0'] - ref['loss0']) / abs(ref['loss0']):.1e}), gradient norm "
            f"{abs(r['grad_norm0'] - ref['grad_norm0']) / ref['grad_norm0']:.1e} relative")
  for k, r in ratios.items():
    print(f"jaxlab / torch, {labels[k]} ({r['jaxlab']} vs {r['torch']}): {r['median']:.3f}x "
          f"by median wall time, {r['best_step']:.3f}x on best steps, {r['cpu_median']:.3f}x by "
          f"median CPU seconds per step (target >= 1.2x)")


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--steps", type=int, default=6, help="timed steps per child")
  p.add_argument("--warmup", type=int, default=2, help="untimed steps first (1st compiles)")
  p.add_argument("--rounds", type=int, default=1, help="run every configuration this often")
  p.add_argument("--threads", default="2", help="torch.set_num_threads; a comma-separated "
                 "list times each (torch-ATTN-Nt), the fastest being the reference")
  p.add_argument("--attn", default="sdpa,eager", help="torch attention implementations to time")
  p.add_argument("--alloc", default="both", choices=["both", "default", "tuned", "shipped"],
                 help="glibc allocator setting of the children (see the module docstring)")
  p.add_argument("--clip", action="store_true", help="clip gradients to norm 1 on both sides")
  p.add_argument("--cost", action="store_true", help="add XLA's HLO cost analysis of the step")
  p.add_argument("--sides", default="jax,torch", help="which sides to run")
  p.add_argument("--sizes", default=None, help="JSON dict overriding the default shapes")
  p.add_argument("--batch", type=int, default=None, help="rows per step (overrides --sizes)")
  p.add_argument("--length", type=int, default=None, help="tokens per row (overrides --sizes)")
  p.add_argument("--hf_path", default="", help="LoRA on this HF folder against PEFT + torch "
                 "(see the module docstring) instead of the synthetic full fine-tune")
  p.add_argument("--lora_rank", type=int, default=8)
  p.add_argument("--lora_alpha", type=float, default=16.0)
  p.add_argument("--lora_targets", default=LORA_TARGETS, help="comma-separated module names")
  p.add_argument("--out", default=None, help="write the results as JSON here")
  p.add_argument("--child", default=None, help=argparse.SUPPRESS)
  args = p.parse_args()
  sizes = dict(SIZES, **(json.loads(args.sizes) if args.sizes else {}))
  if args.hf_path and not args.child:  # the model's own sizes
    args.hf_path = os.path.abspath(args.hf_path)  # the children run in ROOT
    from jaxlab.models.hf_config import config_from_hf
    c = config_from_hf(args.hf_path)
    sizes.update(n_layers=c.n_layers, d_model=c.d_model, n_heads=c.n_heads,
                 n_kv_heads=c.n_kv_heads, d_ff=c.d_ff, vocab=c.vocab_size)
    if not (args.sizes and "batch" in json.loads(args.sizes)):
      sizes.update(batch=HF_BATCH, length=HF_LENGTH)
  for k in ("batch", "length"):
    if getattr(args, k) is not None:
      sizes[k] = getattr(args, k)
  args.sizes_dict = sizes

  if args.child:
    res = run_jax(args, sizes) if args.child == "jax" else run_torch(args, sizes, args.child)
    print(json.dumps(res))
    return

  tokens = sizes["batch"] * sizes["length"]
  sides = args.sides.split(",")
  # (jaxlab's, torch's) allocator per run; "shipped": each as it ships (jaxlab tuned, torch stock)
  alloc_runs = {"both": [("default", "default"), ("tuned", "tuned")],
                "shipped": [("tuned", "default")]}.get(args.alloc, [(args.alloc, args.alloc)])
  allocs = ["default", "tuned"]  # the like-for-like pairs looked for below
  threads = [int(t) for t in args.threads.split(",")]
  configs = []
  for jax_alloc, torch_alloc in alloc_runs:
    if "jax" in sides:
      configs.append(("jaxlab", "jax", jax_alloc, 0))
    if "torch" in sides:
      configs += [(f"torch-{a}" + (f"-{t}t" if len(threads) > 1 else ""), a, torch_alloc, t)
                  for a in args.attn.split(",") for t in threads]
  results = {}
  for _ in range(args.rounds):
    for name, side, alloc, n_threads in configs:
      key = f"{name} [{alloc}]"
      print(f"running {key} ...", file=sys.stderr, flush=True)
      results[key] = _merge(results.get(key), _child(args, side, alloc, n_threads or threads[0]))
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
    r["mfu"] = fpt * r["tokens_per_s"] / peak if peak else None  # None: not measured (LoRA)
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
                "best_step": results[j]["tokens_per_s_best_step"] / results[t]["tokens_per_s_best_step"],
                "cpu_median": results[t]["median_cpu_s"] / results[j]["median_cpu_s"]}
            for k, (j, t) in pairs.items()}
  summary["ratio_jaxlab_over_torch"] = ratios
  labels = {"shipped_vs_shipped": "jaxlab as shipped (tuned) vs PyTorch as shipped (default)",
            "tuned_vs_tuned": "both with the tuned allocator",
            "default_vs_default": "both with stock glibc",
            "best_vs_best": "fastest configuration of each"}
  if args.hf_path:
    _report_hf(args, sizes, results, ratios, labels, (best_jax, best_torch))
    if args.out:
      with open(args.out, "w") as f:
        json.dump(summary, f, indent=2)
    return summary

  print(f"\nSFT train step, {_describe(sizes)}, float32, AdamW; {args.rounds} x {args.steps} "
        f"timed steps per configuration after {args.warmup} warm-up")
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
  for k, r in ratios.items():
    print(f"jaxlab / torch tokens/s, {labels[k]} ({r['jaxlab']} vs {r['torch']}): "
          f"{r['median']:.3f}x on medians, {r['best_step']:.3f}x on best steps (target >= 1.15x)")
  if args.out:
    with open(args.out, "w") as f:
      json.dump(summary, f, indent=2)
  return summary


if __name__ == "__main__":
  main()
