"""Orbax checkpoints of the train state, the data position and the config.

The state is saved as a flat {"params.layers.0.mlp...": array} dict: param
dicts have integer layer keys and optax states are namedtuples, and a flat
dict of key paths restores onto any mesh by giving Orbax a target with the
new shardings. Orbax writes each step into a temporary folder and renames it
when complete, so a run killed mid-save leaves the previous checkpoint intact.
"""
from __future__ import annotations

import json
import os
from typing import Any

import jax
import orbax.checkpoint as ocp


def _flatten(tree) -> tuple[dict[str, Any], Any]:
  leaves, treedef = jax.tree_util.tree_flatten_with_path(tree)
  flat = {jax.tree_util.keystr(path, simple=True, separator="."): leaf for path, leaf in leaves}
  if len(flat) != len(leaves):
    raise ValueError("key paths of the state are not unique")
  return flat, treedef


def _unflatten(flat: dict[str, Any], like) -> Any:
  keys, treedef = _flatten(like)
  return jax.tree.unflatten(treedef, [flat[k] for k in keys])


class Checkpointer:
  """Saves every `every` steps, keeps the latest `keep`, restores the latest."""

  def __init__(self, directory: str, *, every: int, keep: int, async_save: bool = True):
    self.every = every
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, save_interval_steps=1, enable_async_checkpointing=async_save,
        create=True)
    self.manager = ocp.CheckpointManager(os.path.abspath(directory), options=options,
                                         item_names=("state", "data", "config"))

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def should_save(self, step: int) -> bool:
    return self.every > 0 and step % self.every == 0

  def save(self, step: int, state, data_state: dict, config_json: str, *, force: bool = False) -> bool:
    """Saves if `step` is a multiple of `every` (or force); returns whether it saved."""
    if not force and not self.should_save(step):
      return False
    flat, _ = _flatten(state)
    return self.manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(flat),
        data=ocp.args.JsonSave(data_state),
        config=ocp.args.JsonSave(json.loads(config_json))), force=True)

  def restore(self, abstract_state, step: int | None = None):
    """(state, data_state, config dict) at `step` (default latest), placed like `abstract_state`."""
    step = self.latest_step() if step is None else step
    flat_target, _ = _flatten(abstract_state)
    out = self.manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(flat_target),
        data=ocp.args.JsonRestore(), config=ocp.args.JsonRestore()))
    return _unflatten(out["state"], abstract_state), out["data"], out["config"]

  def wait(self):
    self.manager.wait_until_finished()

  def close(self):
    self.manager.close()


def load_params(path: str, mesh=None, step: int | None = None):
  """(ModelConfig, trainable, frozen) from a jaxlab workdir or its checkpoints folder.

  The train state's structure is rebuilt from the config saved with the
  checkpoint; arrays are placed on `mesh` (default: all devices, data-parallel
  rules) in their parameter shardings.
  """
  import ml_collections
  from jaxlab import sharding as sharding_lib
  from jaxlab.models.config import ModelConfig
  from jaxlab.models.params import model_spec
  from jaxlab.train import optim, state as state_lib

  directory = os.path.join(path, "checkpoints") if os.path.isdir(os.path.join(path, "checkpoints")) else path
  ck = Checkpointer(directory, every=0, keep=1, async_save=False)
  step = ck.latest_step() if step is None else step
  if step is None:
    raise FileNotFoundError(f"no checkpoint found under {directory}")
  config = ml_collections.ConfigDict(
      ck.manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))["config"])
  cfg = ModelConfig.from_dict(config.model.to_dict())  # vocab_size is resolved before saving
  spec = model_spec(cfg)
  mesh = mesh or sharding_lib.make_mesh((1, -1, 1))
  rules = dict(sharding_lib.DEFAULT_RULES)
  rules.update({k: tuple(v) if isinstance(v, list) else v for k, v in config.mesh.get("rules", {}).items()})
  optimizer, _ = optim.make_optimizer(config.optim, config.train.steps)
  sh = state_lib.state_shardings(spec, optimizer, mesh, rules)
  state, _, _ = ck.restore(state_lib.abstract_state(spec, optimizer, sh), step)
  ck.close()
  return cfg, state.params, state.frozen
