"""The configs a study's stages run with: a training config (jaxlab.train.runner.run) and an
evaluation config (jaxlab.evals.run), both built from the study's own config."""
from __future__ import annotations

import copy
import os

import ml_collections


def training_config(config, study_keys, **updates) -> ml_collections.ConfigDict:
  """The study's config without its own groups (`study_keys`), job "train", with dotted-key
  updates ("init.workdir": path)."""
  d = {k: copy.deepcopy(v) for k, v in config.to_dict().items() if k not in study_keys}
  c = ml_collections.ConfigDict(d)
  c.job = "train"
  for key, value in updates.items():
    *groups, leaf = key.split(".")
    node = c
    for g in groups:
      node = node[g]
    node[leaf] = value
  return c


def override(c: ml_collections.ConfigDict, groups: dict, *, key: str, source: str,
             prefix: str = "") -> ml_collections.ConfigDict:
  """`c` with the nested values of `groups` set in place (a study's overrides of a config it
  builds, e.g. {"sample": {"max_new_tokens": 64}}); a key `c` lacks is an error naming it as
  config key `key`.KEY, `source` naming `c`."""
  for k, v in groups.items():
    name = f"{prefix}{k}"
    if k not in c:
      raise ValueError(f"config key {key}.{name}: {source} has no key {name!r}")
    group = isinstance(c[k], ml_collections.ConfigDict)
    if group != isinstance(v, dict):
      raise ValueError(f"config key {key}.{name}: {name!r} of {source} is "
                       + ("a group: set its keys" if group else "a value, not a group"))
    if group:
      override(c[k], v, key=key, source=source, prefix=name + ".")
    else:
      c[k] = tuple(v) if isinstance(v, list) else v
  return c


def eval_config(source, models, seed: int, *, key: str) -> ml_collections.ConfigDict:
  """The evaluation config of `models` ((name, path) pairs) sampled with `seed`. `source` is a
  ConfigDict or a config spec "FILE[:VARIANT]", FILE absolute or relative to the working
  directory (as --config's); `key` is the config key that named it (for errors)."""
  from jaxlab.config import load_config_file
  if isinstance(source, str):
    path, _, variant = source.partition(":")
    if not os.path.exists(path):
      raise ValueError(f"config key {key}={source!r}: {os.path.abspath(path)} does not exist "
                       "(a config file, absolute or relative to the working directory)")
    source = load_config_file(path + (f":{variant}" if variant else ""))
  c = source
  c.models = tuple(f"{name}={p}" for name, p in models)
  c.model_path = ""
  c.seed = seed
  return c
