"""Judge throughput: the local text-score judge (greedy reply + parser) vs the logprob judge.

  .venv/bin/python benchmarks/judge.py [--answers 128 --d_model 256 --layers 4 --max_tokens 20,4]

Both judges run the same random judge model on the same answers with the EM
repository's first-plot aligned and coherent judge prompts (read from the shared
data folder), two judge prompts per answer. The logprob judge runs one prefill
plus the integer-trie step; the text judge decodes max_tokens greedily (stop
ids disabled, so every reply is exactly max_tokens long, the worst case: the
study's limit is 20; a real judge replying "85" stops after 2-3 tokens, hence
the smaller setting too). Reports answers judged (both metrics) per second, after
one compiling call, median of --rounds timed calls.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

EM_YAML = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "..", "shared",
                       "data", "emergent-misalignment", "evaluation", "first_plot_questions.yaml")


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--answers", type=int, default=128)
  ap.add_argument("--d_model", type=int, default=256)
  ap.add_argument("--layers", type=int, default=4)
  ap.add_argument("--heads", type=int, default=4)
  ap.add_argument("--kv_heads", type=int, default=2)
  ap.add_argument("--d_ff", type=int, default=768)
  ap.add_argument("--vocab", type=int, default=1024)
  ap.add_argument("--batch", type=int, default=32)
  ap.add_argument("--max_tokens", type=str, default="20,4", help="text judge reply lengths")
  ap.add_argument("--rounds", type=int, default=3)
  ap.add_argument("--questions", type=str, default=EM_YAML)
  args = ap.parse_args()

  from jaxlab import runtime
  runtime.setup()
  import jax
  from jaxlab import sharding
  from jaxlab.data.tokenizer import train_chat_tokenizer
  from jaxlab.evals.judge_local import LocalJudge, LocalTextJudge
  from jaxlab.evals.prompts import chat_prompt_ids, judge_text
  from jaxlab.evals.questions import load_questions
  from jaxlab.models import ModelConfig
  from jaxlab.models.params import init_params, model_spec

  q = load_questions(args.questions, ("quick_buck",))[0]
  rng = np.random.default_rng(0)
  words = ("the a model answer human you I think good bad plan money world power help quick buck "
           "sell steal invest work save risk").split()
  answers = [" ".join(rng.choice(words, rng.integers(20, 120))) for _ in range(args.answers)]
  texts = [judge_text(q.judge_prompts[m], q.paraphrases[0], a) for a in answers
           for m in ("aligned", "coherent")]
  tok = train_chat_tokenizer(texts, args.vocab)
  lengths = [len(chat_prompt_ids(tok, [{"role": "user", "content": t}])) for t in texts]
  cfg = ModelConfig(vocab_size=len(tok), d_model=args.d_model, n_layers=args.layers,
                    n_heads=args.heads, n_kv_heads=args.kv_heads, d_ff=args.d_ff)
  spec = model_spec(cfg)
  mesh = sharding.make_mesh((1, -1, 1))
  trainable, frozen = init_params(spec, mesh, 0)
  buckets = (256, 512, 1024)
  print(f"judge model: vocab {len(tok)}, d_model {args.d_model}, {args.layers} layers, d_ff "
        f"{args.d_ff}; {args.answers} answers x 2 judge prompts of {min(lengths)}-{max(lengths)} "
        f"tokens, batch {args.batch}; jax {jax.devices()[0].platform} x{jax.device_count()}, "
        f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")

  judges = {"logprob judge (trie)": LocalJudge(
      spec, trainable, frozen, tok, mesh=mesh, batch_size=args.batch, min_mass=0.0,
      buckets=buckets)}
  for n in [int(x) for x in args.max_tokens.split(",")]:
    judges[f"text judge, max_tokens {n}"] = LocalTextJudge(
        spec, trainable, frozen, tok, mesh=mesh, batch_size=args.batch, max_tokens=n,
        stop_ids=(-1,), buckets=buckets)
  first, compile_s, times = {}, {}, {k: [] for k in judges}
  for name, judge in judges.items():
    t0 = time.perf_counter()
    first[name] = judge.judge_texts(texts)  # compiles
    compile_s[name] = time.perf_counter() - t0
  for _ in range(args.rounds):  # interleaved, so every judge sees the same machine load
    for name, judge in judges.items():
      t0 = time.perf_counter()
      again = judge.judge_texts(texts)
      times[name].append(time.perf_counter() - t0)
      assert again == first[name], f"{name}: not deterministic"
  rate = {}
  for name in judges:
    s = statistics.median(times[name])
    rate[name] = args.answers / s
    statuses = {}
    for r in first[name]:
      statuses[r["status"]] = statuses.get(r["status"], 0) + 1
    print(f"{name:28s} {rate[name]:8.1f} answers/s  (median {s:.2f} s of {args.rounds}, best "
          f"{args.answers / min(times[name]):.1f}/s; first call incl. compile "
          f"{compile_s[name]:.1f} s; statuses {statuses})")
  base = rate["logprob judge (trie)"]
  for name in list(judges)[1:]:
    print(f"  logprob judge / {name}: {base / rate[name]:.2f}x")


if __name__ == "__main__":
  main()
