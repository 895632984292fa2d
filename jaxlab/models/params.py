"""Abstract model specs and parameter pytrees (pure nested dicts) placed on a mesh.

A model is split into `trainable` and `frozen` pure dicts: with LoRA the
adapters train and the base weights are frozen; without it everything trains
and `frozen` is empty. Gradients and optimizer state exist only for
`trainable`, so LoRA on a 32B model carries no full-size optimizer state.

With `cfg.scan_layers` the per-layer params are stacked (`stacks/r/...` with a leading
layer axis, see `decoder.layer_runs`); `stack_layers` / `unstack_layers` convert between
that and the unrolled `layers/i/...` layout.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from flax.nnx import traversals

from jaxlab import sharding as sharding_lib
from jaxlab.models.config import ModelConfig
from jaxlab.models.decoder import Decoder, layer_runs


def _pure(state: nnx.State, fn) -> dict:
  flat = {path: fn(var) for path, var in nnx.to_flat_state(state)}
  return traversals.unflatten_mapping(flat) if flat else {}


@dataclasses.dataclass(frozen=True)
class ModelSpec:
  """Everything about a model's parameters except their values."""
  cfg: ModelConfig
  graphdef: Any
  abstract: tuple[dict, dict]  # (trainable, frozen) of ShapeDtypeStruct
  axes: tuple[dict, dict]      # (trainable, frozen) of logical-axes tuples

  def merge(self, trainable: dict, frozen: dict) -> Decoder:
    """The NNX module holding these params (used inside jitted functions)."""
    return nnx.merge(self.graphdef, trainable, frozen)

  def shardings(self, mesh, rules=sharding_lib.DEFAULT_RULES) -> tuple[dict, dict]:
    return tuple(sharding_lib.tree_shardings(ax, ab, mesh, rules)
                 for ax, ab in zip(self.axes, self.abstract))


def _split(model: Decoder):
  trainable = nnx.LoRAParam if model.cfg.lora is not None else nnx.Param
  return nnx.split(model, trainable, ...)


def trainable_dtype(cfg: ModelConfig, dtype) -> Any:
  """The storage dtype of a trainable leaf: cfg.trainable_dtype for floats, else unchanged."""
  dtype = jnp.dtype(dtype)
  if cfg.trainable_dtype and jnp.issubdtype(dtype, jnp.floating):
    return jnp.dtype(cfg.trainable_dtype)
  return dtype


def cast_trainable(cfg: ModelConfig, trainable: dict) -> dict:
  """`trainable` in its storage dtype (a no-op when already there or none is set)."""
  return jax.tree.map(lambda x: x.astype(trainable_dtype(cfg, x.dtype)), trainable)


def model_spec(cfg: ModelConfig) -> ModelSpec:
  """Shapes, dtypes and logical axes of a model, computed without allocating it.

  Trainable leaves take `cfg.trainable_dtype` (the module computes in `cfg.dtype` whatever
  the stored dtype, so only updates and optimizer moments see it).
  """
  abstract_model = nnx.eval_shape(lambda: Decoder(cfg, rngs=nnx.Rngs(0)))
  graphdef, trainable, frozen = _split(abstract_model)
  val = lambda v: v.get_value() if hasattr(v, "get_value") else v.value
  train_val = lambda v: jax.ShapeDtypeStruct(val(v).shape, trainable_dtype(cfg, val(v).dtype))
  return ModelSpec(
      cfg=cfg, graphdef=graphdef,
      abstract=(_pure(trainable, train_val), _pure(frozen, val)),
      axes=(_pure(trainable, lambda v: tuple(v.axes)), _pure(frozen, lambda v: tuple(v.axes))))


def init_params(spec: ModelSpec, mesh, seed: int, rules=sharding_lib.DEFAULT_RULES):
  """Random (trainable, frozen) params created directly in their shardings."""
  def init():
    _, trainable, frozen = _split(Decoder(spec.cfg, rngs=nnx.Rngs(seed)))
    return cast_trainable(spec.cfg, nnx.to_pure_dict(trainable)), nnx.to_pure_dict(frozen)
  return jax.jit(init, out_shardings=spec.shardings(mesh, rules))()


def merge_lora(trainable: dict, frozen: dict, cfg: ModelConfig) -> dict:
  """Base-model params (no adapters) with W <- W + scale * A @ B folded in."""
  if cfg.lora is None:
    return {**frozen, **trainable} if frozen else trainable
  def fold(base, lora):
    if not isinstance(base, dict):
      return base
    out = {k: fold(v, lora.get(k, {}) if isinstance(lora, dict) else {}) for k, v in base.items()}
    if "kernel" in out and isinstance(lora, dict) and "lora_a" in lora:
      w = out["kernel"]
      delta = (lora["lora_a"].astype(jnp.float32) @ lora["lora_b"].astype(jnp.float32)) * cfg.lora.scale
      out["kernel"] = (w.astype(jnp.float32) + delta).astype(w.dtype)
    return out
  return fold(frozen, trainable)


def count(tree: dict) -> int:
  return sum(int(x.size) for x in jax.tree.leaves(tree))


def stack_layers(tree: dict, cfg: ModelConfig) -> dict:
  """Unrolled params (`layers/i/...`) in the scanned layout of `cfg` (`stacks/r/...`, [N, ...]).

  Works on trainable and frozen dicts alike: a stack whose layers hold nothing in `tree` (no
  adapters there) is left out. Under jit the stacking is a copy of every layer's weights.
  """
  if "layers" not in tree:
    return tree
  out = {k: v for k, v in tree.items() if k != "layers"}
  stacks = {}
  for r, (start, stop) in enumerate(layer_runs(cfg)):
    have = [i for i in range(start, stop) if i in tree["layers"]]
    if not have:
      continue
    if len(have) != stop - start:
      raise ValueError(f"layers {have} of stack [{start}, {stop}) have params, the others not: "
                       "the tree does not match the model config")
    stacks[r] = jax.tree.map(lambda *xs: jnp.stack(xs), *(tree["layers"][i] for i in have))
  return {**out, "stacks": stacks} if stacks else out


def unstack_layers(tree: dict, cfg: ModelConfig) -> dict:
  """Scanned params (`stacks/r/...`) in the unrolled layout (`layers/i/...`); inverse of
  `stack_layers`."""
  if "stacks" not in tree:
    return tree
  out = {k: v for k, v in tree.items() if k != "stacks"}
  layers = {}
  for r, (start, stop) in enumerate(layer_runs(cfg)):
    if r in tree["stacks"]:
      for i in range(start, stop):
        layers[i] = jax.tree.map(lambda x, j=i - start: x[j], tree["stacks"][r])
  return {**out, "layers": layers} if layers else out


def with_layout(cfg: ModelConfig, trainable: dict, frozen: dict, scan_layers: bool):
  """(cfg, trainable, frozen) converted to the unrolled or scanned layout `scan_layers` asks."""
  if cfg.scan_layers == scan_layers:
    return cfg, trainable, frozen
  new = cfg.replace(scan_layers=scan_layers)
  convert = (lambda t: stack_layers(t, new)) if scan_layers else (lambda t: unstack_layers(t, cfg))
  return new, convert(trainable), convert(frozen)
