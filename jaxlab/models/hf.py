"""Hugging Face checkpoints onto a mesh and back: `load_hf` and `export_hf`.

Parameter paths mirror HF names (`layers/3/self_attn/q_proj/kernel` is
`model.layers.3.self_attn.q_proj.weight`, transposed). A scanned model's stacked leaf
(`stacks/0/self_attn/q_proj/kernel`, [N, ...]) is the HF tensors of its N layers, read into
and written from one slice each, so both layouts load and export the same HF folder. Loading reads one tensor at a
time, and only the rows this host's devices hold, and places each slice straight into its
target sharding, so host memory stays near one tensor plus what this host keeps.
Exporting gathers one tensor at a time and streams it into size-capped safetensors shards.
"""
from __future__ import annotations

import concurrent.futures
import functools
import json
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from flax.nnx import traversals
from jax.experimental import multihost_utils

from jaxlab import sharding as sharding_lib
from jaxlab.models import hf_config, hf_tokenizer, safetensors_io
from jaxlab.models.config import HF_SCANNED, LoraConfig, ModelConfig, resolve_layout
from jaxlab.models.decoder import Decoder, layer_runs
from jaxlab.models.params import ModelSpec, cast_trainable, model_spec
from jaxlab.models.params import trainable_dtype as _trainable_dtype

# Buffers some older checkpoints carry; recomputed by the decoder, so skipped.
_IGNORED_SUFFIXES = (".rotary_emb.inv_freq",)


def hf_name(path: tuple) -> tuple[str, bool]:
  """HF tensor name of a jaxlab param path, and whether HF stores it transposed."""
  *modules, leaf = (str(p) for p in path)
  if not modules and leaf in ("embed_tokens", "lm_head"):
    return ("model.embed_tokens.weight", False) if leaf == "embed_tokens" else ("lm_head.weight", True)
  suffix = {"kernel": "weight", "bias": "bias", "scale": "weight"}[leaf]
  return "model." + ".".join(modules + [suffix]), leaf == "kernel"


def hf_names(path: tuple, cfg: ModelConfig) -> tuple[list[str], bool]:
  """`hf_name` of a base param path in either layout: one name per layer of a stacked leaf."""
  if path[0] != "stacks":
    name, transpose = hf_name(path)
    return [name], transpose
  start, stop = layer_runs(cfg)[path[1]]
  names = [hf_name(("layers", i) + tuple(path[2:]))[0] for i in range(start, stop)]
  return names, hf_name(("layers", start) + tuple(path[2:]))[1]


def _flat(tree: dict) -> dict[tuple, Any]:
  return traversals.flatten_mapping(tree) if tree else {}


def _unflat(flat: dict[tuple, Any]) -> dict:
  return traversals.unflatten_mapping(flat) if flat else {}


@functools.partial(jax.jit, static_argnames=("transpose", "dtype", "sharding"))
def _relayout(x, *, transpose: bool, dtype, sharding):
  """HF layout -> jaxlab layout and dtype, on the devices (no host copies)."""
  y = (jnp.swapaxes(x, -1, -2) if transpose else x).astype(dtype)
  return jax.lax.with_sharding_constraint(y, sharding)


def _place(infos: list[safetensors_io.TensorInfo], transpose: bool,
           target: jax.ShapeDtypeStruct, sharding: jax.sharding.NamedSharding,
           relayout: str) -> jax.Array:
  """Reads the stored rows this host's devices need and places them in `sharding`.

  `infos` is one tensor, or for a stacked (scanned) leaf the N layers' tensors, which fill
  the target's leading axis; the band is then N tensors' rows.

  Only the band of stored rows (the first dimension in the file) that this host's devices
  cover is read. With relayout="host" the band is transposed and cast by NumPy into a fresh
  aligned buffer, which the CPU backend adopts without a copy (nothing is compiled, so the
  loader never pays for XLA's compiler in time or memory). With relayout="device" the band
  is placed in the file's layout under the transposed sharding (the same device blocks) and a
  jitted transpose/cast runs on the accelerator.
  """
  on_host = relayout == "host"
  lead = len(target.shape) - len(infos[0].shape)  # 1 for a stacked leaf, else 0
  tspec = tuple(sharding.spec) + (None,) * (len(target.shape) - len(sharding.spec))
  if on_host or not transpose:
    shape, spec = tuple(target.shape), sharding.spec
    read_dim = len(shape) - 1 if transpose else lead  # the target dim that is the file's rows
  else:  # the file's layout, under the transposed sharding
    shape = tuple(target.shape[:lead]) + tuple(reversed(target.shape[lead:]))
    spec = jax.sharding.PartitionSpec(*tspec[:lead], *reversed(tspec[lead:]))
    read_dim = lead
  placed = jax.sharding.NamedSharding(sharding.mesh, spec)
  full = lambda idx: tuple(idx) + (slice(None),) * (len(shape) - len(tuple(idx)))
  if shape:
    spans = [full(idx)[read_dim].indices(shape[read_dim])[:2]
             for idx in placed.addressable_devices_indices_map(shape).values()]
    lo, hi = min(s for s, _ in spans), max(e for _, e in spans)
  else:
    lo, hi = 0, 0
  if lead:  # one layer at a time into the stacked band
    rows = None
    for j, info in enumerate(infos):
      layer = safetensors_io.read_rows(info, lo, hi)
      convert = on_host and (transpose or layer.dtype != target.dtype)
      if rows is None:
        band_shape = layer.shape[::-1] if convert and transpose else layer.shape
        rows = safetensors_io.aligned_empty((len(infos),) + band_shape,
                                            target.dtype if convert else layer.dtype)
      rows[j] = layer.T if convert and transpose else layer
  else:
    rows = safetensors_io.read_rows(infos[0], lo, hi)
    if on_host and (transpose or rows.dtype != target.dtype):
      band = safetensors_io.aligned_empty(rows.shape[::-1] if transpose else rows.shape,
                                          target.dtype)
      band[...] = rows.T if transpose else rows  # one pass: transpose and cast
      rows = band

  def slice_of(idx):
    if not shape:
      return rows
    idx = full(idx)
    start, stop, _ = idx[read_dim].indices(shape[read_dim])
    idx = idx[:read_dim] + (slice(start - lo, stop - lo),) + idx[read_dim + 1:]
    return rows[idx]

  x = jax.make_array_from_callback(shape, placed, slice_of)
  if on_host or (not transpose and x.dtype == target.dtype):
    return x
  return _relayout(x, transpose=transpose, dtype=target.dtype, sharding=sharding)


def _check_names(path: str, tensors: dict, expected: dict[str, tuple], tied: bool) -> None:
  missing = sorted(set(expected) - set(tensors))
  if missing:
    raise ValueError(f"{path}: checkpoint is missing tensor(s) {missing[:10]}"
                     + (f" and {len(missing) - 10} more" if len(missing) > 10 else ""))
  ignored = lambda n: n.endswith(_IGNORED_SUFFIXES) or (tied and n == "lm_head.weight")
  unexpected = sorted(n for n in set(tensors) - set(expected) if not ignored(n))
  if unexpected:
    raise ValueError(f"{path}: checkpoint has unexpected tensor(s) {unexpected[:10]} that the "
                     "model config does not use")


def base_layout(cfg: ModelConfig) -> tuple[dict, dict]:
  """Flat {path: ShapeDtypeStruct} and {path: logical axes} of the base (non-LoRA) params.

  Equal to `model_spec(cfg)`'s base leaves (either layout), but traced for one unrolled layer
  and repeated or stacked, since tracing every layer's init costs seconds on big models.
  HF checkpoints hold no steering vector: a steered config (`steer_layer`) is refused.
  """
  if cfg.steer_layer >= 0:
    raise ValueError(f"model config with steer_layer={cfg.steer_layer}: a steered model has a "
                     "steering vector that Hugging Face Llama/Qwen checkpoints have no tensor "
                     "for (jaxlab.models.steering)")
  one = model_spec(cfg.replace(n_layers=1, lora=None, trainable_dtype=None, scan_layers=False))
  abstract = _flat(one.abstract[0])
  axes = traversals.flatten_mapping(one.axes[0], is_leaf=lambda _, x: isinstance(x, tuple))
  out_abstract, out_axes = {}, {}
  runs = layer_runs(cfg)
  for p in abstract:
    if p[0] != "layers":
      out_abstract[p], out_axes[p] = abstract[p], axes[p]
    elif cfg.scan_layers:
      for r, (start, stop) in enumerate(runs):
        q = ("stacks", r) + p[2:]
        out_abstract[q] = jax.ShapeDtypeStruct((stop - start,) + abstract[p].shape,
                                               abstract[p].dtype)
        out_axes[q] = ("layers",) + axes[p]
    else:
      for i in range(cfg.n_layers):
        out_abstract[("layers", i) + p[2:]], out_axes[("layers", i) + p[2:]] = abstract[p], axes[p]
  return out_abstract, out_axes


def init_lora(spec: ModelSpec, mesh, seed: int = 0, rules=sharding_lib.DEFAULT_RULES) -> dict:
  """Fresh adapters (A random, B zero) from the decoder's own init; base weights never materialise."""
  def init():
    _, lora, _ = nnx.split(Decoder(spec.cfg, rngs=nnx.Rngs(seed)), nnx.LoRAParam, ...)
    # The unused base-weight init is dead code under jit.
    return cast_trainable(spec.cfg, nnx.to_pure_dict(lora))
  return jax.jit(init, out_shardings=spec.shardings(mesh, rules)[0])()


def load_hf(path: str, mesh, *, dtype: str | None = None, param_dtype: str | None = None,
            rules=sharding_lib.DEFAULT_RULES, lora: LoraConfig | None = None,
            seed: int = 0, relayout: str = "auto", trainable_dtype: str | None = None,
            scan_layers: bool | str | None = None) -> tuple[ModelConfig, dict, dict]:
  """(cfg, trainable, frozen) from an HF folder; base weights are frozen when `lora` is set.

  `scan_layers` (None / "auto": HF_SCANNED, scanned) reads the layers straight into a scanned
  model's stacks (no unrolled copy); False loads them unrolled (`layers/i/...`).
  `param_dtype` defaults to the stored tensors' dtype (bf16 stays bf16) and `dtype` (compute)
  to `param_dtype`. Adapters, when `lora` is given, are initialised from `seed`.
  `trainable_dtype` (training passes "float32") is the storage dtype of what trains: the
  adapters, or without `lora` every weight, cast as it is read (float32 master weights).
  `relayout` says where HF's [out, in] matrices become jaxlab's [in, out] and dtypes change:
  "host" (NumPy, no compilation: the default on CPU meshes, where it saves XLA's compiler
  footprint and time), "device" (a jitted transpose on the accelerators: the default
  elsewhere, as TPU/GPU transpose far faster than a host core) or "auto".
  """
  if relayout not in ("auto", "host", "device"):
    raise ValueError(f"relayout must be 'auto', 'host' or 'device', got {relayout!r}")
  if relayout == "auto":
    relayout = "host" if mesh.devices.flat[0].platform == "cpu" else "device"
  path = os.fspath(path)
  cfg = hf_config.config_from_hf(path)
  tensors = safetensors_io.checkpoint_tensors(path)
  embed = tensors.get("model.embed_tokens.weight")
  stored = embed.dtype.name if embed is not None else cfg.param_dtype  # trust the file over config
  param_dtype = param_dtype or stored
  cfg = cfg.replace(param_dtype=param_dtype, dtype=dtype or param_dtype, lora=lora,
                    trainable_dtype=trainable_dtype,
                    scan_layers=resolve_layout(scan_layers, own=HF_SCANNED))
  abstract, axes = base_layout(cfg)
  if lora is None:  # the base trains: read it straight into its trainable dtype
    abstract = {p: jax.ShapeDtypeStruct(a.shape, _trainable_dtype(cfg, a.dtype))
                for p, a in abstract.items()}
  shardings = {p: jax.sharding.NamedSharding(
      mesh, sharding_lib.logical_to_spec(axes[p], a.shape, mesh, rules)) for p, a in abstract.items()}
  names = {p: hf_names(p, cfg) for p in abstract}
  _check_names(path, tensors, {n: p for p, (ns, _) in names.items() for n in ns},
               cfg.tie_embeddings)
  for p, (ns, transpose) in names.items():
    layer_shape = abstract[p].shape[1:] if p[0] == "stacks" else abstract[p].shape
    want = layer_shape[::-1] if transpose else layer_shape
    for name in ns:
      if tensors[name].shape != tuple(want):
        raise ValueError(f"{path}: tensor {name!r} has shape {tensors[name].shape}, "
                         f"expected {tuple(want)} from config.json")
  # Largest first: the big temporaries come while little else is resident. Two threads
  # overlap one tensor's file read with another's transpose (both release the GIL), so at
  # most two tensors' (stacks') temporaries exist at once.
  order = sorted(abstract, key=lambda p: -sum(tensors[n].nbytes for n in names[p][0]))
  place = lambda p: _place([tensors[n] for n in names[p][0]], names[p][1], abstract[p],
                           shardings[p], relayout)
  with concurrent.futures.ThreadPoolExecutor(2, thread_name_prefix="load_hf") as pool:
    params = _unflat(dict(zip(order, pool.map(place, order))))
  if lora is None:
    return cfg, params, {}
  return cfg, init_lora(model_spec(cfg), mesh, seed, rules), params


def _to_host(x: jax.Array) -> np.ndarray:
  """The full value of a (possibly multi-host) array on this host."""
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return np.asarray(x)


def _shard_plan(entries: list[tuple[str, int]], max_shard_bytes: int) -> list[list[str]]:
  """Greedy split of (name, nbytes) in order into shards of at most max_shard_bytes (one tensor minimum)."""
  shards, size = [[]], 0
  for name, nbytes in entries:
    if shards[-1] and size + nbytes > max_shard_bytes:
      shards.append([])
      size = 0
    shards[-1].append(name)
    size += nbytes
  return shards


def export_hf(path: str, cfg: ModelConfig, params: dict, *, tokenizer_dir: str | None = None,
              dtype: str = "bfloat16", max_shard_bytes: int = 4 * 2**30) -> list[str]:
  """Writes an HF folder (config.json, sharded safetensors + index, tokenizer); returns its files.

  `params` are full base params (use `merge_lora` first). With `tokenizer_dir` (e.g. the
  original checkpoint folder) its tokenizer files, chat template, generation config and
  special token ids are copied. Every process must call this; only process 0 writes.
  """
  path = os.fspath(path)
  if cfg.steer_layer >= 0:
    raise ValueError(
        f"cannot export a steered model (steer_layer={cfg.steer_layer}) to {path}: Hugging Face "
        "Llama/Qwen models have no parameter for its steering vector. Export the base model "
        "and keep the steered folder (steer.json + direction.npy, jaxlab.models.steering) "
        "that names it")
  layout = cfg  # a scanned model's stacks follow its LoRA layers even once merged
  cfg = cfg.replace(lora=None)
  abstract, _ = base_layout(layout)
  flat = _flat(params)
  if set(flat) != set(abstract):
    extra, missing = sorted(set(flat) - set(abstract)), sorted(set(abstract) - set(flat))
    raise ValueError(f"params do not match the config (merge LoRA first): extra {extra[:5]}, "
                     f"missing {missing[:5]}")
  np_dtype = np.dtype(jnp.dtype(dtype))
  entries = {}  # HF name -> (param path, layer index in its stack or None, transpose, shape)
  for p in abstract:
    ns, transpose = hf_names(p, layout)
    stacked = p[0] == "stacks"
    layer_shape = abstract[p].shape[1:] if stacked else abstract[p].shape
    for j, name in enumerate(ns):
      entries[name] = (p, j if stacked else None, transpose,
                       tuple(layer_shape[::-1] if transpose else layer_shape))
  entries = dict(sorted(entries.items(), key=lambda e: _hf_order(e[0])))

  def fetch(name):
    p, j, transpose, _ = entries[name]
    x = _to_host(flat[p] if j is None else _layer(flat[p], j))
    return (x.T if transpose else x).astype(np_dtype)

  nbytes = {n: int(np.prod(e[3], dtype=np.int64)) * np_dtype.itemsize for n, e in entries.items()}
  shards = _shard_plan(list(nbytes.items()), max_shard_bytes)
  writer = jax.process_index() == 0
  if writer:
    os.makedirs(path, exist_ok=True)
    for f in os.listdir(path):  # stale weights would shadow (model.safetensors) or linger
      if f == safetensors_io.SINGLE_FILE or (f.startswith("model-") and f.endswith(".safetensors")):
        os.remove(os.path.join(path, f))
  weight_map, files = {}, []
  for k, names in enumerate(shards):
    file = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
    specs = [(n, entries[n][3], np_dtype) for n in names]
    if writer:
      safetensors_io.write_file(os.path.join(path, file), specs, fetch)
    else:
      for n in names:  # take part in the cross-host gathers
        fetch(n)
    weight_map.update({n: file for n in names})
    files.append(file)
  if writer:
    config = hf_config.config_to_hf(cfg, dtype)
    if tokenizer_dir is not None:
      config.update(hf_tokenizer.special_token_ids(tokenizer_dir))
      files += hf_tokenizer.copy_tokenizer_files(tokenizer_dir, path)
    _write_json(os.path.join(path, "config.json"), config)
    _write_json(os.path.join(path, safetensors_io.INDEX_FILE),
                {"metadata": {"total_size": sum(nbytes.values())}, "weight_map": weight_map})
    files += ["config.json", safetensors_io.INDEX_FILE]
  return files


@jax.jit
def _layer(x: jax.Array, i) -> jax.Array:
  """Layer i of a stacked leaf (a traced index: one compile per shape, not per layer)."""
  return jax.lax.dynamic_index_in_dim(x, i, keepdims=False)


def _hf_order(name: str) -> tuple:
  """embed_tokens, layers in order (each in its path order), norm, lm_head, as HF writes them."""
  parts = name.split(".")
  if parts[:2] == ["model", "layers"]:
    return (1, int(parts[2]), tuple(parts[3:]))
  return ({"model.embed_tokens.weight": 0, "lm_head.weight": 3}.get(name, 2), -1, tuple(parts))


def _write_json(file: str, obj: dict) -> None:
  with open(file, "w", encoding="utf-8") as f:
    json.dump(obj, f, indent=2, sort_keys=True)
    f.write("\n")
