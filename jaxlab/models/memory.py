"""Parameter count and per-device memory of a model on a mesh, without allocating anything.

  python -m jaxlab.models.memory --preset qwen2.5-7b --mesh 1,8,1 --dtype bfloat16 --lora-rank 32

Per device: weights, gradients and AdamW's two moments (same dtype as the trained params, as
optax keeps them), for full fine-tuning and for LoRA (frozen base + trained adapters).
Activations, the KV cache and XLA temporaries are not included.
"""
from __future__ import annotations

import argparse
import dataclasses
import math

import jax
import jax.numpy as jnp
from flax.nnx import traversals
from jax.sharding import AbstractMesh

from jaxlab import sharding as sharding_lib
from jaxlab.models import hf_config, presets
from jaxlab.models.config import LoraConfig, ModelConfig, num_params
from jaxlab.models.params import model_spec

GiB = 2**30


@dataclasses.dataclass(frozen=True)
class Footprint:
  """Element counts of a model, in total and on the most loaded device (per-element sums)."""
  base: int
  base_per_device: int
  lora: int
  lora_per_device: int


def _per_device(axes: dict, abstract: dict, mesh: AbstractMesh, rules) -> tuple[int, int]:
  """(total elements, elements held by one device) of a params tree."""
  is_axes = lambda _, x: isinstance(x, tuple)
  flat_axes = traversals.flatten_mapping(axes, is_leaf=is_axes) if axes else {}
  flat = traversals.flatten_mapping(abstract) if abstract else {}
  total = held = 0
  for path, a in flat.items():
    spec = sharding_lib.logical_to_spec(flat_axes[path], a.shape, mesh, rules)
    names = [n for entry in spec if entry is not None
             for n in ((entry,) if isinstance(entry, str) else entry)]
    total += a.size
    held += a.size // math.prod(mesh.shape[n] for n in names)
  return total, held


def footprint(cfg: ModelConfig, mesh_shape, rules=sharding_lib.DEFAULT_RULES) -> Footprint:
  """Exact counts from a one-layer spec scaled by the layer count (layers are identical)."""
  mesh = AbstractMesh(tuple(mesh_shape), sharding_lib.MESH_AXES)
  lora = cfg.lora
  one = cfg.replace(n_layers=1, scan_layers=False,  # per-device bytes are the same stacked
                    lora=None if lora is None else dataclasses.replace(lora, layers=None),
                    steer_layer=-1)  # the one steered layer's vector is added below
  spec = model_spec(one)
  base_ab, base_ax = (spec.abstract[1], spec.axes[1]) if lora else (spec.abstract[0], spec.axes[0])
  layer = _per_device(base_ax["layers"][0], base_ab["layers"][0], mesh, rules)
  rest = _per_device({k: v for k, v in base_ax.items() if k != "layers"},
                     {k: v for k, v in base_ab.items() if k != "layers"}, mesh, rules)
  if cfg.steer_layer >= 0:
    steer = _per_device({"steer": ("embed",)}, {"steer": jax.ShapeDtypeStruct(
        (cfg.d_model,), jnp.dtype(cfg.param_dtype))}, mesh, rules)
    rest = tuple(r + s for r, s in zip(rest, steer))
  base = [r + cfg.n_layers * l for r, l in zip(rest, layer)]
  lora_counts = [0, 0]
  if lora is not None:
    n_lora = cfg.n_layers if lora.layers is None else len(set(lora.layers) & set(range(cfg.n_layers)))
    per = _per_device(spec.axes[0]["layers"][0], spec.abstract[0]["layers"][0], mesh, rules)
    lora_counts = [n_lora * x for x in per]
  assert base[0] == num_params(cfg)
  return Footprint(base[0], base[1], *lora_counts)


def report(cfg: ModelConfig, mesh_shape, rules=sharding_lib.DEFAULT_RULES) -> str:
  """Human-readable memory table for full fine-tuning and (if cfg.lora) LoRA."""
  fp = footprint(cfg, mesh_shape, rules)
  b = jnp.dtype(cfg.param_dtype).itemsize
  n_dev = math.prod(mesh_shape)
  lines = [f"parameters: {fp.base:,} ({fp.base / 1e9:.3f}B)"]
  lines += [f"  weights in {d}: {fp.base * jnp.dtype(d).itemsize / GiB:.2f} GiB"
            for d in ("float32", "bfloat16")]
  lines.append(f"mesh (data, fsdp, tensor) = {tuple(mesh_shape)}, {n_dev} devices; "
               f"param dtype {cfg.param_dtype}; per device (most loaded), activations excluded:")
  w = fp.base_per_device * b
  lines.append(f"  full fine-tune: weights {w / GiB:.2f} + grads {w / GiB:.2f} + AdamW moments "
               f"{2 * w / GiB:.2f} = {4 * w / GiB:.2f} GiB")
  lines.append(f"  inference / frozen teacher: weights {w / GiB:.2f} GiB")
  if cfg.lora is not None:
    a = fp.lora_per_device * b
    lines.append(f"  LoRA r={cfg.lora.rank} ({fp.lora:,} adapter params): frozen weights "
                 f"{w / GiB:.2f} + adapters, grads, moments {4 * a / GiB:.3f} = "
                 f"{(w + 4 * a) / GiB:.2f} GiB")
  return "\n".join(lines)


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  src = parser.add_mutually_exclusive_group(required=True)
  src.add_argument("--preset", help=f"one of {sorted(presets.PRESETS)}")
  src.add_argument("--hf", help="an HF checkpoint folder or config.json")
  parser.add_argument("--mesh", default="1,1,1", help="data,fsdp,tensor sizes, e.g. 1,8,1")
  parser.add_argument("--dtype", default=None, help="param dtype (default: the model's)")
  parser.add_argument("--lora-rank", type=int, default=0, help="also report LoRA of this rank")
  args = parser.parse_args(argv)
  cfg = presets.get_preset(args.preset) if args.preset else hf_config.config_from_hf(args.hf)
  if args.dtype:
    cfg = cfg.replace(param_dtype=args.dtype, dtype=args.dtype)
  if args.lora_rank:
    cfg = cfg.replace(lora=LoraConfig(rank=args.lora_rank, alpha=2.0 * args.lora_rank))
  mesh_shape = tuple(int(s) for s in args.mesh.split(","))
  print(report(cfg, mesh_shape))


if __name__ == "__main__":
  main()
