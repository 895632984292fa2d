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
import json
import math
import os
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from jaxlab import config as config_lib
from jaxlab import fingerprint
from jaxlab import paths
from jaxlab import sharding as sharding_lib
from jaxlab.checkpoint import Checkpointer
from jaxlab.data import prompt_completion as pc
from jaxlab.data.chat import end_of_turn_ids, pad_id
from jaxlab.metrics import MetricsWriter
from jaxlab.models.config import ModelConfig
from jaxlab.models.params import model_spec
from jaxlab.train import channels, losses, optim, topk_cache
from jaxlab.train import inputs as inputs_lib
from jaxlab.train import state as state_lib
from jaxlab.train import step as step_lib
from jaxlab.train.channels import common


from jaxlab.data.tokenizer import load_or_train_tokenizer  # noqa: E402,F401  (re-exported)


def model_config(config: ml_collections.ConfigDict, vocab_size: int) -> ModelConfig:
  """ModelConfig from config.model; vocab_size <= 0 means 'the tokenizer's'."""
  d = config.model.to_dict()
  if d.get("vocab_size", 0) <= 0:
    d["vocab_size"] = vocab_size
  return ModelConfig.from_dict(d)


def _is_workdir(path: str) -> bool:
  return os.path.isdir(os.path.join(path, "checkpoints"))


def load_model_params(path: str, mesh, rules, *, key: str, dtype: str | None = None,
                      param_dtype: str | None = None, lora=None, seed: int = 0,
                      trainable_dtype: str | None = None, scan_layers: bool | None = None):
  """(cfg, trainable, frozen) from an HF folder, a jaxlab workdir or a steered model folder
  (jaxlab.models.steering: its base loaded with these arguments, plus the steering vector);
  `key` names the config key in errors. With `lora`, the loaded weights are the frozen base
  and fresh adapters train; what trains is stored in `trainable_dtype` (None: as loaded).
  `scan_layers` asks for the scanned or unrolled layout (None: a workdir's own, unrolled for
  HF folders)."""
  from jaxlab.checkpoint import load_params
  from jaxlab.models import steering
  from jaxlab.models.hf import init_lora, load_hf
  from jaxlab.models.params import cast_trainable, merge_lora, with_layout
  if steering.is_steered(path):
    if lora is not None:
      raise ValueError(f"config key {key}={path!r} is a steered model ({steering.STEER_FILE}): "
                       "a teacher or a model to sample and score, not one to train; LoRA "
                       "adapters cannot be put on it (train its base instead)")
    base = lambda p: load_model_params(p, mesh, rules, key=f"{key} ({steering.STEER_FILE} base)",
                                       dtype=dtype, param_dtype=param_dtype, seed=seed,
                                       trainable_dtype=trainable_dtype, scan_layers=scan_layers)
    return steering.load_steered(path, base, mesh, rules)
  if _is_workdir(path):
    cfg, trainable, frozen = load_params(path, mesh)
    cfg, params, _ = with_layout(cfg, merge_lora(trainable, frozen, cfg), {},
                                 cfg.scan_layers if scan_layers is None else scan_layers)
    cfg = cfg.replace(lora=lora, trainable_dtype=trainable_dtype)
    if dtype:
      cfg = cfg.replace(dtype=dtype)
    if lora is None:
      return cfg, cast_trainable(cfg, params), {}
    return cfg, init_lora(model_spec(cfg), mesh, seed, rules), params
  if os.path.isfile(os.path.join(path, "config.json")):
    return load_hf(path, mesh, dtype=dtype, param_dtype=param_dtype, rules=rules, lora=lora,
                   seed=seed, trainable_dtype=trainable_dtype, scan_layers=bool(scan_layers))
  raise ValueError(f"config key {key}={path!r} is neither a Hugging Face checkpoint folder "
                   "(config.json + *.safetensors) nor a jaxlab workdir (checkpoints/)")


def init_student(config, tokenizer, mesh, rules):
  """(cfg, (trainable, frozen) or None for a fresh init, base_is_external)."""
  lora = model_config(config, len(tokenizer)).lora
  source = config.init.hf_path or config.init.get("workdir", "")
  if config.init.hf_path and config.init.get("workdir", ""):
    raise ValueError("config keys init.hf_path and init.workdir are both set; give one")
  check_init_not_steered(config)
  if not source:
    return model_config(config, len(tokenizer)), None, False
  key = "init.hf_path" if config.init.hf_path else "init.workdir"
  cfg, *params = load_model_params(source, mesh, rules, key=key, dtype=config.model.dtype,
                                   param_dtype=config.model.param_dtype, lora=lora,
                                   seed=config.seed,
                                   trainable_dtype=config.model.get("trainable_dtype") or None,
                                   scan_layers=config.model.get("scan_layers", False))
  cfg = cfg.replace(remat=config.model.remat,  # "" in a config: from `remat`
                    remat_policy=config.model.get("remat_policy") or "")
  with config.unlocked():  # the saved config describes the model actually trained
    config.model.update({k: v for k, v in dataclasses.asdict(cfg).items()
                         if k in config.model and k != "lora"})
  return cfg, tuple(params), lora is not None


def check_init_not_steered(config) -> None:
  """A steered model folder (jaxlab.models.steering) is refused as the student's init: it is a
  teacher or an evaluated model, and its steering vector has no place in a run's config."""
  from jaxlab.models import steering
  for key in ("hf_path", "workdir"):
    path = config.init.get(key, "")
    if path and steering.is_steered(path):
      raise config_lib.ConfigError(
          f"config key init.{key}={path!r} is a steered model ({steering.STEER_FILE}): it can "
          "be a teacher or a model to sample and score, not one to train; start from its base "
          "(the 'base' of its steer.json)")


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
      cfg, tr, fr = load_model_params(source, mesh, rules, key="teacher.path(base)", dtype=dtype)
    else:  # the student's own fresh init: same config and seed, no adapters
      from jaxlab.models.params import init_params
      cfg = student_cfg.replace(lora=None)
      tr, fr = init_params(model_spec(cfg), mesh, config.seed, rules)
  else:
    cfg, tr, fr = load_model_params(path, mesh, rules, key="teacher.path", dtype=dtype)
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


def data_format(config, channel) -> str:
  """"packed" or "prompt_completion": what the run's rows are.

  A config with a `distill` section compares channels, so every channel that can (sft as well
  as the distillation channels) trains on the same prompt/completion rows: the same examples,
  held-out rows, order, steps and examples per step whatever `channel` is. Packing cannot
  apply to the distillation channels, so there it is refused for all rather than applied to
  some."""
  formats = channel.DATA_FORMATS
  fmt = "prompt_completion" if "distill" in config and "prompt_completion" in formats \
      else formats[0]
  if fmt == "prompt_completion" and config.data.get("pack", False):
    raise config_lib.ConfigError(
        "config key data.pack=True: in a channel comparison (a config with a `distill` "
        "section) every channel trains one example per row; set data.pack=False")
  return fmt


def check_channel(config, channel) -> None:
  """Settings the chosen channel cannot honour are errors naming the key, before any work."""
  d = config.get("distill", ml_collections.ConfigDict())
  topk = int(d.get("topk", 0) or 0)
  if topk <= 0:
    return
  name = config.get("channel", "sft")
  if not channel.USES_TOPK_CACHE:
    raise config_lib.ConfigError(
        f"config key distill.topk={topk}: channel {name!r} cannot train on cached teacher "
        "top-k log-probs (they describe the dataset's completions; this channel "
        + ("samples its own" if channel.NEEDS_TEACHER else "trains on hard labels")
        + "); set distill.topk=0")
  kl = d.get("kl", "") or channel.DEFAULT_KL
  if kl != "forward":
    raise config_lib.ConfigError(
        f"config key distill.kl={kl!r}: cached teacher top-k log-probs (distill.topk={topk}) "
        "support only the forward KL")


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


# ------------------------------------------------------------------ data

def make_prompt_completion_data(config, tokenizer):
  """(examples, train ids, held-out ids, stats, lengths), the same whatever the channel: the
  teacher's prompt, the rows kept and the held-out rows depend only on the data and lengths.
  Rows without a completion are dropped unless no row has one (a prompts-only file, which only
  on-policy training can use)."""
  system = config.teacher.get("system_prompt", None) if "teacher" in config else None
  examples = pc.load_examples(config.data.train_path, tokenizer,
                              teacher_system=system if system else None,
                              max_examples=config.data.max_examples or None)
  need_completion = any(len(e.completion) for e in examples)
  lengths = dict(prompt_len=config.data.prompt_len, teacher_prompt_len=config.data.teacher_prompt_len,
                 completion_len=config.data.completion_len)
  ids, stats = pc.fit_examples(examples, need_completion=need_completion, **lengths)
  if not ids:
    raise config_lib.ConfigError(
        f"no row of {config.data.train_path} fits config keys data.prompt_len="
        f"{lengths['prompt_len']} / data.teacher_prompt_len={lengths['teacher_prompt_len']}"
        f"{' with a completion' if need_completion else ''} ({stats}); raise them")
  n_held = int(config.get("distill", {}).get("heldout_rows", 0) or 0)
  if n_held and n_held >= len(ids):
    raise config_lib.ConfigError(
        f"config key distill.heldout_rows={n_held}: only {len(ids)} rows of "
        f"{config.data.train_path} fit the lengths ({stats}); none would be left to train on")
  held = ids[len(ids) - n_held:] if n_held else []
  train = ids[:len(ids) - n_held] if n_held else ids
  stats["heldout_rows"] = len(held)
  return examples, train, held, stats, lengths


def run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Trains config.channel to config.train.steps (resuming if a checkpoint exists)."""
  channel = channels.get(config.get("channel", "sft"))
  # Everything that can be checked is checked before anything is loaded or written.
  config_lib.validate(config, jax.device_count(), jax.process_count())
  check_channel(config, channel)
  check_init_not_steered(config)
  fmt = data_format(config, channel)
  if config.data.get("source", "jsonl") == "mixture":
    for name, src in config.data.mixture.items():
      if not paths.path(src.path).is_file():
        raise ValueError(f"config key data.mixture.{name}.path={src.path!r} is not a file")
  elif not config.data.train_path or not paths.path(config.data.train_path).is_file():
    raise ValueError(f"config key data.train_path={config.data.train_path!r} is not a file: "
                     "point it at a chat JSONL file")
  mesh, rules = sharding_lib.mesh_and_rules(config)
  ckpt = Checkpointer(paths.path(workdir, "checkpoints"), every=config.checkpoint.every,
                      keep=config.checkpoint.keep, async_save=config.checkpoint.async_save)
  saved = ckpt.saved_config() if ckpt.latest_step() is not None else None
  if saved is not None:
    config_lib.check_resume(saved, config, str(paths.path(workdir)))
  fingerprints = inputs_lib.data_fingerprints(config)
  inputs_lib.check(saved, fingerprints, config, str(paths.path(workdir)))
  total = config.train.steps
  if saved is not None and ckpt.latest_step() >= total:
    done = _finished(config, workdir, ckpt, saved, mesh, rules)
    if done is not None:
      return done
  tokenizer = load_or_train_tokenizer(config, workdir)
  from jaxlab.data.tokenizer import check_model_tokenizer, check_vocab
  tokenizer_name = repr(config.tokenizer.path or config.init.hf_path
                        or str(paths.path(workdir, "tokenizer")))
  vocab_check = lambda n: check_vocab(
      tokenizer, n, tokenizer_name,
      repr(config.init.hf_path or config.init.get("workdir", "") or "config.model")
      + " (config key model.vocab_size)")
  # Models made with another tokenizer of the same size are refused by content, not size.
  for key, path in (("init.hf_path", config.init.hf_path),
                    ("init.workdir", config.init.get("workdir", "")),
                    ("teacher.path", config.teacher.path if channel.NEEDS_TEACHER else "")):
    if path and path != "base":
      check_model_tokenizer(tokenizer, tokenizer_name, path, key)
  fingerprints["tokenizer"] = fingerprint.tokenizer_digest(tokenizer)
  inputs_lib.check(saved, fingerprints, config, str(paths.path(workdir)))
  if saved is None and config.init.hf_path and not _is_workdir(config.init.hf_path):
    from jaxlab.models.hf_config import config_from_hf
    vocab_check(config_from_hf(config.init.hf_path).vocab_size)  # before loading any weight
  if saved is None:
    cfg, init_params, external_base = init_student(config, tokenizer, mesh, rules)
  else:  # resuming: the model is the checkpoint's; only an external frozen base is reloaded
    cfg, init_params, external_base = _resume_student(config, saved, mesh, rules)
  vocab_check(cfg.vocab_size)
  config_lib.validate_against_vocab(config, cfg.vocab_size)
  config.model.vocab_size = cfg.vocab_size  # the saved config is the resolved one
  spec = model_spec(cfg)
  use_cache = channel.USES_TOPK_CACHE and int(config.distill.get("topk", 0)) > 0
  teacher_spec, teacher = None, None
  if channel.NEEDS_TEACHER:
    teacher_spec, teacher = load_teacher(config, cfg, mesh, rules)
    # A teacher retrained in place is another teacher: its weights are an input of the run.
    fingerprints["teacher.path"] = fingerprint.params_digest(teacher)
    inputs_lib.check(saved, fingerprints, config, str(paths.path(workdir)))
  ctx = distill_context(config, spec, teacher_spec, channel, tokenizer, mesh, rules) \
      if fmt == "prompt_completion" else common.Context(
          spec=spec, loss_chunk=int(config.get("distill", {}).get("loss_chunk", 0)))
  with config.unlocked():
    config.inputs = ml_collections.ConfigDict(inputs_lib.nested(fingerprints))
  config_json = config.to_json_best_effort(indent=2)

  held_batch = None
  if fmt == "packed":
    from jaxlab.train.sources import make_batches
    batches, stats = make_batches(config, tokenizer)
    data_metrics = {"data_truncated": stats.get("truncated", 0),
                    "data_dropped": stats.get("dropped", 0)}
  else:
    examples, train_ids, held_ids, stats, lengths = make_prompt_completion_data(
        config, tokenizer)
    extras = None
    if use_cache:
      path = config.distill.get("topk_path", "") or os.path.join(workdir, "teacher_topk.npz")
      extras = topk_cache.load_or_compute(config, path, examples,
                                          list(train_ids) + list(held_ids), fingerprints,
                                          teacher_spec, teacher, ctx)
      stats["topk_path"] = path
    batches = pc.PromptCompletionBatches(
        examples, train_ids, global_batch_size=config.train.global_batch_size, seed=config.seed,
        pad_id=ctx.pad_id, process_index=jax.process_index(),
        process_count=jax.process_count(), extras=extras, **lengths)
    if held_ids:
      held_batch = batches.batch_for(np.asarray(held_ids))
    data_metrics = {"data_truncated": stats["truncated"],
                    "data_dropped": stats["examples_total"] - stats["examples_kept"]}
  if data_metrics["data_truncated"]:  # a setting the user may want to change: said once
    from jaxlab import console  # pylint: disable=g-import-not-at-top
    limit = (f"data.seq_len={config.data.seq_len} and were truncated (data.overlong="
             f"{config.data.get('overlong', 'truncate')!r}; 'drop' leaves them out)")
    if fmt != "packed":
      limit = (f"data.completion_len={config.data.completion_len} in their completions and "
               "were truncated")
    console.warn_once(f"data_truncated:{fmt}",  # once per process: not once per student
                      f"{data_metrics['data_truncated']} training example(s) of "
                      f"{config.data.train_path} were longer than config key {limit}")
  # Written once the data is known to train: a refused run leaves no config behind.
  paths.write_text(paths.path(workdir, "config.json"), config_json)

  optimizer, schedule = optim.make_optimizer(config.optim, total)
  state_sh = state_lib.state_shardings(spec, optimizer, mesh, rules)
  # Base weights loaded from an HF folder / workdir with LoRA are not saved: they reload from there.
  frozen_external = external_base
  if ckpt.latest_step() is not None:
    abstract = state_lib.abstract_state(spec, optimizer, state_sh)
    if frozen_external:
      abstract = abstract.replace(frozen={})
    state, data_state, _ = ckpt.restore(abstract)
    if frozen_external:
      state = state.replace(frozen=init_params[1])
    try:
      batches.set_state(data_state)
    except ValueError as e:  # e.g. the data file now has another number of rows
      files = ", ".join(f"{k}={v!r}" for k, v in inputs_lib.data_files(config).items())
      raise ValueError(f"{paths.path(workdir)}: the checkpoint's data position cannot be "
                       f"restored on this run's data ({files or 'config key data'}): {e}; "
                       "start a new workdir for other data") from e
  else:
    state = state_lib.create_state(spec, optimizer, mesh, rules, config.seed, params=init_params)
  del init_params
  start = int(jax.device_get(state.step))

  if fmt == "prompt_completion":
    ndims = {k: v.ndim for k, v in batches.batch_for(np.asarray(train_ids[:1])).items()}
  else:
    ndims = dict.fromkeys(("inputs", "targets", "positions", "segment_ids", "loss_mask"), 2)
  batch_sh = {k: sharding_lib.batch_sharding(mesh, n, rules=rules) for k, n in ndims.items()}
  if use_cache:
    teacher = None  # the cache replaces the live teacher in the step (and frees it)
  teacher_sh = teacher_spec.shardings(mesh, rules) if teacher is not None else None
  skip_nonfinite = config.train.get("on_nonfinite", "stop") == "skip"
  step_fn = step_lib.jit_step(
      _guard_nonfinite(step_lib.make_step(channel, ctx, optimizer, schedule,
                                          config.train.grad_accum), skip_nonfinite),
      state_sh, batch_sh, mesh, teacher_sh)
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
  if fmt == "prompt_completion":
    rollouts = info["channel"] in ("onpolicy", "gkd")
    info.update(kl=ctx.kl, beta=ctx.beta, temperature=ctx.temperature,
                estimator=ctx.estimator if info["channel"] == "onpolicy" else None,
                sample_temperature=ctx.sample_temperature if rollouts else None,
                top_p=ctx.top_p if rollouts else None,
                biased_estimator=bool(
                    info["channel"] == "onpolicy" and ctx.estimator == "sampled"
                    and (ctx.sample_temperature != ctx.temperature or ctx.top_p != 1.0)),
                lmbda=ctx.lmbda if info["channel"] == "gkd" else None,
                teacher=config.teacher.path, teacher_cache=bool(use_cache))
  paths.write_text(paths.path(workdir, "channel.json"), json.dumps(info, indent=2))
  pending, last, t_last = None, {}, time.perf_counter()
  skipped = int(_last_row(workdir, start).get("skipped_steps", 0))

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
    nonlocal skipped
    finite = math.isfinite(metrics["loss"]) and math.isfinite(metrics.get("grad_norm", 0.0))
    if skip_nonfinite:
      skipped += int(metrics.pop("skipped"))
      metrics["skipped_steps"] = skipped
    if step % config.train.log_every == 0 or step == total or extra or not finite:
      writer.write(step, {**metrics, **data_metrics, **extra})
    else:
      writer.advance(step, metrics)
    if not finite and not skip_nonfinite:
      raise NonFiniteError(
          f"step {step}: loss {metrics['loss']}, grad_norm {metrics.get('grad_norm')}: the run "
          f"stopped (nothing non-finite is saved; last good checkpoint: step "
          f"{ckpt.latest_step()} in {ckpt.directory}). Lower optim.lr, check the data, or set "
          "--config.train.on_nonfinite=skip to drop such steps and count them")
    return metrics

  try:
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
        # and resumed run has every row; a non-finite step stops here, before saving.
        last, pending = flush(pending), None
        writer.flush()
        ckpt.save(step + 1, state.replace(frozen={}) if frozen_external else state,
                  batches.get_state(), config_json, force=True)
    if pending is not None:
      last = flush(pending)
  finally:  # an error still leaves every finished checkpoint and metric row on disk
    ckpt.wait()
    ckpt.close()
    writer.close()
  paths.write_text(paths.path(workdir, "data_stats.json"), json.dumps(stats))
  if config.export.hf_dir:
    _export(config, workdir, cfg, state)
  return {"state": state, "metrics": last, "spec": spec, "tokenizer": tokenizer,
          "teacher": teacher, "teacher_spec": teacher_spec}


class NonFiniteError(FloatingPointError):
  """The loss or gradient norm became NaN/Inf (train.on_nonfinite='stop')."""


def _guard_nonfinite(step_fn, skip: bool):
  """With `skip`, a step whose loss or gradient norm is not finite keeps the previous params and
  optimizer state (the step counter still advances) and reports metrics["skipped"] = 1."""
  if not skip:
    return step_fn

  def guarded(state, batch, *extra):
    new, metrics = step_fn(state, batch, *extra)
    ok = jnp.isfinite(metrics["loss"]) & jnp.isfinite(metrics["grad_norm"])
    kept = jax.tree.map(lambda n, o: jnp.where(ok, n, o), new, state)
    return kept.replace(step=new.step), {**metrics, "skipped": 1 - ok.astype(jnp.int32)}
  return guarded


def _last_row(workdir, step: int) -> dict:
  """The metrics row logged at `step` (for counters that continue across a resume)."""
  from jaxlab.metrics import read_metrics
  rows = [r for r in read_metrics(workdir) if r["step"] <= step] if step else []
  return rows[-1] if rows else {}


def _resume_student(config, saved: dict, mesh, rules):
  """(cfg, (adapters placeholder, frozen base) or None, base_is_external) when resuming.

  The model config is the checkpoint's (resolved when the run started): a full fine-tune's
  weights all come from the checkpoint, so the HF model is not loaded a second time; only a
  LoRA run's frozen base, which checkpoints leave out, is reloaded from its source.
  """
  from jaxlab.checkpoint import base_from_hf
  d = dict(saved["model"])
  cfg = ModelConfig.from_dict(d)
  with config.unlocked():
    config.model.update({k: v for k, v in d.items() if k in config.model and k != "lora"})
  external = base_from_hf(saved)
  if not external:
    return cfg, None, False
  source = config.init.hf_path or config.init.get("workdir", "")
  _, _, frozen = load_model_params(source, mesh, rules, key="init.hf_path", dtype=cfg.dtype,
                                   param_dtype=cfg.param_dtype, lora=cfg.lora, seed=config.seed,
                                   trainable_dtype=cfg.trainable_dtype)
  return cfg, ({}, frozen), True


def _export(config, workdir, cfg, state) -> None:
  """Writes the merged model to export.hf_dir (every process calls it; process 0 writes)."""
  from jaxlab.models.hf import export_hf
  from jaxlab.models.params import merge_lora
  export_hf(config.export.hf_dir, cfg, merge_lora(state.params, state.frozen, cfg),
            tokenizer_dir=config.tokenizer.path or config.init.hf_path
            or os.path.join(workdir, "tokenizer"), dtype=config.export.dtype)


def _export_done(config) -> bool:
  d = paths.path(config.export.hf_dir)
  return (d / "config.json").exists() and (d / "model.safetensors.index.json").exists()


def _mend_config_json(workdir, saved: dict) -> None:
  """A finished workdir's config.json that is missing or not valid JSON (a truncated copy, an
  edit) is rewritten from the config saved in its last checkpoint, and the user is told."""
  file = paths.path(workdir, "config.json")
  text = paths.read_text(file)
  try:
    if text is not None and isinstance(json.loads(text), dict):
      return
  except json.JSONDecodeError:
    pass
  paths.write_text(file, json.dumps(saved, indent=2))
  if paths.is_writer():
    print(f"jaxlab: {file} was {'missing' if text is None else 'damaged (not valid JSON)'}; "
          "rewritten from the config saved in the last checkpoint", file=sys.stderr)


def _finished(config, workdir, ckpt, saved: dict, mesh, rules) -> dict[str, Any] | None:
  """A rerun of a finished run: nothing is trained or rewritten; only a missing export is made.
  Returns what `run` returns, with the final params read from the last checkpoint (no
  optimizer state), or None if the final checkpoint is damaged and training must go on."""
  from jaxlab.checkpoint import base_from_hf
  from jaxlab.metrics import read_metrics
  cfg = ModelConfig.from_dict(dict(saved["model"]))
  spec = model_spec(cfg)
  sh = spec.shardings(mesh, rules)
  sds = lambda tree, s: jax.tree.map(
      lambda a, t: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=t), tree, s)
  target = {"params": sds(spec.abstract[0], sh[0])}
  if not base_from_hf(saved):
    target["frozen"] = sds(spec.abstract[1], sh[1])
  got, _, _ = ckpt.restore_partial(target)  # params only: no optimizer state is read
  if ckpt.restored_step < config.train.steps:
    return None
  ckpt.close()
  print(f"jaxlab: {paths.path(workdir)} already finished step {ckpt.restored_step}; nothing "
        "to train", file=sys.stderr)
  tokenizer = load_or_train_tokenizer(config, workdir)
  frozen = got.get("frozen", {})
  export = config.export.hf_dir and not _export_done(config)
  if export and base_from_hf(saved):
    frozen = _resume_student(config, saved, mesh, rules)[1][1]
  state = state_lib.TrainState(step=jnp.int32(ckpt.restored_step), params=got["params"],
                               frozen=frozen, opt_state=None, rng=None)
  if export:
    _export(config, workdir, cfg, state)
  _mend_config_json(workdir, saved)
  rows = read_metrics(workdir)
  return {"state": state, "metrics": rows[-1] if rows else {}, "spec": spec,
          "tokenizer": tokenizer, "teacher": None, "teacher_spec": None, "finished_before": True}


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
