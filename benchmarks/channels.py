"""Channel step throughput, the on-policy overhead, the TRL anchor and the chunked-loss memory.

  python benchmarks/channels.py [--steps 4] [--out results.json] [--skip-memory] [--skip-torch]

One run, same shapes everywhere (default: 4 layers, d_model 512, 8 heads / 8 kv heads, MLP 1376,
vocab 8192; batch 8, prompt 32 tokens, 128 completion / sampled tokens; student and teacher of
the same shape, different random weights; float32 on CPU):

* jaxlab, each channel's jitted step (`jaxlab.train.step.make_step`): sft, offpolicy with a live
  teacher, offpolicy from cached top-64 teacher log-probs, onpolicy (exact reverse KL), gkd
  (lambda 0.5, beta 0.5). Also, alone, the in-step sampler (`channels.common.rollout`, the same
  jitted sampling the onpolicy step runs) so that onpolicy's step time can be set against
  sampling time + offpolicy step time, measured in the same process.
* TRL (PyTorch): the on-policy GKD step with lmbda 1 and beta 1 (reverse KL) built from TRL's
  own `GKDTrainer.generate_on_policy_outputs` (transformers `generate`) and
  `GKDTrainer.generalized_jsd_loss`, then backward and torch AdamW, on transformers'
  `LlamaForCausalLM` of the same shape. The Trainer's own bookkeeping is left out, which only
  flatters TRL. Runs in its own process, after jaxlab's.
* Memory: XLA's compiled temp size of the offpolicy loss + gradient at vocabulary 152,064,
  batch 4, completion 1024 (a 1-layer d_model 64 student and teacher, so the logits dominate),
  with the loss chunked over 128 positions against unchunked. Compiled, not run.

Times are medians over --steps steps after one warm-up (compile) step.
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

SHAPE = dict(n_layers=4, d_model=512, n_heads=8, n_kv_heads=8, d_ff=1376, vocab=8192)
BATCH, PROMPT, COMPLETION, TOPK = 8, 32, 128, 64
STOP = 2  # a stop id; random weights rarely sample it, so rows run to the full 128 tokens


def _median(xs):
  xs = sorted(xs)
  return xs[len(xs) // 2]


def _batch(seed=0):
  import numpy as np
  rng = np.random.default_rng(seed)
  v = SHAPE["vocab"]
  plen = rng.integers(PROMPT // 2, PROMPT + 1, BATCH)
  prompt = np.where(np.arange(PROMPT)[None] >= PROMPT - plen[:, None],
                    rng.integers(3, v, (BATCH, PROMPT)), 0).astype(np.int32)
  return {"prompt": prompt, "prompt_len": plen.astype(np.int32),
          "teacher_prompt": prompt.copy(), "teacher_prompt_len": plen.astype(np.int32),
          "completion": rng.integers(3, v, (BATCH, COMPLETION)).astype(np.int32),
          "loss_mask": np.ones((BATCH, COMPLETION), np.float32)}


def jax_child(steps: int, skip_memory: bool) -> dict:
  from jaxlab import runtime
  runtime.setup()
  import jax
  import jax.numpy as jnp
  import ml_collections
  from jaxlab import sharding
  from jaxlab.models import ModelConfig
  from jaxlab.models.params import init_params, model_spec
  from jaxlab.train import channels, optim, step as step_lib
  from jaxlab.train import state as state_lib
  from jaxlab.train.channels import common
  from jaxlab.train.topk_cache import teacher_topk_fn

  cfg = ModelConfig(vocab_size=SHAPE["vocab"], d_model=SHAPE["d_model"], n_layers=SHAPE["n_layers"],
                    n_heads=SHAPE["n_heads"], n_kv_heads=SHAPE["n_kv_heads"], d_ff=SHAPE["d_ff"],
                    tie_embeddings=False)
  mesh = sharding.make_mesh((1, 1, 1), jax.devices()[:1])
  rules = sharding.DEFAULT_RULES
  spec = model_spec(cfg)
  teacher = init_params(spec, mesh, 1, rules)
  ocfg = ml_collections.ConfigDict(dict(lr=1e-4, warmup_steps=0, decay="constant", end_ratio=0.0,
                                        weight_decay=0.0, clip_norm=0.0, b1=0.9, b2=0.999,
                                        eps=1e-8))
  opt, sched = optim.make_optimizer(ocfg, 1000)
  state_sh = state_lib.state_shardings(spec, opt, mesh, rules)
  batch = jax.device_put(_batch())
  base = dict(spec=spec, teacher_spec=spec, stop_ids=(STOP,), pad_id=0, mesh=mesh, rules=rules)
  topk_ids, topk_logp = teacher_topk_fn(common.Context(**base), TOPK)(teacher, batch)
  cached = {**batch, "topk_ids": topk_ids, "topk_logp": topk_logp}
  runs = {
      "sft": ("sft", {}, batch, None),
      "offpolicy (live teacher)": ("offpolicy", {"kl": "forward"}, batch, teacher),
      "offpolicy (cached top-64)": ("offpolicy", {"kl": "forward"}, cached, None),
      "onpolicy (exact reverse KL)": ("onpolicy", {"kl": "reverse"}, batch, teacher),
      "gkd (lambda 0.5, beta 0.5)": ("gkd", {"kl": "jsd", "lmbda": 0.5, "beta": 0.5}, batch,
                                     teacher),
  }
  out = {}
  for label, (name, kw, b, t) in runs.items():
    ctx = common.Context(**base, **kw)
    step = jax.jit(step_lib.make_step(channels.get(name), ctx, opt, sched), donate_argnums=(0,))
    state = state_lib.create_state(spec, opt, mesh, rules, seed=0)
    times, tokens, lens = [], [], []
    for i in range(steps + 1):
      t0 = time.perf_counter()
      state, m = step(state, b, t)
      m = jax.device_get(m)
      if i:
        times.append(time.perf_counter() - t0)
        tokens.append(float(m["trained_tokens"]))
        lens.append(float(m.get("sample_len", 0.0)))
    med = _median(times)
    out[label] = {"step_s": med, "steps_per_s": 1 / med,
                  "trained_tokens_per_s": _median(tokens) / med,
                  "sample_len": _median(lens) if name in ("onpolicy", "gkd") else None}
    del state
  ctx = common.Context(**base)
  roll = jax.jit(lambda p, f, b, r: common.rollout(ctx, p, f, b, r))
  params = init_params(spec, mesh, 0, rules)
  times = []
  for i in range(steps + 1):
    t0 = time.perf_counter()
    o, _ = roll(*params, batch, jax.random.key(i))
    jax.block_until_ready(o["completion"])
    if i:
      times.append(time.perf_counter() - t0)
  out["sampling alone (rollout)"] = {"step_s": _median(times),
                                     "sampled_tokens_per_s": BATCH * COMPLETION / _median(times)}
  on = out["onpolicy (exact reverse KL)"]["step_s"]
  parts = out["sampling alone (rollout)"]["step_s"] + out["offpolicy (live teacher)"]["step_s"]
  out["onpolicy_vs_sampling_plus_offpolicy"] = on / parts
  if not skip_memory:
    out["memory"] = loss_memory()
  return out


def loss_memory() -> dict:
  """Compiled temp bytes of the offpolicy loss + grad at V=152064, B=4, C=1024."""
  import jax
  import jax.numpy as jnp
  from jaxlab.models import ModelConfig
  from jaxlab.models.params import model_spec
  from jaxlab.train.channels import common, offpolicy
  cfg = ModelConfig(vocab_size=152064, d_model=64, n_layers=1, n_heads=4, n_kv_heads=4, d_ff=128)
  spec = model_spec(cfg)
  b, p, c = 4, 16, 1024
  batch = {"prompt": jax.ShapeDtypeStruct((b, p), jnp.int32),
           "prompt_len": jax.ShapeDtypeStruct((b,), jnp.int32),
           "teacher_prompt": jax.ShapeDtypeStruct((b, p), jnp.int32),
           "teacher_prompt_len": jax.ShapeDtypeStruct((b,), jnp.int32),
           "completion": jax.ShapeDtypeStruct((b, c), jnp.int32),
           "loss_mask": jax.ShapeDtypeStruct((b, c), jnp.float32)}
  out = {}
  for chunk in (0, 128):
    ctx = common.Context(spec=spec, teacher_spec=spec, loss_chunk=chunk)
    def f(params, frozen, teacher, batch):
      return jax.grad(lambda p: offpolicy.loss_sum(ctx, p, frozen, teacher, batch)[0])(params)
    t0 = time.perf_counter()
    compiled = jax.jit(f).lower(spec.abstract[0], spec.abstract[1], spec.abstract, batch).compile()
    mem = compiled.memory_analysis()
    out["unchunked" if chunk == 0 else f"chunk {chunk}"] = {
        "temp_GiB": mem.temp_size_in_bytes / 2**30, "compile_s": time.perf_counter() - t0}
  out["logits_one_side_GiB"] = b * c * cfg.vocab_size * 4 / 2**30
  return out


def torch_child(steps: int) -> dict:
  import torch
  import transformers
  from trl.experimental.gkd.gkd_trainer import GKDTrainer
  torch.manual_seed(0)
  hf = transformers.LlamaConfig(
      vocab_size=SHAPE["vocab"], hidden_size=SHAPE["d_model"], intermediate_size=SHAPE["d_ff"],
      num_hidden_layers=SHAPE["n_layers"], num_attention_heads=SHAPE["n_heads"],
      num_key_value_heads=SHAPE["n_kv_heads"], tie_word_embeddings=False, pad_token_id=0,
      bos_token_id=1, eos_token_id=STOP)
  student = transformers.LlamaForCausalLM(hf)
  teacher = transformers.LlamaForCausalLM(hf).eval()
  opt = torch.optim.AdamW(student.parameters(), lr=1e-4, weight_decay=0.0)
  gen = transformers.GenerationConfig(max_new_tokens=COMPLETION, do_sample=True, temperature=1.0,
                                      top_k=0, top_p=1.0, pad_token_id=0, eos_token_id=STOP)
  b = _batch()
  inputs = {"prompts": torch.tensor(b["prompt"], dtype=torch.long),
            "prompt_attention_mask": torch.tensor(
                (b["prompt"] != 0) | (torch.arange(PROMPT)[None].numpy() >=
                                      PROMPT - b["prompt_len"][:, None]), dtype=torch.long)}
  times, gen_times, tokens = [], [], []
  for i in range(steps + 1):
    t0 = time.perf_counter()
    with torch.no_grad():
      ids, attn, labels = GKDTrainer.generate_on_policy_outputs(student, inputs, gen)
    t1 = time.perf_counter()
    s = student(input_ids=ids, attention_mask=attn).logits
    with torch.no_grad():
      t = teacher(input_ids=ids, attention_mask=attn).logits
    loss = GKDTrainer.generalized_jsd_loss(s[:, :-1], t[:, :-1], labels=labels[:, 1:], beta=1.0)
    loss.backward()
    opt.step()
    opt.zero_grad()
    if i:
      times.append(time.perf_counter() - t0)
      gen_times.append(t1 - t0)
      tokens.append(int((labels[:, 1:] != -100).sum()))
  med = _median(times)
  return {"TRL GKD on-policy (lmbda 1, beta 1)": {
      "step_s": med, "steps_per_s": 1 / med, "generate_s": _median(gen_times),
      "trained_tokens_per_s": _median(tokens) / med,
      "sampled_tokens_per_s": BATCH * COMPLETION / med}}


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--steps", type=int, default=4)
  ap.add_argument("--child", choices=["jax", "torch"])
  ap.add_argument("--skip-memory", action="store_true")
  ap.add_argument("--skip-torch", action="store_true")
  ap.add_argument("--out", default="")
  a = ap.parse_args()
  if a.child:
    res = jax_child(a.steps, a.skip_memory) if a.child == "jax" else torch_child(a.steps)
    print("RESULT " + json.dumps(res))
    return
  results = {}
  for child in ("jax",) + (() if a.skip_torch else ("torch",)):
    cmd = [sys.executable, __file__, "--child", child, "--steps", str(a.steps)]
    cmd += ["--skip-memory"] if a.skip_memory else []
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if proc.returncode:
      sys.exit(f"{child} child failed:\n{proc.stderr[-4000:]}")
    line = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")][-1]
    results.update(json.loads(line[len("RESULT "):]))
  trl = results.get("TRL GKD on-policy (lmbda 1, beta 1)")
  print(f"shape {SHAPE}, batch {BATCH}, prompt {PROMPT}, completion {COMPLETION}, CPU float32")
  print(f"{'configuration':34s} {'step s':>8s} {'steps/s':>8s} {'trained tok/s':>14s}")
  for k, v in results.items():
    if isinstance(v, dict) and "step_s" in v:
      print(f"{k:34s} {v['step_s']:8.3f} {1 / v['step_s']:8.3f} "
            f"{v.get('trained_tokens_per_s', v.get('sampled_tokens_per_s', 0)):14.0f}")
  print(f"onpolicy step / (sampling + offpolicy step): "
        f"{results['onpolicy_vs_sampling_plus_offpolicy']:.2f}x (target <= 1.3x)")
  if trl:
    for k in ("onpolicy (exact reverse KL)", "gkd (lambda 0.5, beta 0.5)"):
      print(f"{k} vs TRL GKD on-policy: {trl['step_s'] / results[k]['step_s']:.2f}x faster "
            "per step")
  if "memory" in results:
    for k, v in results["memory"].items():
      print(f"offpolicy loss+grad memory, {k}: {v}")
  if a.out:
    with open(a.out, "w") as f:
      json.dump(results, f, indent=2)


if __name__ == "__main__":
  main()
