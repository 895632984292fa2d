"""Will a config fit its accelerator? Checked abstractly: no weights, nothing allocated.

  python -m jaxlab.shapecheck --config=configs/em_real.py:em_qwen7b --accelerator=v5p-32 \
      [--mesh=1,16,1] [--model=PRESET] [--no-lower | --lower-layers=K] [--config.key=value ...]

The model comes from `config.init.hf_path`'s config.json when that folder exists, else from
`config.model` (eval jobs: each model they name; `--model` stands in for names that cannot be
resolved without weights). Parameters and optimizer state are built with `jax.eval_shape` and
placed by the sharding rules on a mesh of the config's shape over the accelerator's chip count
(exact counts from 1- and 2-layer models, see `sizes_by_depth`), and the train step is lowered
on a fake CPU mesh of that shape (tracing and sharding propagation only; nothing is compiled),
which catches shape and sharding errors. Printed per device (the most loaded one): params,
grads (the gradient and AdamW's update), optimizer state, activations, KV cache (and a frozen
teacher's weights). Params, grads and optimizer state are exact byte counts of the sharded
arrays; activations and the KV cache are estimates (`activation_bytes`, `kv_cache_bytes`;
against a measured CPU run see benchmarks/shapecheck_memory.py). Exit status 1 when the total
exceeds `headroom` (0.9) of one device's memory, 2 for a bad config or mesh.
"""
from __future__ import annotations

import dataclasses
import math
import os
import re
import sys

GiB = 2**30
# Per-chip memory and the number of chips a slice-name unit counts (v4/v5p names count
# TensorCores, two per chip; v5e/v6e names count chips). GPUs: "8xh100" or "h100" (8).
ACCELERATORS = {
    "v4": (32 * GiB, 2), "v5e": (16 * GiB, 1), "v5litepod": (16 * GiB, 1), "v5p": (95 * GiB, 2),
    "v6e": (32 * GiB, 1), "h100": (80 * GiB, None), "h200": (141 * GiB, None),
    "a100": (80 * GiB, None), "a100-40gb": (40 * GiB, None), "cpu": (16 * GiB, None),
}
_CAUSAL_BLOCK = 128  # jaxlab.models.decoder's query block in causal attention


@dataclasses.dataclass(frozen=True)
class Accelerator:
  name: str
  chips: int
  memory: int  # bytes per chip


def parse_accelerator(text: str, default_chips: int | None = None) -> Accelerator:
  """'v5e-16' (16 chips), 'v5p-32' (16 chips), '8xh100' or 'h100' (8 GPUs), 'cpu'."""
  t = text.strip().lower()
  count = None
  if m := re.fullmatch(r"(\d+)x([a-z0-9-]+)", t):
    count, kind = int(m.group(1)), m.group(2)
  elif m := re.fullmatch(r"([a-z0-9]+?)-(\d+)", t):
    kind, count = m.group(1), int(m.group(2))
  else:
    kind = t
  if kind not in ACCELERATORS:
    raise ValueError(f"unknown accelerator {text!r}; known: {sorted(ACCELERATORS)} "
                     "(e.g. v5e-16, v5p-32, 8xh100)")
  memory, per_chip = ACCELERATORS[kind]
  if count is None:
    count = default_chips or (8 if kind in ("h100", "h200", "a100", "a100-40gb") else 1)
  elif per_chip:
    count = max(count // per_chip, 1)
  return Accelerator(text, count, memory)


def resolve_mesh(shape, n_devices: int) -> tuple[int, ...]:
  """mesh.shape with its -1 entry filled in for n_devices."""
  shape = [int(s) for s in shape]
  known = math.prod(s for s in shape if s != -1)
  if -1 in shape:
    if n_devices % known:
      raise ValueError(f"config key mesh.shape={tuple(shape)} does not divide {n_devices} devices")
    shape[shape.index(-1)] = n_devices // known
  if math.prod(shape) != n_devices:
    raise ValueError(f"config key mesh.shape={tuple(shape)} needs {math.prod(shape)} devices, "
                     f"the accelerator has {n_devices}")
  return tuple(shape)


def _config_model(config):
  from jaxlab.models.config import ModelConfig
  d = config.model.to_dict()
  if d.get("vocab_size", 0) <= 0:  # 0 = the tokenizer's; a from-scratch BPE of tokenizer.vocab_size
    d["vocab_size"] = config.tokenizer.vocab_size
  return ModelConfig.from_dict(d)


def resolve_model(config):
  """ModelConfig of a training config: init.hf_path's config.json if present, else config.model;
  model.scan_layers None / "auto" is resolved as the run resolves it (an HF init: scanned)."""
  from jaxlab.models import hf_config
  from jaxlab.models.config import HF_SCANNED, resolve_layout
  cfg = _config_model(config)
  hf_path = (config.get("init") or {}).get("hf_path", "")
  if hf_path:
    cfg = cfg.replace(scan_layers=resolve_layout(config.model.get("scan_layers"), own=HF_SCANNED))
  if hf_path and os.path.isfile(os.path.join(hf_path, "config.json")):
    cfg = hf_config.config_from_hf(hf_path).replace(
        dtype=cfg.dtype, param_dtype=cfg.param_dtype, remat=cfg.remat,
        remat_policy=cfg.remat_policy, scan_layers=cfg.scan_layers, lora=cfg.lora)
  return cfg


def _tree_bytes(abstract, shardings) -> int:
  """Bytes one device holds of a pytree of ShapeDtypeStructs placed by `shardings`."""
  import jax
  leaves = jax.tree.leaves(jax.tree.map(
      lambda a, s: math.prod(s.shard_shape(a.shape)) * a.dtype.itemsize, abstract, shardings))
  return int(sum(leaves))


def _split(dim: int, ways: int) -> float:
  return dim / ways if ways > 1 and dim % ways == 0 else dim


def activation_bytes(cfg, batch: int, seq_len: int, mesh_shape, training: bool = True) -> int:
  """Estimated activation bytes per device for one (micro-)batch [batch, seq_len].

  Tokens split over data*fsdp, heads/mlp/vocab over tensor (when they divide). Per layer and
  token the backward pass keeps (compute dtype, b bytes) 4 d_model (residuals, norm outputs),
  q/k/v and the attention output, 4 d_ff (gate, up, their product, silu) and the float32 scores
  plus their b-byte probabilities (causal blocks of 128 queries: L/2 + 64 keys on average).
  With remat (`cfg.remat_mode`) each block's input is kept, plus what the policy saves
  ("dots_no_batch": the projections' outputs, "dots": those and the attention's two einsums,
  "save_qkvo": q, k, v and the attention output), and one block is live twice (recompute +
  its gradient). The float32 logits, their softmax and their gradient add 12 bytes per token and
  vocabulary entry.
  Inference (`training=False`): one layer live and only the last position's logits.
  """
  import jax.numpy as jnp
  data, fsdp, tensor = mesh_shape
  b = jnp.dtype(cfg.dtype).itemsize
  rows = _split(batch, data * fsdp)
  tokens = rows * seq_len
  e, h, k = cfg.dim_per_head, _split(cfg.n_heads, tensor), _split(cfg.n_kv_heads, tensor)
  keys = min(seq_len, seq_len / 2 + _CAUSAL_BLOCK / 2)
  layer = (b * (4 * cfg.d_model + (2 * h + 2 * k) * e + 4 * _split(cfg.d_ff, tensor))
           + (4 + b) * h * keys)
  mask = rows * seq_len * seq_len  # the [B, L, L] bool attention mask
  vocab = _split(cfg.vocab_size, tensor)
  if not training:
    return int(tokens * layer + mask + rows * vocab * 4)
  mode = cfg.remat_mode
  if mode == "none":
    saved = cfg.n_layers * layer
  else:
    projections = b * ((h + 2 * k) * e + 2 * cfg.d_model + 2 * _split(cfg.d_ff, tensor))
    kept = {"full": 0, "dots_no_batch": projections,
            "dots": projections + (4 * keys + b * e) * h, "save_qkvo": b * (2 * h + 2 * k) * e}[mode]
    saved = cfg.n_layers * (cfg.d_model * b + kept) + 2 * layer
  return int(tokens * (saved + 12 * vocab) + mask)


def kv_cache_bytes(cfg, batch: int, length: int, mesh_shape) -> int:
  """The sampler's cache per device: 2 n_layers [B, K, S, E], B over data*fsdp, K over tensor."""
  import jax.numpy as jnp
  data, fsdp, tensor = mesh_shape
  per = _split(batch, data * fsdp) * _split(cfg.n_kv_heads, tensor) * length * cfg.dim_per_head
  return int(2 * cfg.n_layers * per * jnp.dtype(cfg.dtype).itemsize)


@dataclasses.dataclass
class Report:
  """One model's per-device footprint for a config on an accelerator."""
  title: str
  accelerator: Accelerator
  mesh_shape: tuple[int, ...]
  params: int
  trainable: int
  per_device: dict[str, int]  # bytes: params, grads, optimizer, activations, kv_cache
  headroom: float = 0.9
  notes: list[str] = dataclasses.field(default_factory=list)

  @property
  def total(self) -> int:
    return sum(self.per_device.values())

  @property
  def fits(self) -> bool:
    return self.total <= self.headroom * self.accelerator.memory

  def text(self) -> str:
    acc = self.accelerator
    lines = [f"{self.title}",
             f"  parameters {self.params:,} ({self.params / 1e9:.2f}B), trainable "
             f"{self.trainable:,}",
             f"  accelerator {acc.name}: {acc.chips} devices x {acc.memory / GiB:.0f} GiB; mesh "
             f"(data, fsdp, tensor) = {self.mesh_shape}",
             "  per device: " + ", ".join(f"{k} {v / GiB:.2f}" for k, v in self.per_device.items())
             + f" GiB; total {self.total / GiB:.2f} GiB of {acc.memory / GiB:.0f} GiB "
             f"({100 * self.total / acc.memory:.0f}%)"]
    lines += [f"  note: {n}" for n in self.notes]
    lines.append(f"  {'FITS' if self.fits else 'DOES NOT FIT'} (limit {self.headroom:.0%} of "
                 "device memory)")
    return "\n".join(lines)


def _mesh(mesh_shape):
  """A real mesh over the first prod(shape) (fake CPU) devices, or None if too few exist."""
  import jax
  from jaxlab import sharding as sharding_lib
  n = math.prod(mesh_shape)
  if len(jax.devices()) < n:
    return None
  return sharding_lib.make_mesh(mesh_shape, jax.devices()[:n])


def _shardings(config, mesh_shape):
  from jax.sharding import AbstractMesh, AxisType
  from jaxlab import sharding as sharding_lib
  rules = {**sharding_lib.DEFAULT_RULES, **_rules(config)}
  mesh = _mesh(mesh_shape)
  abstract = AbstractMesh(tuple(mesh_shape), sharding_lib.MESH_AXES,
                          axis_types=(AxisType.Auto,) * 3)
  return mesh, abstract, rules


def _rules(config) -> dict:
  rules = config.get("mesh", {}).get("rules", {}) if config.get("mesh") else {}
  return {k: (tuple(v) if isinstance(v, (list, tuple)) else v) for k, v in rules.items()}


def shallow(cfg, n_layers: int):
  """`cfg` with only `n_layers` identical layers; LoRA layer indices clipped into range."""
  if n_layers >= cfg.n_layers:
    return cfg
  lora = cfg.lora
  if lora is not None and lora.layers is not None:
    lora = dataclasses.replace(lora, layers=tuple(sorted({min(l, n_layers - 1) for l in lora.layers})))
  return cfg.replace(n_layers=n_layers, lora=lora)


def _sizes(cfg, optimizer, abstract_mesh, rules) -> dict[str, int]:
  """Parameter counts and per-device bytes (trainable, frozen, optimizer) of one model."""
  import jax
  from jaxlab.models.params import model_spec
  from jaxlab.train import state as state_lib
  spec = model_spec(cfg)
  sh = state_lib.state_shardings(spec, optimizer, abstract_mesh, rules)
  return {"n_params": sum(math.prod(a.shape) for a in jax.tree.leaves(spec.abstract)),
          "n_trainable": sum(math.prod(a.shape) for a in jax.tree.leaves(spec.abstract[0])),
          "trainable": _tree_bytes(spec.abstract[0], sh.params),
          "frozen": _tree_bytes(spec.abstract[1], sh.frozen),
          "optimizer": _tree_bytes(jax.eval_shape(optimizer.init, spec.abstract[0]), sh.opt_state)}


def sizes_by_depth(cfg, optimizer, abstract_mesh, rules) -> dict[str, int]:
  """`_sizes` of the full model from 1- and 2-layer models (a deep spec takes seconds to build).

  Exact because layers are identical apart from carrying LoRA adapters or not: with m adapted
  layers of n, size = rest + m * adapted layer + (n - m) * plain layer.
  """
  import optax
  optimizer = optimizer or optax.identity()
  n, lora = cfg.n_layers, cfg.lora
  if n <= 2:
    return _sizes(cfg, optimizer, abstract_mesh, rules)
  all_on = None if lora is None else dataclasses.replace(lora, layers=None)
  one = _sizes(cfg.replace(n_layers=1, lora=all_on), optimizer, abstract_mesh, rules)
  two = _sizes(cfg.replace(n_layers=2, lora=all_on), optimizer, abstract_mesh, rules)
  adapted = {k: two[k] - one[k] for k in one}
  plain = adapted
  m = n
  if lora is not None and lora.layers is not None:
    m = len(set(lora.layers) & set(range(n)))
    first = _sizes(cfg.replace(n_layers=2, lora=dataclasses.replace(lora, layers=(0,))),
                   optimizer, abstract_mesh, rules)
    plain = {k: first[k] - one[k] for k in one}
  return {k: one[k] - adapted[k] + m * adapted[k] + (n - m) * plain[k] for k in one}


def check_train(config, cfg, acc: Accelerator, mesh_shape, *, lower: bool = True,
                lower_layers: int | None = None, title: str = "") -> Report:
  """Footprint of training `cfg` with config.optim / config.train / config.data on `acc`.

  `lower_layers=K` lowers a K-layer model of the same width instead of all layers (layers are
  identical, so shapes and shardings are checked the same; unrolled, lowering time grows with
  depth, while a `model.scan_layers` model lowers in about the same time at any depth).
  """
  import jax
  from jaxlab import sharding as sharding_lib
  from jaxlab.models.params import model_spec
  from jaxlab.train import optim, sft_step
  from jaxlab.train import step as step_lib
  from jaxlab.train import state as state_lib
  mesh, abstract_mesh, rules = _shardings(config, mesh_shape)
  optimizer, schedule = optim.make_optimizer(config.optim, max(config.train.steps, 1))
  sizes = sizes_by_depth(cfg, optimizer, abstract_mesh, rules)
  trainable = sizes["trainable"]
  accum = max(config.train.get("grad_accum", 1), 1)
  batch, seq_len = config.train.global_batch_size, config.data.seq_len
  shards = mesh_shape[0] * mesh_shape[1]
  if batch % accum or (batch // accum) % shards:
    raise ValueError(f"config key train.global_batch_size={batch} with train.grad_accum={accum}: "
                     f"micro-batches of {batch / accum:g} rows do not split over the "
                     f"data x fsdp = {shards} devices of mesh {tuple(mesh_shape)}")
  per_device = {
      "params": trainable + sizes["frozen"],
      # The gradient and AdamW's update (+ the accumulator when accumulating micro-batches).
      "grads": trainable * (3 if accum > 1 else 2),
      "optimizer": sizes["optimizer"],
      "activations": activation_bytes(cfg, batch // accum, seq_len, mesh_shape),
      "kv_cache": 0}
  notes = []
  if config.get("sample"):
    s = config.sample
    length = max(s.get("buckets", (seq_len,))) + s.get("max_new_tokens", 0)
    per_device["kv_cache"] = kv_cache_bytes(cfg, s.get("batch_size", batch), length, mesh_shape)
  if lower:
    if mesh is None:
      notes.append(f"not lowered: {math.prod(mesh_shape)} devices needed, "
                   f"{len(jax.devices())} present (run as a fresh process)")
    else:
      lspec = model_spec(shallow(cfg, lower_layers) if lower_layers else cfg)
      state_sh = state_lib.state_shardings(lspec, optimizer, mesh, rules)
      batch_sh = {k: sharding_lib.batch_sharding(mesh, 2, rules=rules)
                  for k in ("inputs", "targets", "positions", "segment_ids", "loss_mask")}
      step = step_lib.jit_step(sft_step.make_sft_step(lspec, optimizer, schedule, accum), state_sh,
                               batch_sh, mesh, with_teacher=False)
      state = state_lib.abstract_state(lspec, optimizer, state_sh)
      dt = {"loss_mask": jax.numpy.float32}
      batch_abs = {k: jax.ShapeDtypeStruct((batch, seq_len), dt.get(k, jax.numpy.int32),
                                           sharding=batch_sh[k]) for k in batch_sh}
      step.lower(state, batch_abs)
      depth = lspec.cfg.n_layers
      notes.append(f"train step lowered on a fake CPU mesh of this shape"
                   + ("" if depth == cfg.n_layers else f" ({depth} of {cfg.n_layers} layers)"))
  return Report(title, acc, tuple(mesh_shape), sizes["n_params"], sizes["n_trainable"],
                per_device, notes=notes)


def check_inference(config, cfg, acc: Accelerator, mesh_shape, *, batch: int, length: int,
                    title: str = "") -> Report:
  """Footprint of sampling from `cfg` (weights + KV cache + one prefill's activations)."""
  _, abstract_mesh, rules = _shardings(config, mesh_shape)
  cfg = cfg.replace(lora=None)
  sizes = sizes_by_depth(cfg, None, abstract_mesh, rules)
  per_device = {"params": sizes["trainable"], "grads": 0, "optimizer": 0,
                "activations": activation_bytes(cfg, batch, length, mesh_shape, training=False),
                "kv_cache": kv_cache_bytes(cfg, batch, length, mesh_shape)}
  return Report(title, acc, tuple(mesh_shape), sizes["n_params"], 0, per_device)


def resolve_path(config, path: str):
  """ModelConfig behind a model path ("random:SEED", HF folder, jaxlab workdir), else None."""
  from jaxlab.evals.models import is_hf_folder
  from jaxlab.models import hf_config
  if path.startswith("random:"):
    return _config_model(config)
  if path and is_hf_folder(path):  # evaluated and judge models load scanned (load_hf)
    from jaxlab.models.config import HF_SCANNED
    return hf_config.config_from_hf(path).replace(scan_layers=HF_SCANNED)
  if path and os.path.isfile(os.path.join(path, "config.json")):  # a jaxlab workdir
    import json
    import ml_collections
    with open(os.path.join(path, "config.json")) as f:
      return resolve_model(ml_collections.ConfigDict(json.load(f)))
  return None


def _eval_models(config, fallback: str | None):
  """(name, ModelConfig or None, why) for each model an eval config samples or judges with."""
  from jaxlab.models import presets
  named = [m.partition("=")[::2] for m in config.get("models", ())]
  named = [(name, path.split(";")[0]) for name, path in named]  # "name=path;field=value"
  if config.get("model_path"):
    named.append((config.get("model_name", "model"), config.model_path))
  judge = config.get("judge")
  if judge and judge.get("kind") == "local":
    named.append(("judge", judge.get("model_path", "")))
  out = []
  for name, path in named:
    cfg = resolve_path(config, path)
    if cfg is not None:
      out.append((name, cfg, ""))
    elif fallback:
      out.append((name, presets.get_preset(fallback), f"{path or '(unset)'} -> --model={fallback}"))
    else:
      out.append((name, None, f"{path or '(unset)'} cannot be resolved without weights; "
                              "pass --model=PRESET"))
  if not named and fallback:
    out.append(("model", presets.get_preset(fallback), f"no model named -> --model={fallback}"))
  return out


def _teacher(config, student, report: Report, mesh_shape) -> None:
  """Adds a frozen teacher's weights (config.teacher.path) to a training report."""
  path = config.teacher.get("path", "")
  cfg = student if path == "base" else resolve_path(config, path)
  if cfg is None:
    report.notes.append(f"teacher {path!r} cannot be resolved without weights: not counted")
    return
  if config.teacher.get("dtype"):
    cfg = cfg.replace(dtype=config.teacher.dtype, param_dtype=config.teacher.dtype)
  _, abstract_mesh, rules = _shardings(config, mesh_shape)
  report.per_device["teacher"] = sizes_by_depth(cfg.replace(lora=None), None, abstract_mesh,
                                                rules)["trainable"]


def check(config, accelerator: str, mesh: str | None = None, *, model: str | None = None,
          lower: bool = True, lower_layers: int | None = None, title: str = "") -> list[Report]:
  """Reports for every model the config trains or samples (exit-worthy if any does not fit)."""
  mesh_cfg = mesh.split(",") if mesh else config.get("mesh", {}).get("shape", (1, -1, 1))
  known = math.prod(int(s) for s in mesh_cfg if int(s) != -1)
  acc = parse_accelerator(accelerator, default_chips=None if -1 in map(int, mesh_cfg) else known)
  mesh_shape = resolve_mesh(mesh_cfg, acc.chips)
  if config.get("job") == "eval":
    s = config.sample
    length = max(s.buckets) + s.max_new_tokens
    reports = []
    for name, cfg, why in _eval_models(config, model):
      batch = config.judge.batch_size if name == "judge" else s.batch_size
      if cfg is None:
        raise ValueError(f"{title}: model {name}: {why}")
      if config.get("dtype"):
        cfg = cfg.replace(dtype=config.dtype, param_dtype=config.dtype)
      r = check_inference(config, cfg, acc, mesh_shape, batch=batch, length=length,
                          title=f"{title} [{name}: sampling batch {batch} x {length}]")
      r.notes += [why] if why else []
      reports.append(r)
    return reports
  cfg = resolve_model(config)
  if model:
    from jaxlab.models import presets
    cfg = presets.get_preset(model).replace(
        dtype=cfg.dtype, param_dtype=cfg.param_dtype, remat=cfg.remat,
        remat_policy=cfg.remat_policy, scan_layers=cfg.scan_layers, lora=cfg.lora)
  report = check_train(config, cfg, acc, mesh_shape, lower=lower, lower_layers=lower_layers,
                       title=title)
  if config.get("teacher") is not None:
    _teacher(config, cfg, report, mesh_shape)
  return [report]


def _parse(argv):
  opts = {"accelerator": "cpu", "mesh": None, "model": None, "lower": True, "lower_layers": None}
  rest = []
  for a in argv:
    key, _, value = a.partition("=")
    if key in ("--accelerator", "--mesh", "--model"):
      opts[key[2:]] = value
    elif key == "--lower-layers":
      opts["lower_layers"] = int(value)
    elif a == "--no-lower":
      opts["lower"] = False
    else:
      rest.append(a)
  return opts, rest


def _devices_needed(opts) -> int:
  """Chips the check will put on its fake CPU mesh (read before JAX starts)."""
  try:
    return parse_accelerator(opts["accelerator"], default_chips=math.prod(
        int(s) for s in opts["mesh"].split(",")) if opts["mesh"] else None).chips
  except ValueError:
    return 1


def main(argv: list[str]) -> int:
  opts, rest = _parse(argv)
  if "jax" not in sys.modules:  # the fake CPU mesh: as many host devices as the slice has chips
    n = max(_devices_needed(opts), 1)
    os.environ["JAX_PLATFORMS"] = "cpu"
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                               f" --xla_force_host_platform_device_count={n}").strip()
  from jaxlab.config import ConfigError, parse_argv
  try:
    config, _ = parse_argv(rest + ["--workdir=-"])
    spec = next(a.split("=", 1)[1] for a in rest if a.startswith("--config="))
    reports = check(config, opts["accelerator"], opts["mesh"], model=opts["model"],
                    lower=opts["lower"], lower_layers=opts["lower_layers"], title=spec)
  except (ConfigError, ValueError) as e:
    print(f"jaxlab.shapecheck: {e}", file=sys.stderr)
    return 2
  for r in reports:
    print(r.text())
  return 0 if all(r.fits for r in reports) else 1


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
