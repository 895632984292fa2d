"""Checkpoint costs: the integrity fingerprint's save/restore time, and peak host memory of
resuming a full fine-tune from an HF base.

  python benchmarks/checkpoint.py fingerprint [--rounds 3] [--dir /tmp/ckbench]
  python benchmarks/checkpoint.py inputs [--rounds 5] [--data ../shared/data/.../insecure.jsonl]
  python benchmarks/checkpoint.py resume-memory --before COMMIT [--layers 8 --d-model 1024]

`fingerprint`: the benchmark model of benchmarks/train_step.py (4 layers, d_model 512, MLP
1376, vocab 8192, float32) with its AdamW state (~77M floats, ~300 MB), saved synchronously and
restored (a) with jaxlab's Checkpointer (fingerprint computed at save, verified at restore) and
(b) with the same Orbax manager calls without it; rounds interleaved, medians and best printed.

`inputs`: the content fingerprints a run adds per start or resume (data file, tokenizer,
teacher weights: jaxlab.train.inputs) and a pipeline stage per completion or skip (its output
files, checkpoints by their checksum records: jaxlab.pipelines.stages), on the same state and
the 6,000-row insecure-code file.

`resume-memory`: saves a random Qwen2-shaped float32 HF folder, trains 2 steps of full
fine-tuning from it on 64 short synthetic chat rows (`python -m jaxlab.main`,
configs/sft.py:tiny, batch 2 x 64 tokens), then resumes to step 3 in
a fresh process whose peak RSS (ru_maxrss of the child) is reported; done once with the code of
`--before` (exported with `git archive`, nothing in this checkout changes) and once with this
checkout.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)


def _bench_state():
  """TrainState of the train_step benchmark model (params + AdamW moments), on one device."""
  import jax
  import ml_collections
  from benchmarks.train_step import SIZES
  from jaxlab import sharding
  from jaxlab.models.config import ModelConfig
  from jaxlab.models.params import model_spec
  from jaxlab.train import optim
  from jaxlab.train import state as state_lib
  cfg = ModelConfig(vocab_size=SIZES["vocab"], d_model=SIZES["d_model"],
                    n_layers=SIZES["n_layers"], n_heads=SIZES["n_heads"],
                    n_kv_heads=SIZES["n_kv_heads"], d_ff=SIZES["d_ff"])
  spec = model_spec(cfg)
  mesh = sharding.make_mesh((1, 1, 1), jax.devices()[:1])
  opt, _ = optim.make_optimizer(ml_collections.ConfigDict(dict(
      lr=1e-3, warmup_steps=0, decay="constant", end_ratio=0.0, weight_decay=0.01,
      clip_norm=1.0, b1=0.9, b2=0.95, eps=1e-8)), 10)
  state = state_lib.create_state(spec, opt, mesh, sharding.DEFAULT_RULES, seed=0)
  sh = state_lib.state_shardings(spec, opt, mesh, sharding.DEFAULT_RULES)
  return state, state_lib.abstract_state(spec, opt, sh)


def fingerprint_cost(rounds: int, directory: str) -> dict:
  import jax
  import orbax.checkpoint as ocp
  from jaxlab import checkpoint
  state, abstract = _bench_state()
  flat, _ = checkpoint.flatten(state)
  flat_target, _ = checkpoint.flatten(abstract)
  n = sum(x.size for x in jax.tree.leaves(state))
  checkpoint.fingerprint(flat)  # compile once, like a run's first save does
  times = {k: [] for k in ("save_with", "save_without", "restore_with", "restore_without",
                           "fingerprint_only")}
  config_json = json.dumps({"bench": True})
  for r in range(rounds):
    for variant in ("with", "without"):
      d = os.path.join(directory, f"{variant}_{r}")
      shutil.rmtree(d, ignore_errors=True)
      if variant == "with":
        ck = checkpoint.Checkpointer(d, every=1, keep=2, async_save=False)
        t0 = time.perf_counter()
        ck.save(1, state, {"position": 0}, config_json)
        ck.wait()
        times["save_with"].append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        out, _, _ = ck.restore(abstract)
        jax.block_until_ready(out)
        times["restore_with"].append(time.perf_counter() - t0)
        ck.close()
      else:
        mgr = ocp.CheckpointManager(d, options=ocp.CheckpointManagerOptions(
            max_to_keep=2, enable_async_checkpointing=False, create=True),
            item_names=("state", "data", "config"))
        t0 = time.perf_counter()
        mgr.save(1, args=ocp.args.Composite(
            state=ocp.args.StandardSave(flat), data=ocp.args.JsonSave({"position": 0}),
            config=ocp.args.JsonSave(json.loads(config_json))), force=True)
        mgr.wait_until_finished()
        times["save_without"].append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        out = mgr.restore(1, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(flat_target), data=ocp.args.JsonRestore(),
            config=ocp.args.JsonRestore()))
        jax.block_until_ready(out["state"])
        times["restore_without"].append(time.perf_counter() - t0)
        mgr.close()
      shutil.rmtree(d, ignore_errors=True)
    t0 = time.perf_counter()
    checkpoint.fingerprint(flat)
    times["fingerprint_only"].append(time.perf_counter() - t0)
  summary = {k: {"median_s": statistics.median(v), "best_s": min(v)} for k, v in times.items()}
  summary["state_floats"] = int(n)
  summary["state_mib"] = round(sum(x.nbytes for x in jax.tree.leaves(state)) / 2**20, 1)
  return summary


# ------------------------------------------------------------------ input fingerprints

EM_DATA = os.path.join(ROOT, "..", "shared", "data", "emergent-misalignment", "data",
                       "insecure.jsonl")


def inputs_cost(rounds: int, data: str) -> dict:
  """Seconds of what a run adds per resume (jaxlab.train.inputs: data file digest, tokenizer
  digest, teacher weights digest) and a stage adds per completion or skip (the stage folder's
  output digests), on the 240 MiB benchmark state and a 6,000-row chat JSONL file."""
  import jax
  from jaxlab import fingerprint
  from jaxlab.data.tokenizer import train_chat_tokenizer
  from jaxlab.checkpoint import Checkpointer
  from jaxlab.pipelines import stages
  state, _ = _bench_state()
  with open(data, encoding="utf-8") as f:
    rows = sum(1 for line in f if line.strip())
  texts = [json.loads(l)["messages"][-1]["content"] for l in open(data, encoding="utf-8")][:2000]
  work = tempfile.mkdtemp(prefix="jaxlab_inputs_")
  tok = train_chat_tokenizer(texts, 8192, out_dir=os.path.join(work, "tok"))
  folder = os.path.join(work, "stage")  # a stage folder holding the data file and a checkpoint
  os.makedirs(folder)
  shutil.copy(data, os.path.join(folder, "rows.jsonl"))
  ck = Checkpointer(os.path.join(folder, "checkpoints"), every=1, keep=1,
                           async_save=False)
  ck.save(1, state, {"position": 0}, json.dumps({"bench": True}))
  ck.close()
  fingerprint.params_digest(state.params)  # compile once, as a run's first call does
  times = {k: [] for k in ("data_file", "tokenizer", "params_only", "full_state",
                           "stage_outputs")}
  for _ in range(rounds):
    for key, fn in (("data_file", lambda: fingerprint.file_digest(data)),
                    ("tokenizer", lambda: fingerprint.tokenizer_digest(tok)),
                    ("params_only", lambda: fingerprint.params_digest(state.params)),
                    ("full_state", lambda: fingerprint.params_digest(state)),
                    ("stage_outputs", lambda: stages.outputs(folder))):
      t0 = time.perf_counter()
      fn()
      times[key].append(time.perf_counter() - t0)
  shutil.rmtree(work, ignore_errors=True)
  out = {k: {"median_s": round(statistics.median(v), 4), "best_s": round(min(v), 4)}
         for k, v in times.items()}
  out["data_rows"], out["data_mib"] = rows, round(os.path.getsize(data) / 2**20, 2)
  out["params_mib"] = round(sum(x.nbytes for x in jax.tree.leaves(state.params)) / 2**20, 1)
  out["state_mib"] = round(sum(x.nbytes for x in jax.tree.leaves(state)) / 2**20, 1)
  return out


# ------------------------------------------------------------------ resume memory

def _make_base(path: str, tok_dir: str, layers: int, d_model: int, d_ff: int) -> None:
  import torch
  import transformers
  tok = transformers.AutoTokenizer.from_pretrained(tok_dir)
  torch.manual_seed(0)
  model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(
      vocab_size=len(tok), hidden_size=d_model, intermediate_size=d_ff,
      num_hidden_layers=layers, num_attention_heads=d_model // 64,
      num_key_value_heads=d_model // 128, tie_word_embeddings=False))
  model.save_pretrained(path)
  tok.save_pretrained(path)


def _jaxlab_run(code_root: str, args: list[str]) -> tuple[int, str]:
  """(exit code, stderr tail) of `python -m jaxlab.main args` with the code of `code_root`."""
  p = subprocess.run([sys.executable, "-m", "jaxlab.main", *args], cwd=code_root,
                     env=dict(os.environ, PYTHONPATH=code_root), capture_output=True, text=True)
  return p.returncode, p.stderr[-2000:]


def resume_memory(before: str, layers: int, d_model: int, d_ff: int) -> dict:
  from tests import tokenizers_util
  work = tempfile.mkdtemp(prefix="jaxlab_resume_mem_")
  old_root = os.path.join(work, "before")
  os.makedirs(old_root)
  subprocess.run(f"git -C {ROOT} archive {before} | tar -x -C {old_root}", shell=True, check=True)
  from tests.loop_test import _conversations  # short chat rows: every one fits seq_len 64
  data = os.path.join(work, "train.jsonl")
  with open(data, "w", encoding="utf-8") as f:
    f.writelines(json.dumps(c) + "\n" for c in _conversations(64))
  tok_dir = os.path.join(work, "tok")
  tokenizers_util.make_chatml_tokenizer(tok_dir, vocab_size=300)
  base = os.path.join(work, "base")
  _make_base(base, tok_dir, layers, d_model, d_ff)
  results = {}
  for name, root in (("before", old_root), ("after", ROOT)):
    wd = os.path.join(work, f"run_{name}")
    common = [f"--config={root}/configs/sft.py:tiny", f"--workdir={wd}",
              f"--config.init.hf_path={base}", f"--config.tokenizer.path={base}",
              f"--config.data.train_path={os.path.abspath(data)}", "--config.data.max_examples=64",
              "--config.data.seq_len=64", "--config.train.global_batch_size=2",
              "--config.train.progress=False", "--config.checkpoint.async_save=False",
              "--config.checkpoint.every=0"]
    # The resumed process is measured in a fresh interpreter (its own ru_maxrss).
    rc, err = _jaxlab_run(root, common + ["--config.train.steps=2"])
    if rc:
      raise RuntimeError(f"{name}: first run failed:\n{err}")
    extra = ["--config.resume.allow_changes=train.steps"] if name == "after" else []
    code = ("import resource, runpy, sys; sys.argv = ['jaxlab.main'] + sys.argv[1:]\n"
            "try:\n  runpy.run_module('jaxlab.main', run_name='__main__')\n"
            "except SystemExit as e:\n  rc = e.code\n"
            "print('PEAK_RSS_MIB', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,"
            " file=sys.stderr)\nsys.exit(rc)\n")
    p = subprocess.run([sys.executable, "-c", code, *common, "--config.train.steps=3", *extra],
                       cwd=root, env=dict(os.environ, PYTHONPATH=root), capture_output=True,
                       text=True)
    if p.returncode:
      raise RuntimeError(f"{name}: resume failed:\n{p.stderr[-3000:]}")
    peak = float(p.stderr.rsplit("PEAK_RSS_MIB", 1)[1].split()[0])
    results[name] = {"peak_rss_mib": round(peak, 1)}
  n = layers * (3 * d_model * d_model + 3 * d_model * d_ff)  # q, o: d^2; k, v: d^2/2; MLP
  results["model"] = {"layers": layers, "d_model": d_model, "d_ff": d_ff,
                      "approx_float32_mib": round(4 * n / 2**20, 1)}
  shutil.rmtree(work, ignore_errors=True)
  return results


def main() -> None:
  ap = argparse.ArgumentParser()
  sub = ap.add_subparsers(dest="what", required=True)
  f = sub.add_parser("fingerprint")
  f.add_argument("--rounds", type=int, default=3)
  f.add_argument("--dir", default=os.path.join(tempfile.gettempdir(), "jaxlab_ckbench"))
  i = sub.add_parser("inputs")
  i.add_argument("--rounds", type=int, default=5)
  i.add_argument("--data", default=EM_DATA)
  m = sub.add_parser("resume-memory")
  m.add_argument("--before", required=True, help="git commit of the code to compare with")
  m.add_argument("--layers", type=int, default=8)
  m.add_argument("--d-model", type=int, default=1024)
  m.add_argument("--d-ff", type=int, default=2816)
  args = ap.parse_args()
  from jaxlab import runtime
  runtime.setup()
  if args.what == "fingerprint":
    out = fingerprint_cost(args.rounds, args.dir)
  elif args.what == "inputs":
    out = inputs_cost(args.rounds, args.data)
  else:
    out = resume_memory(args.before, args.layers, args.d_model, args.d_ff)
  print(json.dumps(out, indent=2))


if __name__ == "__main__":
  main()
