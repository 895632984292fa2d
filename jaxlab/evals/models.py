"""Models to evaluate or judge with: an HF folder, a jaxlab workdir/checkpoint, or a random init.

A model is named by a string:
  "/path/hf_folder"      config.json + safetensors (jaxlab.models.hf.load_hf: scanned layers),
                         its own tokenizer
  "/path/jaxlab_workdir" a training workdir or its checkpoints/ (load_jaxlab_checkpoint), with
                         the workdir's tokenizer/ (or config.tokenizer.path)
  "/path/steered"        a steered model folder (steer.json: an HF folder or workdir plus a
                         steering vector, jaxlab.models.steering), with its tokenizer/
  "random:SEED"          a random model of config.model (tiny CPU runs and tests)
"""
from __future__ import annotations

import dataclasses
import os
import tempfile
from typing import Any

import ml_collections
from etils import epath

from jaxlab.models.config import ModelConfig
from jaxlab.models.params import ModelSpec, init_params, model_spec


@dataclasses.dataclass
class LoadedModel:
  """Parameters on the mesh and the tokenizer that goes with them."""
  spec: ModelSpec
  trainable: dict
  frozen: dict
  tokenizer: Any


def is_hf_folder(path: str) -> bool:
  return os.path.isfile(os.path.join(path, "config.json")) and any(
      f.endswith(".safetensors") for f in os.listdir(path))


def load_jaxlab_checkpoint(path: str, mesh, rules) -> tuple[ModelConfig, dict, dict]:
  """(cfg, trainable, frozen) of a jaxlab workdir or checkpoint (jaxlab.checkpoint.load_params)."""
  from jaxlab import checkpoint  # pylint: disable=g-import-not-at-top
  del rules  # load_params places params with the rules saved in the run's config
  return checkpoint.load_params(path, mesh)


def _tokenizer_for(path: str, config: ml_collections.ConfigDict, fallback_dir: str, key: str,
                   prefer_own: bool = False):
  from jaxlab.data.tokenizer import check_model_tokenizer, own_tokenizer_dir  # pylint: disable=g-import-not-at-top
  from jaxlab.models.hf_tokenizer import load_tokenizer  # pylint: disable=g-import-not-at-top
  own = own_tokenizer_dir(path) if prefer_own else None
  if own:
    return load_tokenizer(own)
  if config.tokenizer.path:
    tok = load_tokenizer(config.tokenizer.path)
    # A model that brings its own tokenizer must have been made with this one (by content).
    check_model_tokenizer(tok, repr(config.tokenizer.path), path, key)
    return tok
  for d in (path, os.path.join(path, "tokenizer"), os.path.join(os.path.dirname(path), "tokenizer"),
            fallback_dir):
    if d and os.path.isfile(os.path.join(d, "tokenizer_config.json")):
      return load_tokenizer(d)
  raise FileNotFoundError(f"no tokenizer for model {path}: expected tokenizer files in it or in "
                          "its tokenizer/ folder; set config key tokenizer.path")


def random_tokenizer(config: ml_collections.ConfigDict, texts: list[str], out_dir, *,
                     write: bool = True):
  """config.tokenizer.path, else a ChatML BPE trained once on `texts` and kept in out_dir.

  out_dir may be local or remote (etils.epath); the tokenizer is written there
  only when `write` (process 0), through a local temporary folder.
  """
  from jaxlab.models.hf_tokenizer import load_tokenizer  # pylint: disable=g-import-not-at-top
  if config.tokenizer.path:
    return load_tokenizer(config.tokenizer.path)
  out = epath.Path(out_dir)
  with tempfile.TemporaryDirectory() as tmp:
    if (out / "tokenizer_config.json").exists():
      for f in out.iterdir():
        (epath.Path(tmp) / f.name).write_bytes(f.read_bytes())
      return load_tokenizer(tmp)
    from jaxlab.data import tokenizer as tok_lib  # pylint: disable=g-import-not-at-top
    tok_lib.train_chat_tokenizer(texts, config.tokenizer.vocab_size, out_dir=tmp,
                                 whole_numbers=tok_lib.wants_whole_numbers(config))
    if write:
      staging = out.parent / (out.name + ".tmp")
      if staging.exists():
        staging.rmtree()  # left by a killed run
      staging.mkdir(parents=True)
      for f in sorted(os.listdir(tmp)):
        (staging / f).write_bytes((epath.Path(tmp) / f).read_bytes())
      staging.rename(out)
    return load_tokenizer(tmp)


def load_model_and_tokenizer(name: str, config: ml_collections.ConfigDict, mesh, rules, *,
                             tokenizer=None, tokenizer_dir: str = "", key: str = "models",
                             prefer_own: bool = False) -> LoadedModel:
  """The model named by `name` (see module docstring), placed on `mesh`; `key` is the config
  key that named it (for errors). With `prefer_own` (a judge: it reads text, not the evaluated
  models' ids) the model's own tokenizer wins over config.tokenizer.path."""
  if name.startswith("random:"):
    if tokenizer is None:
      raise ValueError("random models need a tokenizer (random_tokenizer)")
    d = config.model.to_dict()
    d["vocab_size"] = d.get("vocab_size") or len(tokenizer)
    cfg = ModelConfig.from_dict(d)
    spec = model_spec(cfg)
    trainable, frozen = init_params(spec, mesh, int(name.split(":", 1)[1]), rules)
    return LoadedModel(spec, trainable, frozen, tokenizer)
  if not os.path.isdir(name):
    raise FileNotFoundError(f"model {name!r} is neither a folder nor 'random:SEED'")
  tok = tokenizer or _tokenizer_for(name, config, tokenizer_dir, key, prefer_own)  # before weights
  from jaxlab.models import steering  # pylint: disable=g-import-not-at-top
  if steering.is_steered(name):  # a base model plus a steering vector
    cfg, trainable, frozen = steering.load_steered(
        name, lambda base: _load_weights(base, config, mesh, rules), mesh, rules)
  else:
    cfg, trainable, frozen = _load_weights(name, config, mesh, rules)
  return LoadedModel(model_spec(cfg), trainable, frozen, tok)


def _load_weights(name: str, config, mesh, rules) -> tuple[ModelConfig, dict, dict]:
  if is_hf_folder(name):
    from jaxlab.models.hf import load_hf  # pylint: disable=g-import-not-at-top
    dtype = config.get("dtype") or None
    return load_hf(name, mesh, dtype=dtype, param_dtype=dtype, rules=rules)
  return load_jaxlab_checkpoint(name, mesh, rules)
