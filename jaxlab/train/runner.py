"""The one training runner: every channel (config key `channel`) runs through here.

data -> sharded state (+ a frozen teacher) -> jitted channel steps -> metrics and checkpoints.
State lives here at the edge; the step itself is pure (jaxlab.train.step). A restarted run
restores the latest checkpoint (params, optimizer, step, RNG and the data iterator position);
since the step's RNG is derived from the state, a resumed on-policy run samples exactly what the
straight run would have.

Where a model comes from (student `init.*`, `teacher.path`):
  an HF folder (config.json + safetensors), a jaxlab workdir (its latest checkpoint), or, for
  the teacher, "base": the student's own initialisation (same HF folder / workdir / seed).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from jaxlab import sharding as sharding_lib
from jaxlab.checkpoint import Checkpointer
from jaxlab.data import prompt_completion as pc
from jaxlab.data.chat import end_of_turn_ids, pad_id
from jaxlab.metrics import MetricsWriter
from jaxlab.models.config import ModelConfig
from jaxlab.models.params import model_spec
from jaxlab.train import channels, losses, optim
from jaxlab.train import state as state_lib
from jaxlab.train import step as step_lib
from jaxlab.train.channels import common


def mesh_and_rules(config: ml_collections.ConfigDict):
  """The device mesh and the logical-axis rules from config.mesh."""
  rules = dict(sharding_lib.DEFAULT_RULES)
  rules.update({k: (tuple(v) if isinstance(v, (list, tuple)) else v)
                for k, v in config.mesh.get("rules", {}).items()})
  return sharding_lib.make_mesh(config.mesh.shape), rules


def load_or_train_tokenizer(config: ml_collections.ConfigDict, workdir: str):
  """config.tokenizer.path (an HF folder) or a small BPE trained on the train set, kept in workdir."""
  from transformers import AutoTokenizer
  if config.tokenizer.path:
    return AutoTokenizer.from_pretrained(config.tokenizer.path, local_files_only=True)
  out_dir = os.path.join(workdir, "tokenizer")
  if os.path.exists(os.path.join(out_dir, "tokenizer.json")):
    return AutoTokenizer.from_pretrained(out_dir, local_files_only=True)
  from jaxlab.data.chat import read_chat_jsonl
  from jaxlab.data.tokenizer import train_chat_tokenizer
  convs = read_chat_jsonl(config.data.train_path)
  texts = [m["content"] for c in convs[:config.data.max_examples or None] for m in c.messages]
  tok = train_chat_tokenizer(texts, config.tokenizer.vocab_size, out_dir=out_dir + ".tmp")
  os.replace(out_dir + ".tmp", out_dir)  # atomic: a killed run never leaves half a tokenizer
  return tok


def model_config(config: ml_collections.ConfigDict, vocab_size: int) -> ModelConfig:
  """ModelConfig from config.model; vocab_size <= 0 means 'the tokenizer's'."""
  d = config.model.to_dict()
  if d.get("vocab_size", 0) <= 0:
    d["vocab_size"] = vocab_size
  return ModelConfig.from_dict(d)


def _is_workdir(path: str) -> bool:
  return os.path.isdir(os.path.join(path, "checkpoints"))


def load_model(path: str, mesh, rules, *, key: str, dtype: str | None = None,
               param_dtype: str | None = None, lora=None, seed: int = 0):
  """(cfg, trainable, frozen) from an HF folder or a jaxlab workdir; `key` names the config key
  in errors. With `lora`, the loaded weights are the frozen base and fresh adapters train."""
  from jaxlab.checkpoint import load_params
  from jaxlab.models.hf import init_lora, load_hf
  from jaxlab.models.params import merge_lora
  if _is_workdir(path):
    cfg, trainable, frozen = load_params(path, mesh)
    params = merge_lora(trainable, frozen, cfg)
    cfg = cfg.replace(lora=lora)
    if dtype:
      cfg = cfg.replace(dtype=dtype)
    if lora is None:
      return cfg, params, {}
    return cfg, init_lora(model_spec(cfg), mesh, seed, rules), params
  if os.path.isfile(os.path.join(path, "config.json")):
    return load_hf(path, mesh, dtype=dtype, param_dtype=param_dtype, rules=rules, lora=lora,
                   seed=seed)
  raise ValueError(f"config key {key}={path!r} is neither a Hugging Face checkpoint folder "
                   "(config.json + *.safetensors) nor a jaxlab workdir (checkpoints/)")


def init_student(config, tokenizer, mesh, rules):
  """(cfg, (trainable, frozen) or None for a fresh init, base_is_external)."""
  lora = model_config(config, len(tokenizer)).lora
  source = config.init.hf_path or config.init.get("workdir", "")
  if config.init.hf_path and config.init.get("workdir", ""):
    raise ValueError("config keys init.hf_path and init.workdir are both set; give one")
  if not source:
    return model_config(config, len(tokenizer)), None, False
  key = "init.hf_path" if config.init.hf_path else "init.workdir"
  cfg, *params = load_model(source, mesh, rules, key=key, dtype=config.model.dtype,
                            param_dtype=config.model.param_dtype, lora=lora, seed=config.seed)
  cfg = cfg.replace(remat=config.model.remat)
  with config.unlocked():  # the saved config describes the model actually trained
    config.model.update({k: v for k, v in dataclasses.asdict(cfg).items()
                         if k in config.model and k != "lora"})
  return cfg, tuple(params), lora is not None


def load_teacher(config, student_cfg: ModelConfig, mesh, rules):
  """(teacher spec, (trainable, frozen)) in the teacher's shardings, cast to teacher.dtype."""
  path = config.teacher.path
  if not path:
    raise ValueError(f"config key teacher.path is empty; channel {config.channel!r} needs a "
                     "teacher (an HF folder, a jaxlab workdir, or 'base')")
  dtype = config.teacher.get("dtype", "") or None
  if path == "base":
    source = config.init.hf_path or config.init.get("workdir", "")
    if source:
      cfg, tr, fr = load_model(source, mesh, rules, key="teacher.path(base)", dtype=dtype)
    else:  # the student's own fresh init: same config and seed, no adapters
      from jaxlab.models.params import init_params
      cfg = student_cfg.replace(lora=None)
      tr, fr = init_params(model_spec(cfg), mesh, config.seed, rules)
  else:
    cfg, tr, fr = load_model(path, mesh, rules, key="teacher.path", dtype=dtype)
  if cfg.vocab_size != student_cfg.vocab_size:
    raise ValueError(f"config key teacher.path={path!r}: the teacher's vocabulary has "
                     f"{cfg.vocab_size} tokens, the student's {student_cfg.vocab_size}; "
                     "distillation needs the same tokenizer")
  cfg = cfg.replace(remat=False)
  if dtype:
    cfg = cfg.replace(dtype=dtype, param_dtype=dtype)
    tr, fr = jax.tree.map(lambda x: x.astype(dtype), (tr, fr))
  spec = model_spec(cfg)
  return spec, jax.device_put((tr, fr), spec.shardings(mesh, rules))


def distill_context(config, spec, teacher_spec, channel, tokenizer, mesh, rules) -> common.Context:
  d = config.get("distill", ml_collections.ConfigDict())
  kl = d.get("kl", "") or channel.DEFAULT_KL or "forward"
  if kl not in losses.DIVERGENCES:
    raise ValueError(f"config key distill.kl={kl!r}: expected one of {losses.DIVERGENCES}")
  return common.Context(
      spec=spec, teacher_spec=teacher_spec, kl=kl, beta=float(d.get("beta", 0.5)),
      temperature=float(d.get("temperature", 1.0)), lmbda=float(d.get("lmbda", 0.5)),
      estimator=d.get("estimator", "exact"), loss_chunk=int(d.get("loss_chunk", 0)),
      sample_temperature=float(d.get("sample_temperature", 1.0)),
      top_p=float(d.get("top_p", 1.0)), stop_ids=tuple(end_of_turn_ids(tokenizer)),
      pad_id=pad_id(tokenizer), mesh=mesh, rules=rules)


# ------------------------------------------------------------------ teacher top-k cache

def tokenizer_fingerprint(tokenizer) -> str:
  vocab = sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1])
  return hashlib.sha256(json.dumps(vocab).encode()).hexdigest()[:16]


def _topk_meta(config, tokenizer, teacher_cfg: ModelConfig) -> dict:
  return {"tokenizer": tokenizer_fingerprint(tokenizer), "vocab_size": teacher_cfg.vocab_size,
          "k": int(config.distill.topk), "temperature": float(config.distill.temperature),
          "completion_len": int(config.data.completion_len),
          "data": os.path.abspath(config.data.train_path),
          "teacher": config.teacher.path, "teacher_system": config.teacher.system_prompt}


def teacher_topk_fn(ctx: common.Context, k: int):
  """jitted (teacher, batch) -> (top-k ids [B,C,k], their log-probs at ctx.temperature)."""
  def fn(teacher, batch):
    tmodel, xt = common.teacher_hidden(ctx, teacher, batch)
    def one(x):
      lp = jax.nn.log_softmax(tmodel.logits(x) / ctx.temperature, axis=-1)
      vals, ids = jax.lax.top_k(lp, k)
      return ids.astype(jnp.int32), vals
    c = xt.shape[1]
    chunk = ctx.loss_chunk if 0 < ctx.loss_chunk < c else c
    outs = [one(xt[:, i:i + chunk]) for i in range(0, c, chunk)]
    return tuple(jnp.concatenate(z, axis=1) for z in zip(*outs))
  return jax.jit(fn)


def load_or_compute_topk(config, path: str, examples, ids, tokenizer, teacher_spec, teacher,
                         ctx, mesh, rules) -> dict[str, np.ndarray]:
  """Cached teacher top-k log-probs for every example ({"topk_ids", "topk_logp"}: [N, C, k]).

  The file (npz + a meta record) is reused when its meta matches this run's tokenizer,
  vocabulary, k, temperature, lengths, data, teacher and teacher prompt, and refused otherwise.
  """
  from etils import epath
  file = epath.Path(path)
  want = _topk_meta(config, tokenizer, teacher_spec.cfg if teacher_spec else None) \
      if teacher_spec else None
  if file.exists():
    with file.open("rb") as f:
      z = np.load(f, allow_pickle=False)
      meta = json.loads(str(z["meta"]))
      out = {"topk_ids": z["topk_ids"], "topk_logp": z["topk_logp"]}
    if meta["tokenizer"] != tokenizer_fingerprint(tokenizer):
      raise ValueError(f"{path}: teacher top-k file was made with another tokenizer "
                       f"(fingerprint {meta['tokenizer']}, this run's "
                       f"{tokenizer_fingerprint(tokenizer)}); delete it or point "
                       "distill.topk_path elsewhere")
    mine = {"k": int(config.distill.topk), "temperature": float(config.distill.temperature),
            "completion_len": int(config.data.completion_len),
            "data": os.path.abspath(config.data.train_path),
            "teacher_system": config.teacher.system_prompt}
    diff = {k: (meta.get(k), v) for k, v in mine.items() if meta.get(k) != v}
    if diff:
      raise ValueError(f"{path}: teacher top-k file was made with other settings "
                       f"(file, this run): {diff}")
    if len(out["topk_ids"]) != len(examples):
      raise ValueError(f"{path}: holds {len(out['topk_ids'])} rows, the data has {len(examples)}")
    return out
  if teacher is None:
    raise ValueError(f"{path} does not exist and no teacher is loaded to compute it")
  fn = teacher_topk_fn(ctx, int(config.distill.topk))
  lengths = dict(prompt_len=config.data.prompt_len, teacher_prompt_len=config.data.teacher_prompt_len,
                 completion_len=config.data.completion_len)
  bs = config.train.global_batch_size
  all_ids, all_lp = [], []
  for s in range(0, len(examples), bs):
    chunk = list(range(s, min(s + bs, len(examples))))
    rows = [examples[i] for i in chunk] + [examples[chunk[0]]] * (bs - len(chunk))
    batch = pc.make_batch(rows, pad_id=ctx.pad_id, **lengths)
    batch = {k: v for k, v in batch.items() if k.startswith("teacher_") or k == "completion"}
    i, lp = jax.device_get(fn(teacher, batch))
    all_ids.append(i[:len(chunk)])
    all_lp.append(lp[:len(chunk)].astype(np.float32))
  out = {"topk_ids": np.concatenate(all_ids), "topk_logp": np.concatenate(all_lp)}
  if jax.process_index() == 0:
    file.parent.mkdir(parents=True, exist_ok=True)
    tmp = file.parent / (file.name + ".tmp")
    with tmp.open("wb") as f:
      np.savez(f, meta=json.dumps(want), **out)
    tmp.rename(file)
  return out


# ------------------------------------------------------------------ data

def make_prompt_completion_data(config, channel, tokenizer, extras_fn=None):
  """(train batches, held-out batch or None, stats, examples, train ids)."""
  system = config.teacher.get("system_prompt", None) if "teacher" in config else None
  examples = pc.load_examples(config.data.train_path, tokenizer,
                              teacher_system=system if system else None,
                              max_examples=config.data.max_examples or None)
  need_completion = channel.__name__.rsplit(".", 1)[-1] in ("sft", "offpolicy", "gkd")
  lengths = dict(prompt_len=config.data.prompt_len, teacher_prompt_len=config.data.teacher_prompt_len,
                 completion_len=config.data.completion_len)
  ids, stats = pc.fit_examples(examples, need_completion=need_completion, **lengths)
  n_held = int(config.get("distill", {}).get("heldout_rows", 0) or 0)
  held = ids[len(ids) - n_held:] if n_held else []
  train = ids[:len(ids) - n_held] if n_held else ids
  stats["heldout_rows"] = len(held)
  return examples, train, held, stats, lengths


def run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Trains config.channel to config.train.steps (resuming if a checkpoint exists)."""
  channel = channels.get(config.get("channel", "sft"))
  os.makedirs(workdir, exist_ok=True)
  if not config.data.train_path or not os.path.isfile(config.data.train_path):
    raise ValueError(f"config key data.train_path={config.data.train_path!r} is not a file: "
                     "point it at a chat JSONL file")
  mesh, rules = mesh_and_rules(config)
  tokenizer = load_or_train_tokenizer(config, workdir)
  cfg, init_params, external_base = init_student(config, tokenizer, mesh, rules)
  if cfg.vocab_size < len(tokenizer):
    raise ValueError(f"config key model.vocab_size={cfg.vocab_size} is smaller than the "
                     f"tokenizer's {len(tokenizer)} tokens")
  config.model.vocab_size = cfg.vocab_size  # the saved config is the resolved one
  spec = model_spec(cfg)
  use_cache = channel.DATA == "prompt_completion" and int(config.distill.get("topk", 0)) > 0
  teacher_spec, teacher = None, None
  if channel.NEEDS_TEACHER:
    teacher_spec, teacher = load_teacher(config, cfg, mesh, rules)
  ctx = distill_context(config, spec, teacher_spec, channel, tokenizer, mesh, rules) \
      if channel.DATA == "prompt_completion" else common.Context(
          spec=spec, loss_chunk=int(config.get("distill", {}).get("loss_chunk", 0)))
  config_json = config.to_json_best_effort(indent=2)
  with open(os.path.join(workdir, "config.json"), "w") as f:
    f.write(config_json)

  held_batch = None
  if channel.DATA == "packed":
    from jaxlab.data.sources import make_batches
    batches, stats = make_batches(config, tokenizer)
    data_metrics = {"data_truncated": stats.get("truncated", 0),
                    "data_dropped": stats.get("dropped", 0)}
  else:
    examples, train_ids, held_ids, stats, lengths = make_prompt_completion_data(
        config, channel, tokenizer)
    extras = None
    if use_cache:
      path = config.distill.get("topk_path", "") or os.path.join(workdir, "teacher_topk.npz")
      extras = load_or_compute_topk(config, path, examples, train_ids, tokenizer, teacher_spec,
                                    teacher, ctx, mesh, rules)
      stats["topk_path"] = path
    batches = pc.PromptCompletionBatches(
        examples, train_ids, global_batch_size=config.train.global_batch_size, seed=config.seed,
        pad_id=ctx.pad_id, process_index=jax.process_index(),
        process_count=jax.process_count(), extras=extras, **lengths)
    if held_ids:
      held_batch = batches.batch_for(np.asarray(held_ids))
    data_metrics = {"data_truncated": stats["truncated"],
                    "data_dropped": stats["examples_total"] - stats["examples_kept"]}

  total = config.train.steps
  optimizer, schedule = optim.make_optimizer(config.optim, total)
  state_sh = state_lib.state_shardings(spec, optimizer, mesh, rules)
  ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), every=config.checkpoint.every,
                      keep=config.checkpoint.keep, async_save=config.checkpoint.async_save)
  # Base weights loaded from an HF folder / workdir with LoRA are not saved: they reload from there.
  frozen_external = external_base
  if ckpt.latest_step() is not None:
    abstract = state_lib.abstract_state(spec, optimizer, state_sh)
    if frozen_external:
      abstract = abstract.replace(frozen={})
    state, data_state, _ = ckpt.restore(abstract)
    if frozen_external:
      state = state.replace(frozen=init_params[1])
    batches.set_state(data_state)
  else:
    state = state_lib.create_state(spec, optimizer, mesh, rules, config.seed, params=init_params)
  del init_params
  start = int(jax.device_get(state.step))

  if channel.DATA == "prompt_completion":
    ndims = {k: v.ndim for k, v in batches.batch_for(np.asarray(train_ids[:1])).items()}
  else:
    ndims = dict.fromkeys(("inputs", "targets", "positions", "segment_ids", "loss_mask"), 2)
  batch_sh = {k: sharding_lib.batch_sharding(mesh, n, rules=rules) for k, n in ndims.items()}
  teacher_sh = teacher_spec.shardings(mesh, rules) if teacher is not None else None
  step_fn = step_lib.jit_step(
      step_lib.make_step(channel, ctx, optimizer, schedule, config.train.grad_accum),
      state_sh, batch_sh, mesh, teacher_sh)
  if use_cache:
    teacher = None  # the cache replaces the live teacher in the step
    step_fn_call = lambda st, b: step_fn(st, b, None)
  else:
    step_fn_call = lambda st, b: step_fn(st, b, teacher)
  heldout_fn = None
  if held_batch is not None and (teacher is not None or use_cache):
    heldout_fn = jax.jit(heldout_kl_fn(ctx))
    # Every host builds the same held-out rows, so each contributes only its share.
    per = len(held_ids) // jax.process_count()
    mine = {k: v[jax.process_index() * per:(jax.process_index() + 1) * per]
            for k, v in held_batch.items()}
    held_global = sharding_lib.host_local_to_global(mine, mesh, rules=rules)
  eval_every = int(config.get("distill", {}).get("eval_every", 0) or 0)

  writer = MetricsWriter(workdir, total, start, progress=config.train.progress)
  info = {"channel": config.get("channel", "sft")}
  if channel.DATA == "prompt_completion":
    info.update(kl=ctx.kl, beta=ctx.beta, temperature=ctx.temperature,
                estimator=ctx.estimator if info["channel"] == "onpolicy" else None,
                lmbda=ctx.lmbda if info["channel"] == "gkd" else None,
                teacher=config.teacher.path, teacher_cache=bool(use_cache))
  if jax.process_index() == 0:
    with open(os.path.join(workdir, "channel.json"), "w") as f:
      json.dump(info, f, indent=2)
  pending, last, t_last = None, {}, time.perf_counter()

  def heldout_metrics(state):
    if heldout_fn is None:
      return {}
    out = jax.device_get(heldout_fn(state.params, state.frozen, teacher, held_global))
    return {k: float(v) for k, v in out.items()}

  if heldout_fn is not None and start == 0:
    writer.write(0, heldout_metrics(state))

  def flush(pending):
    # Fetch one step late so the host never waits on the device it just fed.
    step, metrics, extra = pending
    metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
    nonlocal t_last
    now = time.perf_counter()
    metrics["trained_tokens_per_s"] = metrics["trained_tokens"] / max(now - t_last, 1e-9)
    t_last = now
    if "kl" in info:
      metrics[f"loss_{info['kl']}"] = metrics["loss"]
    if step % config.train.log_every == 0 or step == total or extra:
      writer.write(step, {**metrics, **data_metrics, **extra})
    return metrics

  for step in range(start, total):
    batch = sharding_lib.host_local_to_global(next(batches), mesh, rules=rules)
    state, metrics = step_fn_call(state, batch)
    extra = heldout_metrics(state) if eval_every and ((step + 1) % eval_every == 0
                                                      or step + 1 == total) else {}
    if pending is not None:
      last = flush(pending)
    pending = (step + 1, metrics, extra)
    if ckpt.should_save(step + 1) or step + 1 == total:
      # Metrics of a checkpointed step are on disk before its checkpoint, so a killed
      # and resumed run has every row.
      last, pending = flush(pending), None
      ckpt.save(step + 1, state.replace(frozen={}) if frozen_external else state,
                batches.get_state(), config_json, force=True)
  if pending is not None:
    last = flush(pending)
  ckpt.wait()
  ckpt.close()
  writer.close()
  if jax.process_index() == 0:
    with open(os.path.join(workdir, "data_stats.json"), "w") as f:
      json.dump(stats, f)
  if config.export.hf_dir:
    from jaxlab.models.hf import export_hf
    from jaxlab.models.params import merge_lora
    export_hf(config.export.hf_dir, cfg, merge_lora(state.params, state.frozen, cfg),
              tokenizer_dir=config.tokenizer.path or os.path.join(workdir, "tokenizer"),
              dtype=config.export.dtype)
  return {"state": state, "metrics": last, "spec": spec, "tokenizer": tokenizer,
          "teacher": teacher, "teacher_spec": teacher_spec}


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
