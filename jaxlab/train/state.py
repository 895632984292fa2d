"""The train state pytree and its shardings."""
from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from jaxlab.models.params import ModelSpec, init_params


@flax.struct.dataclass
class TrainState:
  """Everything a step reads and writes. `frozen` (LoRA base weights) gets no gradient."""
  step: jax.Array
  params: Any      # trainable params, pure nested dict
  frozen: Any      # frozen params (empty without LoRA)
  opt_state: Any
  rng: jax.Array


def state_shardings(spec: ModelSpec, optimizer: optax.GradientTransformation, mesh, rules):
  """TrainState of NamedShardings: optimizer moments shard like their params."""
  param_sh, frozen_sh = spec.shardings(mesh, rules)
  replicated = NamedSharding(mesh, P())
  opt_abstract = jax.eval_shape(optimizer.init, spec.abstract[0])
  opt_sh = optax.tree_map_params(optimizer, lambda _, s: s, opt_abstract, param_sh,
                                 transform_non_params=lambda _: replicated)
  return TrainState(step=replicated, params=param_sh, frozen=frozen_sh, opt_state=opt_sh,
                    rng=replicated)


def abstract_state(spec: ModelSpec, optimizer, shardings: TrainState) -> TrainState:
  """ShapeDtypeStructs (with shardings) of the train state: a restore target."""
  opt_abstract = jax.eval_shape(optimizer.init, spec.abstract[0])
  rng = jax.eval_shape(lambda: jax.random.key_data(jax.random.key(0)))
  tree = TrainState(step=jax.ShapeDtypeStruct((), jnp.int32), params=spec.abstract[0],
                    frozen=spec.abstract[1], opt_state=opt_abstract, rng=rng)
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                      tree, shardings)


def create_state(spec: ModelSpec, optimizer, mesh, rules, seed: int,
                 params: tuple[Any, Any] | None = None) -> TrainState:
  """Fresh state placed in its shardings; random params unless (trainable, frozen) given."""
  shardings = state_shardings(spec, optimizer, mesh, rules)
  if params is None:
    params = init_params(spec, mesh, seed, rules)
  trainable, frozen = params

  def init(trainable, frozen):
    return TrainState(step=jnp.zeros((), jnp.int32), params=trainable, frozen=frozen,
                      opt_state=optimizer.init(trainable),
                      rng=jax.random.key_data(jax.random.key(seed)))
  return jax.jit(init, out_shardings=shardings, donate_argnums=(0, 1))(trainable, frozen)
