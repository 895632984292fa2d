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
import os
import sys
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from jaxlab import config as config_lib
from jaxlab import fingerprint
from jaxlab import paths
from jaxlab import sharding as sharding_lib
from jaxlab.checkpoint import Checkpointer
from jaxlab.data.tokenizer import load_or_train_tokenizer
from jaxlab.models.config import ModelConfig
from jaxlab.models.params import model_spec
from jaxlab.train import channels, loop, optim, run_data
from jaxlab.train import export as export_lib
from jaxlab.train import inputs as inputs_lib
from jaxlab.train import state as state_lib
from jaxlab.train import step as step_lib
from jaxlab.train.channels import common


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
                      trainable_dtype: str | None = None,
                      scan_layers: bool | str | None = None):
  """(cfg, trainable, frozen) from an HF folder, a jaxlab workdir or a steered model folder
  (jaxlab.models.steering: its base loaded with these arguments, plus the steering vector);
  `key` names the config key in errors. With `lora`, the loaded weights are the frozen base
  and fresh adapters train; what trains is stored in `trainable_dtype` (None: as loaded).
  `scan_layers` asks for the scanned or unrolled layout (None / "auto": scanned for an HF
  folder, a workdir's own; `jaxlab.models.config.resolve_layout`)."""
  from jaxlab.checkpoint import load_params
  from jaxlab.models import steering
  from jaxlab.models.config import resolve_layout
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
                                 resolve_layout(scan_layers, own=cfg.scan_layers))
    cfg = cfg.replace(lora=lora, trainable_dtype=trainable_dtype)
    if dtype:
      cfg = cfg.replace(dtype=dtype)
    if lora is None:
      return cfg, cast_trainable(cfg, params), {}
    return cfg, init_lora(model_spec(cfg), mesh, seed, rules), params
  if os.path.isfile(os.path.join(path, "config.json")):
    return load_hf(path, mesh, dtype=dtype, param_dtype=param_dtype, rules=rules, lora=lora,
                   seed=seed, trainable_dtype=trainable_dtype, scan_layers=scan_layers)
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
                                   scan_layers=config.model.get("scan_layers"))
  cfg = cfg.replace(remat=config.model.remat,  # "" in a config: from `remat`
                    remat_policy=config.model.get("remat_policy") or "")
  with config.unlocked():  # the saved config describes the model actually trained
    config.model.update({k: v for k, v in dataclasses.asdict(cfg).items()
                         if k in config.model and k != "lora"})
  return cfg, tuple(params), lora is not None


def check_model_folders(config) -> None:
  """init.hf_path, init.workdir and tokenizer.path that name no folder are errors naming the key
  (and, for a fetchable model's folder, the command that writes it: jaxlab.models.fetch)."""
  from jaxlab.models.fetch import fetch_hint
  for key, p in (("init.hf_path", config.init.hf_path),
                 ("init.workdir", config.init.get("workdir", "")),
                 ("tokenizer.path", config.tokenizer.path)):
    if p and not paths.is_uri(p) and not paths.path(p).is_dir():
      raise config_lib.ConfigError(f"config key {key}={p!r} is not a folder{fetch_hint(p)}")


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


def run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Trains config.channel to config.train.steps (resuming if a checkpoint exists): check,
  open the workdir, build the model and teacher, build the data, restore, loop, export."""
  channel = channels.get(config.get("channel", "sft"))
  fmt = _check(config, channel)  # everything checkable, before anything is loaded or written
  mesh, rules = sharding_lib.mesh_and_rules(config)
  ckpt, saved, fingerprints = _open_workdir(config, workdir)
  if saved is not None and ckpt.latest_step() >= config.train.steps:
    done = _finished(config, workdir, ckpt, saved, mesh, rules)
    if done is not None:
      return done
  tokenizer = _tokenizer(config, workdir, channel, saved, fingerprints)
  m = _model_and_teacher(config, workdir, channel, fmt, tokenizer, saved, fingerprints, mesh,
                         rules)
  with config.unlocked():
    config.inputs = ml_collections.ConfigDict(inputs_lib.nested(fingerprints))
  config_json = config.to_json_best_effort(indent=2)
  data = run_data.build(config, workdir, fmt, tokenizer, m.ctx, fingerprints, m.teacher_spec,
                        m.teacher, m.use_cache)
  # Written once the data is known to train: a refused run leaves no config behind.
  paths.write_text(paths.path(workdir, "config.json"), config_json)
  optimizer, schedule = optim.make_optimizer(config.optim, config.train.steps)
  state_sh = state_lib.state_shardings(m.spec, optimizer, mesh, rules)
  state = _restore(config, workdir, ckpt, m, data, optimizer, state_sh, mesh, rules)
  start = int(jax.device_get(state.step))
  batch_sh = {k: sharding_lib.batch_sharding(mesh, n, rules=rules) for k, n in data.ndims.items()}
  teacher = None if m.use_cache else m.teacher  # the cache replaces the live teacher (frees it)
  teacher_sh = m.teacher_spec.shardings(mesh, rules) if teacher is not None else None
  step_fn = step_lib.jit_step(
      loop.guard_nonfinite(step_lib.make_step(channel, m.ctx, optimizer, schedule,
                                              config.train.grad_accum),
                           config.train.get("on_nonfinite", "stop") == "skip"),
      state_sh, batch_sh, mesh, teacher_sh)
  heldout = loop.heldout_metrics_fn(m.ctx, teacher, data.held_ids, data.held_batch, mesh, rules) \
      if data.held_batch is not None and (teacher is not None or m.use_cache) else None
  info = channels.describe(config, channel, fmt, m.ctx, m.use_cache)
  paths.write_text(paths.path(workdir, "channel.json"), json.dumps(info, indent=2))
  state, last = loop.train(config, workdir, state, start, lambda st, b: step_fn(st, b, teacher),
                           data, ckpt, config_json, kl=info.get("kl"), heldout=heldout,
                           frozen_external=m.external_base, mesh=mesh, rules=rules)
  paths.write_text(paths.path(workdir, "data_stats.json"), json.dumps(data.stats))
  if config.export.hf_dir:
    export_lib.export(config, workdir, m.cfg, state)
  return {"state": state, "metrics": last, "spec": m.spec, "tokenizer": tokenizer,
          "teacher": teacher, "teacher_spec": m.teacher_spec}


def _check(config, channel) -> str:
  """The run's data format, once every setting that can be checked without loading is."""
  config_lib.validate(config, jax.device_count(), jax.process_count())
  channels.check(config, channel)
  check_init_not_steered(config)
  fmt = channels.data_format(config, channel)
  if config.data.get("source", "jsonl") == "mixture":
    for name, src in config.data.mixture.items():
      if not paths.path(src.path).is_file():
        raise ValueError(f"config key data.mixture.{name}.path={src.path!r} is not a file")
  elif not config.data.train_path or not paths.path(config.data.train_path).is_file():
    raise ValueError(f"config key data.train_path={config.data.train_path!r} is not a file: "
                     "point it at a chat JSONL file")
  check_model_folders(config)
  return fmt


def _open_workdir(config, workdir):
  """(checkpointer, the saved config or None, the data fingerprints), refusing a resume whose
  config or inputs changed."""
  ckpt = Checkpointer(paths.path(workdir, "checkpoints"), every=config.checkpoint.every,
                      keep=config.checkpoint.keep, async_save=config.checkpoint.async_save)
  saved = ckpt.saved_config() if ckpt.latest_step() is not None else None
  if saved is not None:
    config_lib.check_resume(saved, config, str(paths.path(workdir)))
  fingerprints = inputs_lib.data_fingerprints(config)
  inputs_lib.check(saved, fingerprints, config, str(paths.path(workdir)))
  return ckpt, saved, fingerprints


def _tokenizer(config, workdir, channel, saved, fingerprints):
  """The run's tokenizer, checked against every model it meets (by content, not size)."""
  from jaxlab.data.tokenizer import check_model_tokenizer
  tokenizer = load_or_train_tokenizer(config, workdir)
  # Models made with another tokenizer of the same size are refused by content, not size.
  for key, path in (("init.hf_path", config.init.hf_path),
                    ("init.workdir", config.init.get("workdir", "")),
                    ("teacher.path", config.teacher.path if channel.NEEDS_TEACHER else "")):
    if path and path != "base":
      check_model_tokenizer(tokenizer, _tokenizer_name(config, workdir), path, key)
  fingerprints["tokenizer"] = fingerprint.tokenizer_digest(tokenizer)
  inputs_lib.check(saved, fingerprints, config, str(paths.path(workdir)))
  return tokenizer


def _tokenizer_name(config, workdir) -> str:
  return repr(config.tokenizer.path or config.init.hf_path
              or str(paths.path(workdir, "tokenizer")))


@dataclasses.dataclass
class _Models:
  """The student (its config, spec and initial params) and the frozen teacher of a run."""
  cfg: ModelConfig
  spec: Any
  init_params: Any       # (trainable, frozen) or None for a fresh init
  external_base: bool    # a LoRA base loaded from elsewhere: never checkpointed
  teacher_spec: Any
  teacher: Any
  ctx: common.Context
  use_cache: bool


def _model_and_teacher(config, workdir, channel, fmt, tokenizer, saved, fingerprints, mesh,
                       rules) -> _Models:
  from jaxlab.data.tokenizer import check_vocab
  vocab_check = lambda n: check_vocab(
      tokenizer, n, _tokenizer_name(config, workdir),
      repr(config.init.hf_path or config.init.get("workdir", "") or "config.model")
      + " (config key model.vocab_size)")
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
  teacher_spec, teacher = None, None
  if channel.NEEDS_TEACHER:
    teacher_spec, teacher = load_teacher(config, cfg, mesh, rules)
    # A teacher retrained in place is another teacher: its weights are an input of the run.
    fingerprints["teacher.path"] = fingerprint.params_digest(teacher)
    inputs_lib.check(saved, fingerprints, config, str(paths.path(workdir)))
  ctx = channels.context(config, channel, fmt, spec, teacher_spec, tokenizer, mesh, rules)
  return _Models(cfg, spec, init_params, external_base, teacher_spec, teacher, ctx,
                 channels.uses_topk_cache(config, channel))


def _restore(config, workdir, ckpt, m: _Models, data, optimizer, state_sh, mesh, rules):
  """The latest checkpoint's state and data position, or a fresh state from the initial params.
  Base weights loaded from an HF folder / workdir with LoRA are not saved: they reload from
  there."""
  if ckpt.latest_step() is None:
    return state_lib.create_state(m.spec, optimizer, mesh, rules, config.seed,
                                  params=m.init_params)
  abstract = state_lib.abstract_state(m.spec, optimizer, state_sh)
  if m.external_base:
    abstract = abstract.replace(frozen={})
  state, data_state, _ = ckpt.restore(abstract)
  if m.external_base:
    state = state.replace(frozen=m.init_params[1])
  try:
    data.batches.set_state(data_state)
  except ValueError as e:  # e.g. the data file now has another number of rows
    files = ", ".join(f"{k}={v!r}" for k, v in inputs_lib.data_files(config).items())
    raise ValueError(f"{paths.path(workdir)}: the checkpoint's data position cannot be "
                     f"restored on this run's data ({files or 'config key data'}): {e}; "
                     "start a new workdir for other data") from e
  return state


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
                                   trainable_dtype=cfg.trainable_dtype,
                                   scan_layers=cfg.scan_layers)  # the checkpoint's layout
  return cfg, ({}, frozen), True


def _finished(config, workdir, ckpt, saved: dict, mesh, rules) -> dict[str, Any] | None:
  """A rerun of a finished run: nothing is trained or rewritten; only a missing export is made.
  Returns what `run` returns, with the final params read from the last checkpoint (no
  optimizer state), or None if the final checkpoint is damaged and training must go on."""
  from jaxlab.checkpoint import base_from_hf
  from jaxlab.run_metrics import read_metrics
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
  export = config.export.hf_dir and not export_lib.export_done(config)
  if export and base_from_hf(saved):
    frozen = _resume_student(config, saved, mesh, rules)[1][1]
  state = state_lib.TrainState(step=jnp.int32(ckpt.restored_step), params=got["params"],
                               frozen=frozen, opt_state=None, rng=None)
  if export:
    export_lib.export(config, workdir, cfg, state)
  export_lib.mend_config_json(workdir, saved)
  rows = read_metrics(workdir)
  return {"state": state, "metrics": rows[-1] if rows else {}, "spec": spec,
          "tokenizer": tokenizer, "teacher": None, "teacher_spec": None, "finished_before": True}


