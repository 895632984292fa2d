"""Runs in a subprocess with 8 fake CPU devices (see channels_sharded_test.py): one step of each
channel on several meshes; prints JSON with losses and the largest param difference to 1 device."""
import os
import sys

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import json  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402

from jaxlab import sharding  # noqa: E402
from jaxlab.models import ModelConfig  # noqa: E402
from jaxlab.models.params import init_params, model_spec  # noqa: E402
from jaxlab.train import channels, optim, step as step_lib  # noqa: E402
from jaxlab.train import state as state_lib  # noqa: E402
from jaxlab.train.channels import common  # noqa: E402
from tests.train_util import optim_config  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")
STUDENT = ModelConfig(vocab_size=128, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=128)
TEACHER = ModelConfig(vocab_size=128, d_model=64, n_layers=1, n_heads=4, n_kv_heads=4, d_ff=128)
MESHES = [(1, 1, 1), (2, 2, 2)]  # 8 devices: data x fsdp x tensor all sharded
CHANNELS = [("offpolicy", {}), ("onpolicy", {"kl": "reverse", "estimator": "sampled"}),
            ("gkd", {"kl": "jsd", "lmbda": 0.5}), ("sft", {})]


def batch(seed, rows=8, p=10, q=14, c=8):
  rng = np.random.default_rng(seed)
  plen = rng.integers(3, p + 1, rows)
  qlen = rng.integers(3, q + 1, rows)
  prompt = np.where(np.arange(p)[None] >= p - plen[:, None], rng.integers(1, 128, (rows, p)), 0)
  tprompt = np.where(np.arange(q)[None] >= q - qlen[:, None], rng.integers(1, 128, (rows, q)), 0)
  clen = rng.integers(2, c + 1, rows)
  mask = (np.arange(c)[None] < clen[:, None]).astype(np.float32)
  comp = np.where(mask > 0, rng.integers(1, 128, (rows, c)), 0)
  return {"prompt": prompt.astype(np.int32), "prompt_len": plen.astype(np.int32),
          "teacher_prompt": tprompt.astype(np.int32), "teacher_prompt_len": qlen.astype(np.int32),
          "completion": comp.astype(np.int32), "loss_mask": mask}


def run(mesh_shape, name, kw):
  mesh = sharding.make_mesh(mesh_shape, jax.devices()[:int(np.prod(mesh_shape))])
  rules = sharding.DEFAULT_RULES
  sspec, tspec = model_spec(STUDENT), model_spec(TEACHER)
  tparams = init_params(tspec, mesh, 1, rules)
  opt, sched = optim.make_optimizer(optim_config(lr=1e-2), 10)
  state = state_lib.create_state(sspec, opt, mesh, rules, seed=0)
  ctx = common.Context(spec=sspec, teacher_spec=tspec, stop_ids=(3,), pad_id=0, mesh=mesh,
                       rules=rules, loss_chunk=3, **kw)
  b = batch(0)
  batch_sh = {k: sharding.batch_sharding(mesh, v.ndim, rules=rules) for k, v in b.items()}
  step = step_lib.jit_step(step_lib.make_step(channels.get(name), ctx, opt, sched, grad_accum=2),
                           state_lib.state_shardings(sspec, opt, mesh, rules), batch_sh, mesh,
                           tspec.shardings(mesh, rules))
  losses = []
  for i in range(2):
    state, m = step(state, sharding.host_local_to_global(batch(i), mesh, rules=rules), tparams)
    losses.append(float(m["loss"]))
  return losses, jax.device_get(state.params)


def main():
  assert jax.device_count() == 8
  out = {}
  for name, kw in CHANNELS:
    key = name + ("/" + kw["estimator"] if "estimator" in kw else "")
    ref_losses, ref_params = run(MESHES[0], name, kw)
    out[key] = {"losses": {str(MESHES[0]): ref_losses}, "max_param_diff": {}}
    for mesh in MESHES[1:]:
      losses, params = run(mesh, name, kw)
      out[key]["losses"][str(mesh)] = losses
      out[key]["max_param_diff"][str(mesh)] = max(
          float(np.abs(np.asarray(a) - np.asarray(b)).max())
          for a, b in zip(jax.tree.leaves(ref_params), jax.tree.leaves(params)))
  print("RESULT " + json.dumps(out))


if __name__ == "__main__":
  main()
