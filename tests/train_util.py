"""Shared helpers for train tests: tiny configs, random batches, one-device meshes."""
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from jaxlab import sharding
from jaxlab.models import LoraConfig, ModelConfig
from jaxlab.models.params import model_spec
from jaxlab.train import optim, sft_step
from jaxlab.train import step as step_lib
from jaxlab.train import state as state_lib

TINY = ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64)


def optim_config(**kw):
  d = dict(lr=1e-2, warmup_steps=2, decay="cosine", end_ratio=0.0, weight_decay=0.01,
           clip_norm=1.0, b1=0.9, b2=0.95, eps=1e-8)
  d.update(kw)
  return ml_collections.ConfigDict(d)


def random_batch(seed, rows=8, length=16, vocab=64):
  """A packed-looking batch with padding and a partial loss mask."""
  rng = np.random.default_rng(seed)
  tokens = rng.integers(0, vocab, (rows, length + 1)).astype(np.int32)
  seg = np.ones((rows, length), np.int32)
  pos = np.tile(np.arange(length, dtype=np.int32), (rows, 1))
  for r in range(rows):
    cut = rng.integers(length // 2, length + 1)
    seg[r, cut:] = 0
    split = rng.integers(1, max(cut, 2))
    seg[r, split:cut] = 2
    pos[r, split:cut] = np.arange(cut - split)
  mask = (rng.random((rows, length)) < 0.6) & (seg > 0)
  return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "positions": pos,
          "segment_ids": seg, "loss_mask": mask.astype(np.float32)}


def setup(cfg=TINY, mesh_shape=(1, 1, 1), devices=None, steps=10, grad_accum=1, **okw):
  """(spec, mesh, jitted step, initial state) for a tiny model."""
  devices = devices if devices is not None else jax.devices()[:int(np.prod(mesh_shape))]
  mesh = sharding.make_mesh(mesh_shape, devices)
  spec = model_spec(cfg)
  opt, sched = optim.make_optimizer(optim_config(**okw), steps)
  state_sh = state_lib.state_shardings(spec, opt, mesh, sharding.DEFAULT_RULES)
  batch_sh = {k: sharding.batch_sharding(mesh, 2) for k in random_batch(0)}
  step = step_lib.jit_step(sft_step.make_sft_step(spec, opt, sched, grad_accum), state_sh, batch_sh,
                           mesh, with_teacher=False)
  state = state_lib.create_state(spec, opt, mesh, sharding.DEFAULT_RULES, seed=0)
  return spec, mesh, step, state


def lora_cfg(**kw):
  return TINY.replace(lora=LoraConfig(**kw))


def run_steps(cfg, trainable, frozen, batch, optim_cfg, steps):
  """(state, per-step metrics) of `steps` SFT steps from these params on one device; checks that
  what trains and the optimizer moments are stored in `cfg.trainable_dtype`."""
  mesh = sharding.make_mesh((1, 1, 1), jax.devices()[:1])
  spec = model_spec(cfg)
  opt, sched = optim.make_optimizer(optim_cfg, steps)
  state = state_lib.create_state(spec, opt, mesh, sharding.DEFAULT_RULES, 0, (trainable, frozen))
  for leaf in jax.tree.leaves((state.params, state.opt_state)):
    if jnp.issubdtype(leaf.dtype, jnp.floating):
      assert leaf.dtype == jnp.dtype(cfg.trainable_dtype or cfg.param_dtype)
  step = jax.jit(sft_step.make_sft_step(spec, opt, sched))
  metrics = []
  for _ in range(steps):
    state, m = step(state, batch)
    metrics.append(m)
  return state, metrics
