"""Orbax checkpoints of the train state, the data position and the config, verified on restore.

The state is saved as a flat {"params.layers.0.mlp...": array} dict: param
dicts have integer layer keys and optax states are namedtuples, and a flat
dict of key paths restores onto any mesh by giving Orbax a target with the
new shardings. Orbax writes each step into a temporary folder and renames it
when complete, so a run killed mid-save leaves the previous checkpoint intact.

Integrity: every save also writes a fingerprint of each array (two wrap-around uint32 sums of
its raw bits, one position-weighted; exact and independent of the mesh, since integer addition
is associative), computed on the devices. `restore` recomputes it: a checkpoint with damaged,
truncated or missing files is reported with its path and the previous one is restored instead.
Nothing is renamed then; when training reaches the damaged step again, `save` moves it aside
as `STEP.damaged` and writes it anew. `save` refuses a state holding NaN or Inf (so a diverged
run never writes a checkpoint and rotation never deletes the last good one): the runner stops
on a non-finite loss or gradient norm first; this is the guard behind it.
"""
from __future__ import annotations

import functools
import json
import logging
import sys
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from jax.sharding import NamedSharding, PartitionSpec as P

from jaxlab import paths

_ITEMS = ("state", "data", "config", "fingerprint")


def _read_only_options(**kw) -> ocp.CheckpointManagerOptions:
  """Options of a manager that only reads, set as Orbax wants them for reading (it otherwise
  resets save_interval_steps, max_to_keep and create with a warning each, per manager)."""
  return ocp.CheckpointManagerOptions(read_only=True, save_interval_steps=0, max_to_keep=None,
                                      create=False, cleanup_tmp_directories=False, **kw)


class _QuietReadOnly(logging.Filter):
  """Drops Orbax's "Given directory is read only=DIR" warning, which it logs unconditionally
  for every read-only manager (a pipeline opens one per model it reads: hundreds of lines that
  say nothing a user can act on). Every other Orbax/absl message still shows."""

  def filter(self, record: logging.LogRecord) -> bool:
    return not str(record.msg).startswith("Given directory is read only=")


logging.getLogger("absl").addFilter(_QuietReadOnly())
_WEIGHT = np.uint32(2654435761)  # Knuth's multiplicative hash constant


class CheckpointError(RuntimeError):
  """A checkpoint cannot be restored (the message names its folder)."""


class NonFiniteStateError(ValueError):
  """A state with NaN/Inf values was about to be saved."""


def flatten(tree) -> tuple[dict[str, Any], Any]:
  leaves, treedef = jax.tree_util.tree_flatten_with_path(tree)
  flat = {jax.tree_util.keystr(path, simple=True, separator="."): leaf for path, leaf in leaves}
  if len(flat) != len(leaves):
    raise ValueError("key paths of the state are not unique")
  return flat, treedef


def _unflatten(flat: dict[str, Any], like) -> Any:
  keys, treedef = flatten(like)
  return jax.tree.unflatten(treedef, [flat[k] for k in keys])


def _array_fingerprint(x: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
  """(sum of words, position-weighted sum of words, all finite) of x's raw bits, uint32 wrap."""
  if x.dtype == jnp.bool_:
    words = x.astype(jnp.uint32)
  else:
    words = jax.lax.bitcast_convert_type(
        x, {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32}[x.dtype.itemsize]).astype(jnp.uint32)
  # Flat index from per-dimension iotas (a reshape of a sharded array could gather it).
  index = jnp.zeros(x.shape, jnp.uint32)
  for d in range(x.ndim):
    stride = int(np.prod(x.shape[d + 1:], dtype=np.int64)) % (1 << 32)
    index = index + jax.lax.broadcasted_iota(jnp.uint32, x.shape, d) * np.uint32(stride)
  weights = index * _WEIGHT + np.uint32(1)
  finite = jnp.all(jnp.isfinite(x)) if jnp.issubdtype(x.dtype, jnp.floating) else jnp.array(True)
  return jnp.sum(words, dtype=jnp.uint32), jnp.sum(words * weights, dtype=jnp.uint32), finite


@functools.cache
def _fingerprint_fn(out_sharding):
  return jax.jit(_array_fingerprint, out_shardings=out_sharding)


def fingerprint(flat: dict[str, jax.Array]) -> tuple[dict[str, list[int]], list[str]]:
  """({key: [sum, weighted sum]}, keys holding NaN/Inf) of a flat dict of arrays.

  One jitted call per array: in a single program over every array XLA:CPU materialises all
  arrays' words at once (measured: +2.3x the state's size in peak host memory). A call on a
  multi-device array is finished before the next starts (concurrent programs with collectives
  can deadlock in XLA:CPU's all-reduce rendezvous); single-device ones overlap.
  """
  out = {}
  for k, x in flat.items():
    if not isinstance(x, jax.Array):
      continue
    mesh = x.sharding.mesh if isinstance(x.sharding, NamedSharding) else None
    out[k] = _fingerprint_fn(NamedSharding(mesh, P()) if mesh is not None else None)(x)
    if len(x.sharding.device_set) > 1:
      jax.block_until_ready(out[k])
  out = jax.device_get(out)
  sums = {k: [int(a), int(b)] for k, (a, b, _) in out.items()}
  return sums, sorted(k for k, (_, _, ok) in out.items() if not ok)


def _first_line(e: BaseException) -> str:
  text = (str(e).strip().splitlines() or [type(e).__name__])[0]
  return f"{type(e).__name__}: {text[:300]}"


class Checkpointer:
  """Saves every `every` steps, keeps the latest `keep`, restores the latest good one.

  `read_only` checkpointers (evaluation, export) never create or change anything.
  """

  def __init__(self, directory, *, every: int, keep: int, async_save: bool = True,
               read_only: bool = False):
    self.every = every
    self._damaged: set[int] = set()  # steps whose restore failed in this process
    self._read_manager = None
    self.restored_step: int | None = None  # the step the last restore read
    self.directory = paths.path(directory)
    self.read_only = read_only
    options = _read_only_options(enable_async_checkpointing=async_save) if read_only else \
        ocp.CheckpointManagerOptions(max_to_keep=keep, save_interval_steps=1,
                                     enable_async_checkpointing=async_save, create=True)
    self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=_ITEMS)

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def should_save(self, step: int) -> bool:
    return self.every > 0 and step % self.every == 0

  def save(self, step: int, state, data_state: dict, config_json: str, *, force: bool = False) -> bool:
    """Saves if `step` is a multiple of `every` (or force); returns whether it saved.

    Raises NonFiniteStateError (writing nothing) if any array of `state` holds NaN or Inf.
    """
    if not force and not self.should_save(step):
      return False
    if step in self._damaged:  # training on from an earlier step has reached this one again
      self._set_aside(step)
      self._damaged.discard(step)
    flat, _ = flatten(state)
    sums, bad = fingerprint(flat)
    if bad:
      raise NonFiniteStateError(
          f"refusing to save step {step} to {self.directory}: non-finite values in "
          f"{bad[:5]}{' and %d more' % (len(bad) - 5) if len(bad) > 5 else ''}; the last good "
          f"checkpoint is step {self.latest_step()}")
    return self.manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(flat),
        data=ocp.args.JsonSave(data_state),
        config=ocp.args.JsonSave(json.loads(config_json)),
        fingerprint=ocp.args.JsonSave({"version": 1, "arrays": sums})), force=True)

  def saved_config(self) -> dict | None:
    """The config saved with the latest checkpoint whose config is readable (None: none is)."""
    for s in sorted(self.manager.all_steps(), reverse=True):
      try:
        return self.manager.restore(s, args=ocp.args.Composite(
            config=ocp.args.JsonRestore()))["config"]
      except Exception:  # pylint: disable=broad-except  (restore() reports the damage)
        continue
    return None

  def restore(self, abstract_state, step: int | None = None):
    """(state, data_state, config dict) at `step` (default: the latest good one), placed like
    `abstract_state`. A damaged latest checkpoint is reported and the previous one restored."""
    flat_target, _ = flatten(abstract_state)
    flat, data, config = self.restore_flat(lambda _: flat_target, step)
    return _unflatten(flat, abstract_state), data, config

  def restore_partial(self, target, step: int | None = None):
    """(tree, data_state, config) with only `target`'s arrays read (a sub-tree of the state,
    e.g. {"step", "params"}: no optimizer state), verified like `restore`."""
    flat_target, _ = flatten(target)
    flat, data, config = self.restore_flat(lambda _: flat_target, step, partial=True)
    return _unflatten(flat, target), data, config

  def restore_flat(self, target_fn: Callable[[dict], dict], step: int | None = None,
                   partial: bool = False) -> tuple[dict, dict, dict]:
    """(flat arrays, data_state, config) of the latest good step (or exactly `step`).

    `target_fn(config dict)` gives the flat restore target; with `partial` it may name a
    subset of the saved arrays (only those are read).
    """
    steps = [step] if step is not None else sorted(self.manager.all_steps(), reverse=True)
    if not steps:
      raise CheckpointError(f"no checkpoint in {self.directory}")
    failures = []
    for s in steps:
      where = self.directory / str(s)
      try:
        config = self.manager.restore(s, args=ocp.args.Composite(
            config=ocp.args.JsonRestore()))["config"]
        target = None
      except Exception as e:  # pylint: disable=broad-except  (unreadable: fall back)
        error = e
      else:
        target = target_fn(config)  # outside the try: a bug here is no damaged checkpoint
        try:
          out = self._restore_step(s, config, target, partial)
          self.restored_step = s
          return out
        except Exception as e:  # pylint: disable=broad-except  (damaged: fall back)
          error = e
      if step is not None:
        raise CheckpointError(f"checkpoint {where} cannot be restored: {_first_line(error)}") \
            from error
      failures.append(f"{where}: {_first_line(error)}")
      print(f"jaxlab: checkpoint {where} is damaged ({_first_line(error)}); "
            "falling back to the previous one", file=sys.stderr)
      logging.warning("checkpoint %s is damaged: %s", where, error)
      self._damaged.add(s)
    raise CheckpointError(f"no restorable checkpoint in {self.directory}:\n  " +
                          "\n  ".join(failures))

  def _restore_step(self, step: int, config: dict, target: dict, partial: bool):
    has_fp = (self.directory / str(step) / "fingerprint").exists()
    if partial:
      state_args = ocp.args.PyTreeRestore(
          item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
          partial_restore=True)
    else:
      state_args = ocp.args.StandardRestore(target)
    items = dict(state=state_args, data=ocp.args.JsonRestore())
    if has_fp:
      items["fingerprint"] = ocp.args.JsonRestore()
    # Orbax binds one handler per item and manager: a partial (PyTree) restore of what this
    # manager saved (Standard) goes through a separate read-only manager.
    manager = self._reader() if partial else self.manager
    out = manager.restore(step, args=ocp.args.Composite(**items))
    flat = dict(out["state"])
    sums, bad = fingerprint(flat)
    if bad:
      raise CheckpointError(f"non-finite values in {bad[:5]}")
    if has_fp:
      saved = out["fingerprint"]["arrays"]
      wrong = sorted(k for k in flat if saved.get(k) != sums[k])
      if wrong:
        raise CheckpointError(f"{len(wrong)} array(s) do not match the fingerprint written at "
                              f"save, e.g. {wrong[:3]}")
    else:
      print(f"jaxlab: checkpoint {self.directory / str(step)} has no fingerprint "
            "(written by an older jaxlab); restored unverified", file=sys.stderr)
    return flat, out["data"], config

  def _reader(self) -> ocp.CheckpointManager:
    if self._read_manager is None:
      self._read_manager = ocp.CheckpointManager(
          self.directory, options=_read_only_options(),
          item_names=_ITEMS)
    self._read_manager.reload()
    return self._read_manager

  def _set_aside(self, step: int) -> None:
    """Renames a damaged STEP folder to STEP.damaged (process 0), so that step can be saved
    again and a rerun never retries it; other processes wait for the rename."""
    if paths.is_writer():
      src = self.directory / str(step)
      dst = self.directory / f"{step}.damaged"
      if dst.exists():
        dst.rmtree()
      src.rename(dst)
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
      multihost_utils.sync_global_devices(f"jaxlab_set_aside_{step}")
    self.manager.reload()

  def wait(self):
    self.manager.wait_until_finished()

  def close(self):
    self.manager.close()
    if self._read_manager is not None:
      self._read_manager.close()


def base_from_hf(config) -> bool:
  """Whether a run's frozen base is reloaded from `init.hf_path` (or `init.workdir`) instead of
  being checkpointed (LoRA on a loaded base: the base never changes, so it is not saved)."""
  lora = config["model"].get("lora") or {}
  init = config.get("init") or {}
  return bool(init.get("hf_path") or init.get("workdir")) and bool(
      lora and lora.get("enabled", True))


def checkpoints_dir(path):
  """The checkpoints folder of a workdir (or `path` itself if it is one)."""
  p = paths.path(path)
  return p / "checkpoints" if (p / "checkpoints").is_dir() else p


def load_params(path, mesh=None, step: int | None = None, *, hf_path: str | None = None):
  """(ModelConfig, trainable, frozen) from a jaxlab workdir or its checkpoints folder.

  Reads the parameters only (no optimizer state), of the latest good checkpoint (or `step`),
  placed on `mesh` (default: all devices on fsdp) with the run's sharding rules. For a LoRA run
  on an HF base the adapters come from the checkpoint and the frozen base from the run's
  `init.hf_path`, or from `hf_path` when the base has moved.
  """
  import ml_collections  # pylint: disable=g-import-not-at-top
  from jaxlab import sharding as sharding_lib  # pylint: disable=g-import-not-at-top
  from jaxlab.models.config import ModelConfig  # pylint: disable=g-import-not-at-top
  from jaxlab.models.params import model_spec  # pylint: disable=g-import-not-at-top

  ck = Checkpointer(checkpoints_dir(path), every=0, keep=1, async_save=False, read_only=True)
  mesh = mesh or sharding_lib.make_mesh((1, -1, 1))
  found = {}

  def target(config: dict) -> dict:
    config = ml_collections.ConfigDict(config)
    cfg = ModelConfig.from_dict(config.model.to_dict())  # vocab_size is resolved before saving
    spec = model_spec(cfg)
    rules = dict(sharding_lib.DEFAULT_RULES)
    rules.update({k: tuple(v) if isinstance(v, list) else v
                  for k, v in config.mesh.get("rules", {}).items()})
    sh = spec.shardings(mesh, rules)
    sds = lambda tree, s: jax.tree.map(
        lambda a, t: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=t), tree, s)
    tree = {"params": sds(spec.abstract[0], sh[0])}
    from_hf = base_from_hf(config)
    if not from_hf:
      tree["frozen"] = sds(spec.abstract[1], sh[1])
    found.update(config=config, cfg=cfg, tree=tree, rules=rules, from_hf=from_hf)
    return flatten(tree)[0]

  try:
    flat, _, _ = ck.restore_flat(target, step, partial=True)
  finally:
    ck.close()
  state = _unflatten(flat, found["tree"])
  cfg, config = found["cfg"], found["config"]
  if not found["from_hf"]:
    return cfg, state["params"], state.get("frozen", {})
  from jaxlab.models.hf import load_hf  # pylint: disable=g-import-not-at-top
  field = "hf_path" if config.init.get("hf_path") else "workdir"
  key, base = f"init.{field}", hf_path or config.init[field]
  if not paths.path(base).is_dir():
    raise FileNotFoundError(
        f"{path} is a LoRA run whose base model (config key {key}={base!r}) is not a "
        "folder here; pass hf_path= to the base model's folder")
  if key == "init.workdir" and not hf_path:  # a jaxlab workdir: its (merged) params
    from jaxlab.models.params import merge_lora  # pylint: disable=g-import-not-at-top
    base_cfg, tr, fr = load_params(base, mesh)
    return cfg, state["params"], merge_lora(tr, fr, base_cfg)
  base_cfg, _, frozen = load_hf(base, mesh, dtype=cfg.dtype, param_dtype=cfg.param_dtype,
                                rules=found["rules"], lora=cfg.lora,
                                trainable_dtype=cfg.trainable_dtype, scan_layers=cfg.scan_layers)
  if base_cfg.replace(remat=cfg.remat, remat_policy=cfg.remat_policy) != cfg:
    raise ValueError(f"base model {base} does not match the run's saved model config: "
                     f"{base_cfg} != {cfg}")
  return cfg, state["params"], frozen
