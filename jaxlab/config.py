"""Config files (`configs/NAME.py:VARIANT` with `get_config(arg)`) and `--config.key=value` overrides.

Overrides are parsed against the type of the existing field, and a key that
the config does not define is an error naming it (with the closest known key),
so a typo never silently trains the wrong experiment.
"""
from __future__ import annotations

import ast
import difflib
import importlib.util
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
  return config


def _all_keys(config: ml_collections.ConfigDict, prefix: str = "") -> list[str]:
  keys = []
  for k, v in config.items():
    keys.append(prefix + k)
    if isinstance(v, ml_collections.ConfigDict):
      keys.extend(_all_keys(v, prefix + k + "."))
  return keys


def _parse_value(key: str, text: str, current: Any) -> Any:
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
