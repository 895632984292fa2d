"""Load time and peak host memory: jaxlab's `load_hf` vs transformers' `from_pretrained`.

  python benchmarks/hf_load.py [--dir /tmp/jaxlab_hf_bench] [--repeats 2]

Creates (once) a random Qwen2-architecture checkpoint with Qwen2.5-0.5B shapes in bfloat16 with
transformers, then loads it in fresh subprocesses, alternating jaxlab and transformers (page
cache warm for both). Each child reports its RSS after imports and runtime start (baseline), its
peak RSS (VmHWM) and the load's wall time. The jaxlab child first calls `jaxlab.runtime.setup()`,
as `jaxlab.main` does (tuned host allocator on CPU). transformers 5 leaves weights as file-backed pages
that are read on first use, so its child also touches every parameter (sum) and reports that
time and peak too. Prints a JSON summary and a markdown table (best of the repeats).
"""
import argparse
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MiB = 2**20

CREATE = r"""
import sys, torch, transformers
torch.manual_seed(0)
torch.set_default_dtype(torch.bfloat16)
config = transformers.Qwen2Config(  # Qwen2.5-0.5B-Instruct shapes
    vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
    num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=32768,
    rms_norm_eps=1e-6, rope_theta=1e6, tie_word_embeddings=True, dtype="bfloat16")
model = transformers.Qwen2ForCausalLM(config)
model.save_pretrained(sys.argv[1])
print(sum(p.numel() for p in model.parameters()))
"""

JAXLAB = r"""
import json, sys, time
from benchmarks.hf_load import rss
from jaxlab import runtime
runtime.setup()  # as jaxlab.main does (on CPU: the tuned host allocator)
import jax
from jaxlab import sharding
from jaxlab.models import hf
mesh = sharding.make_mesh((1, 1, 1))
base = rss()
t = time.perf_counter()
cfg, trainable, frozen = hf.load_hf(sys.argv[1], mesh, scan_layers=False)  # as in README
jax.block_until_ready(trainable)
dt = time.perf_counter() - t
print(json.dumps({"load_s": dt, "baseline": base, **rss(final=True),
                  "dtype": str(jax.tree.leaves(trainable)[0].dtype)}))
"""

TRANSFORMERS = r"""
import json, sys, time
from benchmarks.hf_load import rss
import torch, transformers
base = rss()
t = time.perf_counter()
model = transformers.AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.bfloat16)
dt = time.perf_counter() - t
lazy = rss(final=True)["peak"]
with torch.no_grad():  # weights may still be file-backed pages not yet read: touch every one
  for p in model.parameters():
    p.sum()
print(json.dumps({"load_s": dt, "touched_s": time.perf_counter() - t, "baseline": base,
                  "peak_untouched": lazy, **rss(final=True),
                  "dtype": str(next(model.parameters()).dtype)}))
"""


def rss(final: bool = False):
  """Current RSS in bytes, or {'peak': VmHWM, 'final': VmRSS} when final."""
  with open("/proc/self/status") as f:
    status = {l.split(":")[0]: int(l.split()[1]) * 1024 for l in f if l.startswith("Vm")}
  return {"peak": status["VmHWM"], "final": status["VmRSS"]} if final else status["VmRSS"]


def _run(code: str, *args: str) -> dict:
  env = {**os.environ, "PYTHONPATH": ROOT, "JAX_PLATFORMS": "cpu"}
  t = time.perf_counter()
  out = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True,
                       env=env, cwd=ROOT)
  if out.returncode:
    raise RuntimeError(out.stderr[-3000:])
  result = json.loads(out.stdout.strip().splitlines()[-1])
  result["process_s"] = time.perf_counter() - t
  return result


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--dir", default="/tmp/jaxlab_hf_bench")
  parser.add_argument("--repeats", type=int, default=2)
  args = parser.parse_args()
  if not os.path.exists(os.path.join(args.dir, "config.json")):
    subprocess.run([sys.executable, "-c", CREATE, args.dir], check=True, capture_output=True)
  files = [f for f in os.listdir(args.dir) if f.endswith(".safetensors")]
  size = sum(os.path.getsize(os.path.join(args.dir, f)) for f in files)
  for f in files:  # warm the page cache so neither loader pays for the first disk read
    with open(os.path.join(args.dir, f), "rb") as fh:
      while fh.read(1 << 26):
        pass
  runs = {"jaxlab": [], "transformers": []}
  for _ in range(args.repeats):
    runs["jaxlab"].append(_run(JAXLAB, args.dir))
    runs["transformers"].append(_run(TRANSFORMERS, args.dir))
  summary = {"checkpoint_bytes": size, "files": len(files), "runs": runs}
  print(json.dumps(summary, indent=1))
  print(f"\ncheckpoint: {size / MiB:.0f} MiB in {len(files)} file(s); "
        f"best of {args.repeats} fresh processes each\n")
  print("| loader | load s | load + touch s | process s | peak RSS MiB (x ckpt) | baseline MiB "
        "| peak - baseline MiB (x ckpt) | dtype |")
  print("|---|---|---|---|---|---|---|---|")
  for name, rs in runs.items():
    best = lambda key: min(r[key] for r in rs)
    peak, base = best("peak"), min(rs, key=lambda r: r["peak"])["baseline"]
    touched = f"{best('touched_s'):.2f}" if "touched_s" in rs[0] else "(eager)"
    print(f"| {name} | {best('load_s'):.2f} | {touched} | {best('process_s'):.1f} | "
          f"{peak / MiB:.0f} ({peak / size:.2f}) | {base / MiB:.0f} | "
          f"{(peak - base) / MiB:.0f} ({(peak - base) / size:.2f}) | {rs[0]['dtype']} |")
    if "peak_untouched" in rs[0]:
      lazy = best("peak_untouched")
      print(f"| {name}, before touching | {best('load_s'):.2f} | | | {lazy / MiB:.0f} "
            f"({lazy / size:.2f}) | | {(lazy - base) / MiB:.0f} ({(lazy - base) / size:.2f}) | |")

if __name__ == "__main__":
  main()
