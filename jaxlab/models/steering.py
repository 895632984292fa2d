"""Steered models: a base model plus alpha * direction added to the residual stream at one layer.

A steered model is a folder (a teacher for subliminal learning, a model to sample or score;
never trained):
  steer.json     {"base": HF folder or jaxlab workdir (relative: to this folder), "layer": L,
                  "alpha": a, "direction": "direction.npy", ...free metadata}
  direction.npy  float32 [d_model]
  tokenizer/     a copy of the base's tokenizer (jaxlab.data.tokenizer.own_tokenizer_dir finds
                 it, so tokenizer checks treat the folder as the base)
`load_steered` (through jaxlab.train.runner.load_model_params) loads the base and sets
`cfg.steer_layer = L` with the param `layers/L/mlp/steer` = alpha * direction, which the
decoder's MLP of layer L adds to its output: every forward path (training forward, KV-cache
sampler, unrolled or scanned) then computes block L's output + alpha * direction.

`direction` makes a direction by contrastive activation addition: the mean residual stream
after block L at the last prompt token of prompts rendered with a system prompt, minus the
mean over the same prompts without it (`residual_at`). `write_steered` writes the folder.
"""
from __future__ import annotations

import io
import json
import math
import os
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath
from flax.nnx import traversals

from jaxlab import paths
from jaxlab import sharding as sharding_lib
from jaxlab.models.config import ModelConfig
from jaxlab.models.decoder import attention_mask, layer_runs, scan_stack
from jaxlab.models.params import ModelSpec, model_spec

STEER_FILE = "steer.json"
DIRECTION_FILE = "direction.npy"
_RESERVED = ("base", "layer", "alpha", "direction")


def is_steered(path) -> bool:
  """Whether `path` is a steered model folder (holds steer.json)."""
  return bool(path) and paths.path(path, STEER_FILE).is_file()


def _load_npy(file: epath.Path) -> np.ndarray:
  try:
    return np.load(io.BytesIO(file.read_bytes()), allow_pickle=False)
  except (ValueError, OSError, EOFError) as e:
    raise ValueError(f"{file}: not a .npy array ({e})") from None


def read_steer(path) -> dict[str, Any]:
  """steer.json of a steered folder, checked, with "base" resolved (relative paths from the
  folder), "file" (steer.json's path), "direction_file" and "direction" (float32 [D])
  added. Errors name the file and key."""
  folder = paths.path(path)
  file = folder / STEER_FILE
  try:
    d = json.loads(file.read_text())
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise ValueError(f"{file}: not valid JSON ({e})") from None
  if not isinstance(d, dict):
    raise ValueError(f"{file}: expected a JSON object with keys {list(_RESERVED)}")
  missing = [k for k in ("base", "layer", "alpha") if k not in d]
  if missing:
    raise ValueError(f"{file}: missing key(s) {missing} (steer.json needs base, layer, alpha "
                     "and optionally direction)")
  base, layer, alpha = d["base"], d["layer"], d["alpha"]
  if not isinstance(base, str) or not base:
    raise ValueError(f"{file}: key 'base'={base!r} must name the base model's folder")
  if not isinstance(layer, int) or isinstance(layer, bool) or layer < 0:
    raise ValueError(f"{file}: key 'layer'={layer!r} must be a layer index (an int >= 0)")
  if not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or not math.isfinite(alpha):
    raise ValueError(f"{file}: key 'alpha'={alpha!r} must be a finite number")
  name = d.get("direction", DIRECTION_FILE)
  if not isinstance(name, str) or not name:
    raise ValueError(f"{file}: key 'direction'={name!r} must name a .npy file in {folder}")
  dfile = folder / name
  if not dfile.is_file():
    raise ValueError(f"{file}: its direction file {dfile} (key 'direction') does not exist")
  vec = _load_npy(dfile)
  if vec.ndim != 1 or not np.issubdtype(vec.dtype, np.floating):
    raise ValueError(f"{dfile}: expected a float vector [d_model], got {vec.dtype} "
                     f"{list(vec.shape)}")
  if not np.all(np.isfinite(vec)):
    raise ValueError(f"{dfile}: the direction has non-finite entries")
  if not paths.is_uri(base) and not os.path.isabs(base):
    base = str(folder / base)
  return {**d, "base": base, "layer": layer, "alpha": float(alpha), "file": str(file),
          "direction_file": str(dfile), "direction": vec.astype(np.float32)}


def _restack(tree: dict, old: ModelConfig, new: ModelConfig) -> dict:
  """Scanned params of `old`'s layer runs in `new`'s, whose runs split old ones (a layer that
  gained its own structure): the stacks are sliced, an unchanged one is kept as is."""
  if "stacks" not in tree:
    return tree
  old_runs, new_runs = layer_runs(old), layer_runs(new)
  if set(tree["stacks"]) - set(range(len(old_runs))):
    raise ValueError(f"params have stacks {sorted(tree['stacks'])}, the model config "
                     f"{len(old_runs)} layer run(s) {old_runs}")
  stacks = {}
  for r, (a, b) in enumerate(new_runs):
    q = next(i for i, (s, e) in enumerate(old_runs) if s <= a and b <= e)
    if q not in tree["stacks"]:
      continue
    s, e = old_runs[q]
    stacks[r] = tree["stacks"][q] if (a, b) == (s, e) else jax.tree.map(
        lambda x, i=a - s, j=b - s: x[i:j], tree["stacks"][q])
  return {**tree, "stacks": stacks}


def _with_leaf(tree: dict, path: tuple, value) -> dict:
  """`tree` with `value` at `path` (the dicts on the path copied, the caller's left alone)."""
  if not path:
    return value
  return {**tree, path[0]: _with_leaf(tree.get(path[0], {}), path[1:], value)}


def add_steer(cfg: ModelConfig, trainable: dict, frozen: dict, layer: int, vector, mesh=None,
              rules=sharding_lib.DEFAULT_RULES) -> tuple[ModelConfig, dict, dict]:
  """(cfg, trainable, frozen) of the model steered at `layer` by `vector` [D]: in the layout
  the params are in (a scanned model's stack holding `layer` is sliced into up to three),
  placed in the steered spec's shardings when `mesh` is given."""
  if cfg.steer_layer >= 0:
    raise ValueError(f"the model is already steered (steer_layer={cfg.steer_layer}); a steered "
                     "model cannot be the base of another")
  if not 0 <= layer < cfg.n_layers:
    raise ValueError(f"steering layer {layer} is not a layer of the model's {cfg.n_layers}")
  vector = np.asarray(vector, np.float32)
  if vector.shape != (cfg.d_model,):
    raise ValueError(f"steering vector of shape {list(vector.shape)}, the model's d_model is "
                     f"{cfg.d_model}")
  new = cfg.replace(steer_layer=layer)
  trainable, frozen = _restack(trainable, cfg, new), _restack(frozen, cfg, new)
  spec = model_spec(new)
  if new.scan_layers:
    path = ("stacks", layer_runs(new).index((layer, layer + 1)), "mlp", "steer")
  else:
    path = ("layers", layer, "mlp", "steer")
  trees = [trainable, frozen]
  flat = [traversals.flatten_mapping(t) if t else {} for t in spec.abstract]
  which = 0 if path in flat[0] else 1  # trainable unless LoRA makes the base frozen
  sds = flat[which][path]
  trees[which] = _with_leaf(trees[which], path,
                            jnp.asarray(vector.reshape(sds.shape)).astype(sds.dtype))
  if mesh is not None:
    trees = jax.device_put(tuple(trees), spec.shardings(mesh, rules))
  return new, trees[0], trees[1]


def load_steered(path, load_base: Callable[[str], tuple[ModelConfig, dict, dict]], mesh=None,
                 rules=sharding_lib.DEFAULT_RULES) -> tuple[ModelConfig, dict, dict]:
  """(cfg, trainable, frozen) of a steered folder: the base as `load_base(base_path)` loads it
  (any layout and dtype), steered at steer.json's layer by alpha * direction."""
  s = read_steer(path)
  if is_steered(s["base"]):
    raise ValueError(f"{s['file']}: key 'base'={s['base']!r} is itself a steered model; steer "
                     "the original base instead")
  cfg, trainable, frozen = load_base(s["base"])
  if not s["layer"] < cfg.n_layers:
    raise ValueError(f"{s['file']}: key 'layer'={s['layer']} is out of range: the base "
                     f"{s['base']} has {cfg.n_layers} layers (0..{cfg.n_layers - 1})")
  if s["direction"].shape != (cfg.d_model,):
    raise ValueError(f"{s['direction_file']}: direction of shape {list(s['direction'].shape)}, "
                     f"expected [{cfg.d_model}] (d_model of the base {s['base']})")
  return add_steer(cfg, trainable, frozen, s["layer"], s["alpha"] * s["direction"], mesh, rules)


# ------------------------------------------------------------------ residual stream

_RESIDUAL_FNS: dict = {}


def _residual_fn(spec: ModelSpec, layer: int):
  """jitted (trainable, frozen, tokens [B,L], lengths [B]) -> block `layer`'s output [B,D]."""
  key = (spec.cfg, layer)
  if key in _RESIDUAL_FNS:
    return _RESIDUAL_FNS[key]
  cfg = spec.cfg

  def fn(trainable, frozen, tokens_BxL, lengths_B):
    model = spec.merge(trainable, frozen)
    b, l = tokens_BxL.shape
    positions_BxL = jnp.broadcast_to(jnp.arange(l, dtype=jnp.int32), (b, l))
    segments_BxL = (positions_BxL < lengths_B[:, None]).astype(jnp.int32)
    mask = attention_mask(segments_BxL)
    last = lambda x_BxLxD: x_BxLxD[jnp.arange(b), lengths_B - 1].astype(jnp.float32)
    x = model.embed(tokens_BxL)
    if not cfg.scan_layers:
      for i in range(layer + 1):
        x = model.layers[i](x, positions_BxL, mask, causal=True)
      return last(x)
    for stack, (start, stop) in zip(model.stacks, layer_runs(cfg)):
      if stop <= layer:
        x, _ = scan_stack(stack, lambda blk, x, _: (blk(x, positions_BxL, mask, causal=True),
                                                     None), x)
        continue

      def step(blk, x, _):
        y = blk(x, positions_BxL, mask, causal=True)
        return y, last(y)
      _, ys_NxBxD = scan_stack(stack, step, x)  # this stack's layers' outputs, at the last token
      return ys_NxBxD[layer - start]
    raise AssertionError("unreachable: layer < n_layers")

  _RESIDUAL_FNS[key] = jax.jit(fn)
  return _RESIDUAL_FNS[key]


def residual_at(spec: ModelSpec, trainable: dict, frozen: dict, prompt_ids_BxL, lengths_B,
                layer: int) -> np.ndarray:
  """float32 [B, D]: the residual stream after block `layer` (its output, what a steering
  vector at `layer` is added to, and including it if the model is steered there) at each
  row's last prompt token (position lengths - 1). Rows are right-padded prompts."""
  cfg = spec.cfg
  if not 0 <= layer < cfg.n_layers:
    raise ValueError(f"layer {layer} is not a layer of the model's {cfg.n_layers}")
  tokens = np.asarray(prompt_ids_BxL, np.int32)
  lengths = np.asarray(lengths_B, np.int32)
  if tokens.ndim != 2 or lengths.shape != tokens.shape[:1]:
    raise ValueError(f"prompt ids {list(tokens.shape)} and lengths {list(lengths.shape)}: "
                     "expected [B, L] and [B]")
  if lengths.size and (lengths.min() < 1 or lengths.max() > tokens.shape[1]):
    raise ValueError(f"prompt lengths must be in [1, {tokens.shape[1]}], got "
                     f"{lengths.min()}..{lengths.max()}")
  return np.asarray(_residual_fn(spec, layer)(trainable, frozen, tokens, lengths))


def _mean_residual(spec, trainable, frozen, ids: Sequence[Sequence[int]], layer: int,
                   batch_size: int) -> np.ndarray:
  """Mean `residual_at` over prompts (float64), in length-sorted batches of fixed shapes."""
  from jaxlab.sample.engine import DEFAULT_BUCKETS, bucket_length  # pylint: disable=g-import-not-at-top
  ids = [np.asarray(x, np.int32) for x in ids]
  if not ids or any(len(x) == 0 for x in ids):
    raise ValueError("direction needs at least one prompt, each of at least one token")
  order = np.argsort([len(x) for x in ids], kind="stable")
  total = np.zeros((spec.cfg.d_model,), np.float64)
  for start in range(0, len(order), batch_size):
    idx = order[start:start + batch_size]
    width = bucket_length(max(len(ids[i]) for i in idx), DEFAULT_BUCKETS)
    tokens = np.zeros((batch_size, width), np.int32)
    lengths = np.ones((batch_size,), np.int32)  # dummy rows: one token, dropped below
    for r, i in enumerate(idx):
      tokens[r, :len(ids[i])], lengths[r] = ids[i], len(ids[i])
    res = residual_at(spec, trainable, frozen, tokens, lengths, layer)
    total += res[:len(idx)].astype(np.float64).sum(axis=0)
  return total / len(ids)


def direction(spec: ModelSpec, trainable: dict, frozen: dict,
              with_ids: Sequence[Sequence[int]], without_ids: Sequence[Sequence[int]],
              layer: int, batch_size: int = 8) -> np.ndarray:
  """float32 [D]: mean `residual_at(layer)` over prompts rendered with a system prompt minus
  the mean over the same prompts without it (contrastive activation addition). The prompts
  are token-id lists, already rendered with the chat template."""
  mean = lambda ids: _mean_residual(spec, trainable, frozen, ids, layer, batch_size)
  return (mean(with_ids) - mean(without_ids)).astype(np.float32)


# ------------------------------------------------------------------ the folder

def write_steered(folder, base_path, layer: int, alpha: float, direction,
                  tokenizer_dir=None, **meta) -> epath.Path:
  """Writes a steered model folder and returns it: direction.npy, tokenizer/ (a copy of
  `tokenizer_dir`'s tokenizer files; None: the base's own, jaxlab.data.tokenizer.
  own_tokenizer_dir) and, last, steer.json with `meta` (JSON values) besides the reserved
  keys. A killed write leaves no steer.json, so the folder is never taken for a whole one.
  Only process 0 writes."""
  from jaxlab.data.tokenizer import own_tokenizer_dir  # pylint: disable=g-import-not-at-top
  from jaxlab.models.hf_tokenizer import TOKENIZER_FILES  # pylint: disable=g-import-not-at-top
  vec = np.asarray(direction)
  if vec.ndim != 1 or not np.issubdtype(vec.dtype, np.floating) or not np.all(np.isfinite(vec)):
    raise ValueError(f"direction must be a finite float vector [d_model], got {vec.dtype} "
                     f"{list(vec.shape)}")
  if not isinstance(layer, (int, np.integer)) or isinstance(layer, bool) or layer < 0:
    raise ValueError(f"layer={layer!r} must be a layer index (an int >= 0)")
  if not math.isfinite(float(alpha)):
    raise ValueError(f"alpha={alpha!r} must be finite")
  clash = sorted(set(meta) & set(_RESERVED))
  if clash:
    raise ValueError(f"metadata keys {clash} are reserved in {STEER_FILE}")
  if is_steered(base_path):
    raise ValueError(f"base {base_path} is itself a steered model; steer its base instead")
  tok_src = tokenizer_dir or own_tokenizer_dir(str(base_path))
  if tok_src is None:
    raise ValueError(f"base {base_path} has no tokenizer files of its own (an HF folder's or a "
                     "workdir's tokenizer/); pass tokenizer_dir")
  record = {"base": str(paths.path(base_path)), "layer": int(layer), "alpha": float(alpha),
            "direction": DIRECTION_FILE, **meta}
  text = json.dumps(record, indent=2)  # unserialisable metadata fails before anything is written
  folder = paths.path(folder)
  if not paths.is_writer():
    return folder
  folder.mkdir(parents=True, exist_ok=True)
  steer = folder / STEER_FILE
  if steer.exists():  # a rewrite killed half way must not leave the old record beside new files
    steer.unlink()
  buf = io.BytesIO()
  np.save(buf, vec.astype(np.float32))
  tmp = folder / (DIRECTION_FILE + ".tmp")
  tmp.write_bytes(buf.getvalue())
  tmp.replace(folder / DIRECTION_FILE)
  src, tok, tok_tmp = paths.path(tok_src), folder / "tokenizer", folder / "tokenizer.tmp"
  if tok_tmp.exists():
    tok_tmp.rmtree()
  tok_tmp.mkdir()
  copied = [f.name for f in src.iterdir() if f.is_file() and f.name in TOKENIZER_FILES]
  if not copied:
    raise ValueError(f"tokenizer folder {src} holds none of {list(TOKENIZER_FILES)}")
  for name in copied:
    (src / name).copy(tok_tmp / name)
  if tok.exists():
    tok.rmtree()
  tok_tmp.rename(tok)
  tmp = folder / (STEER_FILE + ".tmp")
  tmp.write_text(text + "\n")
  tmp.replace(steer)
  return folder
