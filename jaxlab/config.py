"""Config files (`configs/NAME.py:VARIANT` with `get_config(arg)`) and `--config.key=value` overrides.

Overrides are parsed against the type of the existing field, and a key that
the config does not define is an error naming it (with the closest known key),
so a typo never silently trains the wrong experiment.
"""
from __future__ import annotations

import ast
import difflib
import importlib.util
import math
import os
from typing import Any, Sequence

import ml_collections


class ConfigError(ValueError):
  pass


def load_config_file(spec: str) -> ml_collections.ConfigDict:
  """Runs get_config(arg) of `path[:arg]`."""
  path, _, arg = spec.partition(":")
  if not os.path.isfile(path):
    raise ConfigError(f"config file {path!r} does not exist")
  module_spec = importlib.util.spec_from_file_location(f"_jaxlab_config_{abs(hash(path))}", path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  if not hasattr(module, "get_config"):
    raise ConfigError(f"config file {path} has no get_config(arg) function")
  config = module.get_config(arg or None)
  if not isinstance(config, ml_collections.ConfigDict):
    raise ConfigError(f"{path}: get_config must return an ml_collections.ConfigDict")
  return with_run_defaults(config)


# Keys every training config has, so `--config.KEY=...` works whatever the config file sets.
RUN_DEFAULTS = {
    # "stop": a NaN/Inf loss or gradient norm ends the run with an error; "skip": the step's
    # update is dropped (params and optimizer unchanged) and counted in metrics `skipped_steps`.
    "train.on_nonfinite": "stop",
    # Comma-separated config keys (or groups, e.g. "optim") that may differ on resume.
    "resume.allow_changes": "",
}


def with_run_defaults(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Adds RUN_DEFAULTS that a training config (one with a `train` group) lacks."""
  if "train" not in config:
    return config
  with config.unlocked():
    for key, value in RUN_DEFAULTS.items():
      group, leaf = key.split(".")
      if group not in config:
        config[group] = ml_collections.ConfigDict()
      if leaf not in config[group]:
        config[group][leaf] = value
  return config


def sibling_config(config_file: str, name: str, arg: str | None = None) -> ml_collections.ConfigDict:
  """get_config(arg) of the config file `name` beside `config_file`: how one config extends
  another (e.g. configs/distill.py starts from configs/sft.py's)."""
  path = os.path.join(os.path.dirname(os.path.abspath(config_file)), name)
  return load_config_file(path + (f":{arg}" if arg else ""))


def _all_keys(config: ml_collections.ConfigDict, prefix: str = "") -> list[str]:
  keys = []
  for k, v in config.items():
    keys.append(prefix + k)
    if isinstance(v, ml_collections.ConfigDict):
      keys.extend(_all_keys(v, prefix + k + "."))
  return keys


# Bool keys that also take "auto" (stored as None): model.scan_layers (the source's layout).
_AUTO_BOOL_KEYS = ("model.scan_layers",)


def _parse_value(key: str, text: str, current: Any) -> Any:
  if key in _AUTO_BOOL_KEYS and text.lower() in ("auto", "none"):
    return None
  if isinstance(current, bool):
    if text.lower() in ("true", "1", "yes"):
      return True
    if text.lower() in ("false", "0", "no"):
      return False
    raise ConfigError(f"config key {key}: expected a bool, got {text!r}")
  if isinstance(current, str):
    return text
  try:
    value = ast.literal_eval(text)
  except (ValueError, SyntaxError):
    if current is None:
      return text
    raise ConfigError(f"config key {key}: cannot parse {text!r} as {type(current).__name__}")
  if current is None:
    return value
  if isinstance(current, float) and isinstance(value, int):
    return float(value)
  if isinstance(current, (tuple, list)) and isinstance(value, (tuple, list, int, str)):
    value = tuple(value) if isinstance(value, (tuple, list)) else (value,)
    return type(current)(value)
  if type(value) is not type(current):
    raise ConfigError(f"config key {key}: expected {type(current).__name__}, got {text!r}")
  return value


def apply_overrides(config: ml_collections.ConfigDict, overrides: Sequence[str]) -> ml_collections.ConfigDict:
  """Applies ["a.b=value", ...] in order; unknown keys are errors."""
  known = _all_keys(config)
  for item in overrides:
    key, sep, text = item.partition("=")
    if not sep:
      raise ConfigError(f"override {item!r} must look like --config.{key}=VALUE")
    if key not in known:
      close = difflib.get_close_matches(key, known, n=1)
      hint = f" (did you mean {close[0]!r}?)" if close else ""
      raise ConfigError(f"unknown config key {key!r}{hint}")
    *parents, leaf = key.split(".")
    node = config
    for p in parents:
      node = node[p]
    if isinstance(node[leaf], ml_collections.ConfigDict):
      raise ConfigError(f"config key {key} is a group; set one of its fields")
    with node.unlocked():
      node[leaf] = _parse_value(key, text, node[leaf])
  return config


def pop_flag(argv: Sequence[str], flag: str) -> tuple[bool, list[str]]:
  """(whether the bare flag, e.g. --plan, is in argv; argv without it)."""
  return flag in argv, [a for a in argv if a != flag]


def parse_argv(argv: Sequence[str]) -> tuple[ml_collections.ConfigDict, str]:
  """(config, workdir) from `--config=FILE[:ARG] --workdir=DIR --config.key=value ...`."""
  config_spec, workdir, overrides = None, None, []
  args = list(argv)
  while args:
    a = args.pop(0)
    if a.startswith("--") and "=" not in a and args:
      a = f"{a}={args.pop(0)}"  # "--key value" form
    if a.startswith("--config="):
      config_spec = a.split("=", 1)[1]
    elif a.startswith("--workdir="):
      workdir = a.split("=", 1)[1]
    elif a.startswith("--config."):
      overrides.append(a[len("--config."):])
    else:
      raise ConfigError(f"unknown argument {a!r}; usage: python -m jaxlab.main "
                        "--config=configs/NAME.py:VARIANT --workdir=DIR [--config.key=value ...]")
  if not config_spec or not workdir:
    raise ConfigError("both --config=FILE[:VARIANT] and --workdir=DIR are required")
  config = apply_overrides(load_config_file(config_spec), overrides)
  config.lock()
  return config, workdir


# ---------------------------------------------------------------- validation before any work

# Keys that must be > 0 (or >= 0) when the config has them.
_POSITIVE = ("train.steps", "train.global_batch_size", "train.grad_accum", "train.log_every",
             "data.seq_len", "checkpoint.keep", "tokenizer.vocab_size", "model.d_model",
             "model.n_layers", "model.n_heads", "model.n_kv_heads", "model.d_ff",
             "data.prompt_len", "data.teacher_prompt_len", "data.completion_len")
_NON_NEGATIVE = ("checkpoint.every", "data.max_examples", "optim.warmup_steps",
                 "optim.weight_decay", "optim.clip_norm", "model.vocab_size",
                 "distill.heldout_rows", "distill.eval_every", "distill.topk",
                 "distill.loss_chunk")
# Enumerated string keys: allowed values.
_CHOICES = (("train.on_nonfinite", ("stop", "skip")),
            ("data.overlong", ("truncate", "drop")),
            ("distill.kl", ("", "forward", "reverse", "jsd")),
            ("distill.estimator", ("exact", "sampled")),
            ("model.scan_layers", (True, False, "auto")))  # None: auto too
# Distillation numbers: key -> (lowest, highest, whether the lowest is allowed), as the runner
# reads them (absent keys take the runner's defaults).
_DISTILL_RANGES = {"distill.temperature": (0.0, float("inf"), False),
                   "distill.sample_temperature": (0.0, float("inf"), False),
                   "distill.top_p": (0.0, 1.0, False),
                   "distill.beta": (0.0, 1.0, True),
                   "distill.lmbda": (0.0, 1.0, True)}


def _get(config, key: str, default=None):
  node = config
  for part in key.split("."):
    if not isinstance(node, (ml_collections.ConfigDict, dict)) or part not in node:
      return default
    node = node[part]
  return node


def data_parallel_size(mesh_shape, n_devices: int) -> int:
  """Size of the ('data', 'fsdp') axes of `mesh_shape` (one -1 takes the rest of n_devices)."""
  shape = [int(s) for s in mesh_shape]
  if -1 in shape:
    known = 1
    for s in shape:
      known *= s if s != -1 else 1
    shape[shape.index(-1)] = max(n_devices // max(known, 1), 1)
  return shape[0] * shape[1]


def validate(config: ml_collections.ConfigDict, n_devices: int | None = None,
             process_count: int = 1) -> None:
  """Raises ConfigError naming the key for sizes and counts that cannot train.

  Checks positivity, train.global_batch_size divisible by train.grad_accum, by the
  data-parallel mesh size (mesh.shape's data x fsdp) and by the number of processes,
  the optimizer's numbers, the enumerated string keys and the distillation keys (ranges of
  distill.*, and the sampled on-policy estimator's rollout settings).
  """
  for key in _POSITIVE:
    v = _get(config, key)
    if isinstance(v, (int, float)) and not isinstance(v, bool) and v <= 0:
      raise ConfigError(f"config key {key}={v} must be positive")
  for key in _NON_NEGATIVE:
    v = _get(config, key)
    if isinstance(v, (int, float)) and not isinstance(v, bool) and v < 0:
      raise ConfigError(f"config key {key}={v} must be >= 0")
  lr = _get(config, "optim.lr")
  if lr is not None and not (lr > 0 and lr < float("inf")):
    raise ConfigError(f"config key optim.lr={lr} must be a positive finite number")
  for key in ("optim.b1", "optim.b2"):
    v = _get(config, key)
    if v is not None and not 0 <= v < 1:
      raise ConfigError(f"config key {key}={v} must be in [0, 1)")
  if _get(config, "model.lora.enabled") and _get(config, "model.lora.rank", 1) <= 0:
    raise ConfigError(f"config key model.lora.rank={_get(config, 'model.lora.rank')} must be "
                      "positive")
  heads, kv = _get(config, "model.n_heads"), _get(config, "model.n_kv_heads")
  if heads and kv and heads % kv:
    raise ConfigError(f"config key model.n_heads={heads} is not divisible by "
                      f"model.n_kv_heads={kv}")
  for key, allowed in _CHOICES:
    v = _get(config, key)
    if v is not None and v not in allowed:
      raise ConfigError(f"config key {key}={v!r}: expected one of {allowed}")
  _validate_distill(config)
  batch, accum = _get(config, "train.global_batch_size"), _get(config, "train.grad_accum", 1)
  if batch is None:
    return
  if batch % accum:
    raise ConfigError(f"config key train.global_batch_size={batch} is not divisible by "
                      f"train.grad_accum={accum}")
  if batch % process_count:
    raise ConfigError(f"config key train.global_batch_size={batch} is not divisible by the "
                      f"{process_count} processes")
  shape = _get(config, "mesh.shape")
  if shape is not None and n_devices:
    dp = data_parallel_size(shape, n_devices)
    if batch % dp:
      raise ConfigError(f"config key train.global_batch_size={batch} is not divisible by the "
                        f"data-parallel mesh size {dp} (config key mesh.shape={tuple(shape)}: "
                        "data x fsdp)")


def _validate_distill(config: ml_collections.ConfigDict) -> None:
  """Ranges of the distill.* numbers, and the sampled on-policy estimator's conditions."""
  for key, (lo, hi, lo_ok) in _DISTILL_RANGES.items():
    v = _get(config, key)
    if v is None:
      continue
    if isinstance(v, bool) or not isinstance(v, (int, float)):
      raise ConfigError(f"config key {key}={v!r} must be a number")
    if not ((lo <= v if lo_ok else lo < v) and v <= hi and math.isfinite(v)):
      what = ("a positive finite number" if hi == float("inf") else
              f"in {'[' if lo_ok else '('}{lo:g}, {hi:g}]")
      raise ConfigError(f"config key {key}={v} must be {what}")
  if (_get(config, "channel") == "onpolicy" and _get(config, "distill.estimator") == "sampled"
      and not _get(config, "distill.allow_biased_estimator", False)):
    t = _get(config, "distill.temperature", 1.0)
    st = _get(config, "distill.sample_temperature", 1.0)
    top_p = _get(config, "distill.top_p", 1.0)
    if st != t or top_p != 1:
      raise ConfigError(
          f"config keys distill.sample_temperature={st}, distill.temperature={t}, "
          f"distill.top_p={top_p}: the sampled on-policy estimator (channel='onpolicy', "
          "distill.estimator='sampled') estimates the reverse KL without bias only from rollouts "
          "sampled at distill.sample_temperature == distill.temperature with distill.top_p=1; "
          "set them so, or accept the bias with --config.distill.allow_biased_estimator=True")


def validate_against_vocab(config: ml_collections.ConfigDict, vocab_size: int) -> None:
  """Raises ConfigError for settings that the vocabulary (known once the tokenizer and model
  are loaded) cannot satisfy: distill.topk above the vocabulary size."""
  k = _get(config, "distill.topk")
  if isinstance(k, int) and not isinstance(k, bool) and k > vocab_size:
    raise ConfigError(f"config key distill.topk={k} is larger than the vocabulary "
                      f"({vocab_size} tokens)")


# ---------------------------------------------------------------- resume checks

# Keys (or groups) that never change what a run computes: logging, progress, checkpointing,
# export, placement, checks' waivers, and this very list.
FREE_ON_RESUME = ("train.log_every", "train.progress", "train.on_nonfinite", "checkpoint",
                  "export", "mesh", "resume", "distill.eval_every",
                  "distill.allow_biased_estimator", "job", "variant",
                  "inputs")  # inputs: content fingerprints, checked by jaxlab.train.inputs
# With init.hf_path / init.workdir the architecture comes from there (compared through init.*);
# these model keys are still the run's own choice.
_MODEL_OWN = ("model.dtype", "model.param_dtype", "model.trainable_dtype", "model.remat",
              "model.remat_policy", "model.scan_layers", "model.lora")


def _flat(d, prefix="") -> dict[str, Any]:
  out = {}
  for k, v in (d.items() if isinstance(d, (dict, ml_collections.ConfigDict)) else []):
    if isinstance(v, (dict, ml_collections.ConfigDict)):
      out.update(_flat(v, f"{prefix}{k}."))
    else:
      out[f"{prefix}{k}"] = list(v) if isinstance(v, tuple) else v
  return out


def _covered(key: str, names) -> bool:
  return any(key == n or key.startswith(n + ".") for n in names)


def resume_changes(saved: dict, new: ml_collections.ConfigDict) -> list[str]:
  """"key: saved -> new" for each field that differs between a checkpoint's config and this
  run's and changes the run (schedule, model, data, optimizer, seed, ...); fields in
  FREE_ON_RESUME or named by `resume.allow_changes` are left out."""
  allowed = [a.strip() for a in str(_get(new, "resume.allow_changes", "") or "").split(",")
             if a.strip()]
  a, b = _flat(saved), _flat(new.to_dict() if hasattr(new, "to_dict") else new)
  from_source = bool(b.get("init.hf_path") or b.get("init.workdir"))
  changes = []
  for key in sorted(set(a) | set(b)):
    if _covered(key, FREE_ON_RESUME) or _covered(key, allowed):
      continue
    if key.startswith("model.") and from_source and not _covered(key, _MODEL_OWN):
      continue
    if key == "model.vocab_size" and (b.get(key) or 0) <= 0:
      continue  # "the tokenizer's": resolved when the run started
    if key == "model.scan_layers" and b.get(key) in (None, "auto"):
      continue  # "the source's layout": resolved when the run started (the checkpoint's)
    va, vb = a.get(key, "<absent>"), b.get(key, "<absent>")
    if va != vb and not (isinstance(va, (int, float)) and isinstance(vb, (int, float))
                         and float(va) == float(vb)):
      changes.append(f"{key}: {va!r} -> {vb!r}")
  return changes


def check_resume(saved: dict, new: ml_collections.ConfigDict, where: str) -> None:
  """Raises ConfigError listing resume_changes, if any."""
  changes = resume_changes(saved, new)
  if changes:
    raise ConfigError(
        f"{where} was trained with other settings; resuming would change the run:\n  "
        + "\n  ".join(changes) + "\nStart a new workdir, or allow these fields with "
        f"--config.resume.allow_changes={','.join(c.split(':')[0] for c in changes)}")
