"""Runs in a subprocess with 8 fake CPU devices (see sharded_test.py); prints JSON results."""
import os
import sys

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import json  # noqa: E402
import tempfile  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

from jaxlab import sharding  # noqa: E402
from jaxlab.checkpoint import Checkpointer  # noqa: E402
from jaxlab.models import ModelConfig  # noqa: E402
from jaxlab.train import state as state_lib  # noqa: E402
from tests import train_util as tu  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")
CFG = ModelConfig(vocab_size=128, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=128,
                  qkv_bias=True)
MESHES = [(1, 1, 1), (8, 1, 1), (2, 2, 2), (1, 4, 2)]


def run(mesh_shape):
  spec, mesh, step, state = tu.setup(CFG, mesh_shape, devices=jax.devices()[:int(np.prod(mesh_shape))])
  losses = []
  for i in range(3):
    batch = sharding.host_local_to_global(tu.random_batch(i, rows=8, length=16, vocab=128), mesh)
    state, m = step(state, batch)
    losses.append(float(m["loss"]))
  return spec, mesh, state, losses


def main():
  assert jax.device_count() == 8, jax.devices()
  out = {"losses": {}, "max_param_diff": {}, "specs": {}}
  ref_params = None
  states = {}
  for shape in MESHES:
    spec, mesh, state, losses = run(shape)
    states[shape] = (spec, mesh, state)
    out["losses"][str(shape)] = losses
    params = jax.tree.map(np.asarray, state.params)
    if ref_params is None:
      ref_params = params
    out["max_param_diff"][str(shape)] = max(
        float(np.abs(a - b).max()) for a, b in zip(jax.tree.leaves(ref_params), jax.tree.leaves(params)))
    q = state.params["layers"][0]["self_attn"]["q_proj"]["kernel"]
    mu = state.opt_state[1][0].mu["layers"][0]["self_attn"]["q_proj"]["kernel"]
    out["specs"][str(shape)] = {"q_kernel": str(q.sharding.spec), "adam_mu_q_kernel": str(mu.sharding.spec),
                                "embed": str(state.params["embed_tokens"].sharding.spec)}
  # Save on (2,2,2), restore onto (1,4,2) and onto 1 device.
  spec, mesh, state = states[(2, 2, 2)]
  with tempfile.TemporaryDirectory() as d:
    ck = Checkpointer(d, every=1, keep=1)
    ck.save(3, state, {"epoch": 0}, "{}")
    ck.wait()
    out["restore"] = {}
    for target in [(1, 4, 2), (1, 1, 1)]:
      tspec, tmesh, _ = states[target]
      opt, _ = tu.optim.make_optimizer(tu.optim_config(), 10)
      sh = state_lib.state_shardings(tspec, opt, tmesh, sharding.DEFAULT_RULES)
      restored, data, _ = ck.restore(state_lib.abstract_state(tspec, opt, sh))
      same = all(np.array_equal(np.asarray(a), np.asarray(b))
                 for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(restored)))
      placed = all(a.sharding == b for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(sh)))
      out["restore"][str(target)] = {"equal": same, "sharded_as_target": placed,
                                     "q_spec": str(restored.params["layers"][0]["self_attn"]["q_proj"]["kernel"].sharding.spec)}
  print("RESULT " + json.dumps(out))


if __name__ == "__main__":
  main()
