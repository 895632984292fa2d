"""The SFT job: data -> sharded state -> jitted steps -> metrics and checkpoints.

State lives here at the edge; the step itself is pure. A restarted run
restores the latest checkpoint (params, optimizer, step, RNG and the data
iterator position) and continues exactly where the killed one stopped.
"""
from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Any

import jax
import ml_collections

from jaxlab import sharding as sharding_lib
from jaxlab.checkpoint import Checkpointer
from jaxlab.data.batching import SFTBatches, load_sft_examples
from jaxlab.data.chat import pad_id
from jaxlab.metrics import MetricsWriter
from jaxlab.models.config import ModelConfig
from jaxlab.models.params import model_spec
from jaxlab.train import optim, sft
from jaxlab.train import state as state_lib


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


def run_sft(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Trains to config.train.steps (resuming if a checkpoint exists); returns the last metrics."""
  os.makedirs(workdir, exist_ok=True)
  if not config.data.train_path or not os.path.isfile(config.data.train_path):
    raise ValueError(f"config key data.train_path={config.data.train_path!r} is not a file: "
                     "point it at a chat JSONL file")
  mesh, rules = mesh_and_rules(config)
  tokenizer = load_or_train_tokenizer(config, workdir)
  hf_params = None
  if config.init.hf_path:
    from jaxlab.models.hf import load_hf
    lora = model_config(config, len(tokenizer)).lora
    cfg, *hf_params = load_hf(config.init.hf_path, mesh, dtype=config.model.dtype,
                              param_dtype=config.model.param_dtype, rules=rules, lora=lora,
                              seed=config.seed)
    cfg = cfg.replace(remat=config.model.remat)
    with config.unlocked():  # the saved config describes the model actually trained
      config.model.update({k: v for k, v in dataclasses.asdict(cfg).items() if k != "lora"})
  else:
    cfg = model_config(config, len(tokenizer))
  if cfg.vocab_size < len(tokenizer):
    raise ValueError(f"config key model.vocab_size={cfg.vocab_size} is smaller than the "
                     f"tokenizer's {len(tokenizer)} tokens")
  config.model.vocab_size = cfg.vocab_size  # the saved config is the resolved one
  config_json = config.to_json_best_effort(indent=2)
  with open(os.path.join(workdir, "config.json"), "w") as f:
    f.write(config_json)
  examples, stats = load_sft_examples(config.data.train_path, tokenizer,
                                      seq_len=config.data.seq_len, overlong=config.data.overlong,
                                      max_examples=config.data.max_examples or None)
  batches = SFTBatches(examples, global_batch_size=config.train.global_batch_size,
                       seq_len=config.data.seq_len, pack=config.data.pack, seed=config.seed,
                       overlong=config.data.overlong, pad_id=pad_id(tokenizer),
                       process_index=jax.process_index(), process_count=jax.process_count())
  spec = model_spec(cfg)
  total = config.train.steps
  optimizer, schedule = optim.make_optimizer(config.optim, total)
  state_sh = state_lib.state_shardings(spec, optimizer, mesh, rules)
  ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), every=config.checkpoint.every,
                      keep=config.checkpoint.keep, async_save=config.checkpoint.async_save)
  # Base weights loaded from an HF folder with LoRA are not saved: they reload from there.
  frozen_from_hf = hf_params is not None and cfg.lora is not None
  if ckpt.latest_step() is not None:
    abstract = state_lib.abstract_state(spec, optimizer, state_sh)
    if frozen_from_hf:
      abstract = abstract.replace(frozen={})
    state, data_state, _ = ckpt.restore(abstract)
    if frozen_from_hf:
      state = state.replace(frozen=hf_params[1])
    batches.set_state(data_state)
  else:
    state = state_lib.create_state(spec, optimizer, mesh, rules, config.seed, params=hf_params)
  start = int(jax.device_get(state.step))

  batch_sh = {k: sharding_lib.batch_sharding(mesh, 2, rules=rules)
              for k in ("inputs", "targets", "positions", "segment_ids", "loss_mask")}
  step_fn = sft.jit_step(sft.make_sft_step(spec, optimizer, schedule, config.train.grad_accum),
                         state_sh, batch_sh, mesh)
  writer = MetricsWriter(workdir, total, start, progress=config.train.progress)
  data_metrics = {"data_truncated": stats["truncated"], "data_dropped": stats["dropped"]}
  pending, last, t_last = None, {}, time.perf_counter()

  def flush(pending):
    # Fetch one step late so the host never waits on the device it just fed.
    step, metrics = pending
    metrics = jax.device_get(metrics)
    nonlocal t_last
    now = time.perf_counter()
    metrics["trained_tokens_per_s"] = metrics["trained_tokens"] / max(now - t_last, 1e-9)
    t_last = now
    if step % config.train.log_every == 0 or step == total:
      writer.write(step, {**metrics, **data_metrics})
    return metrics

  for step in range(start, total):
    batch = sharding_lib.host_local_to_global(next(batches), mesh, rules=rules)
    state, metrics = step_fn(state, batch)
    if pending is not None:
      last = flush(pending)
    pending = (step + 1, metrics)
    if ckpt.should_save(step + 1) or step + 1 == total:
      # Metrics of a checkpointed step are on disk before its checkpoint, so a killed
      # and resumed run has every row.
      last, pending = flush(pending), None
      ckpt.save(step + 1, state.replace(frozen={}) if frozen_from_hf else state,
                batches.get_state(), config_json, force=True)
  if pending is not None:
    last = flush(pending)
  ckpt.wait()
  ckpt.close()
  writer.close()
  with open(os.path.join(workdir, "data_stats.json"), "w") as f:
    json.dump(stats, f)
  if config.export.hf_dir:
    from jaxlab.models.hf import export_hf
    from jaxlab.models.params import merge_lora
    export_hf(config.export.hf_dir, cfg, merge_lora(state.params, state.frozen, cfg),
              tokenizer_dir=config.tokenizer.path or os.path.join(workdir, "tokenizer"),
              dtype=config.export.dtype)
  return {"state": state, "metrics": last, "spec": spec, "tokenizer": tokenizer}
