"""SFT step: loss against NumPy, LoRA, gradient accumulation, optimizer schedule."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlab import sharding
from jaxlab.models.params import merge_lora, model_spec
from jaxlab.train import optim
from tests import train_util as tu


def _np_loss(logits, targets, mask):
  logits = logits.astype(np.float64)
  logz = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
  nll = logz - np.take_along_axis(logits, targets[..., None], -1)[..., 0]
  return (nll * mask).sum() / mask.sum()


def test_loss_is_mean_over_trained_tokens_of_global_batch():
  spec, mesh, step, state = tu.setup()
  batch = tu.random_batch(0)
  model = spec.merge(state.params, state.frozen)
  logits = np.asarray(jax.jit(lambda: model(batch["inputs"], batch["positions"],
                                            batch["segment_ids"]))())
  expected = _np_loss(logits, batch["targets"], batch["loss_mask"])
  _, metrics = step(state, batch)
  assert abs(float(metrics["loss"]) - expected) < 1e-5
  assert float(metrics["trained_tokens"]) == batch["loss_mask"].sum()


def test_loss_decreases_on_a_repeated_batch():
  _, _, step, state = tu.setup(steps=30)
  batch = tu.random_batch(1)
  losses = []
  for _ in range(30):
    state, m = step(state, batch)
    losses.append(float(m["loss"]))
  assert losses[-1] < 0.5 * losses[0]


def test_grad_accumulation_equals_big_batch():
  batch = tu.random_batch(2, rows=16)
  # A large Adam eps keeps the update proportional to the gradient: with eps=1e-8 a
  # coordinate whose gradient is ~1e-9 (float noise) would get a full +-lr step.
  _, _, step1, s1 = tu.setup(grad_accum=1, eps=1e-3)
  _, _, step4, s4 = tu.setup(grad_accum=4, eps=1e-3)
  for _ in range(2):
    s1, m1 = step1(s1, batch)
    s4, m4 = step4(s4, batch)
  assert abs(float(m1["loss"]) - float(m4["loss"])) < 1e-5
  assert abs(float(m1["grad_norm"]) - float(m4["grad_norm"])) < 1e-5
  for a, b in zip(jax.tree.leaves(s1.params), jax.tree.leaves(s4.params)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)


def test_lora_trains_only_adapters_and_merges_exactly():
  cfg = tu.lora_cfg(rank=4, alpha=8.0, rslora=True)
  spec, mesh, step, state = tu.setup(cfg)
  frozen0 = jax.tree.map(np.asarray, state.frozen)
  params0 = jax.tree.map(np.asarray, state.params)
  # Only adapters are trainable; every projection of every layer has one.
  flat = jax.tree_util.tree_flatten_with_path(state.params)[0]
  names = {jax.tree_util.keystr(p, simple=True, separator="/") for p, _ in flat}
  assert all(n.endswith(("lora_a", "lora_b")) for n in names)
  assert len(names) == 2 * 7 * cfg.n_layers
  for i in range(3):
    state, _ = step(state, tu.random_batch(i))
  for a, b in zip(jax.tree.leaves(frozen0), jax.tree.leaves(state.frozen)):
    np.testing.assert_array_equal(a, np.asarray(b))
  changed = [not np.array_equal(a, np.asarray(b))
             for a, b in zip(jax.tree.leaves(params0), jax.tree.leaves(state.params))]
  assert all(changed)
  # The merged base model computes the same logits as base + adapters.
  batch = tu.random_batch(5)
  args = (batch["inputs"], batch["positions"], batch["segment_ids"])
  adapter_logits = jax.jit(lambda p, f: spec.merge(p, f)(*args))(state.params, state.frozen)
  merged = merge_lora(state.params, state.frozen, cfg)
  base_spec = model_spec(cfg.replace(lora=None))
  merged_logits = jax.jit(lambda p: base_spec.merge(p, {})(*args))(merged)
  np.testing.assert_allclose(np.asarray(adapter_logits), np.asarray(merged_logits), atol=1e-4)


def test_lora_targets_and_layer_subset():
  cfg = tu.lora_cfg(rank=1, alpha=512.0, targets=("down_proj",), layers=(1,))
  spec = model_spec(cfg)
  trainable = spec.abstract[0]
  assert list(trainable["layers"].keys()) == [1]
  assert set(trainable["layers"][1]["mlp"]["down_proj"]) == {"lora_a", "lora_b"}
  assert trainable["layers"][1]["mlp"]["down_proj"]["lora_a"].shape == (cfg.d_ff, 1)
  assert cfg.lora.scale == 512.0
  assert tu.lora_cfg(rank=16, alpha=32.0, rslora=True).lora.scale == pytest.approx(8.0)


@pytest.mark.parametrize("decay", ["linear", "cosine", "constant"])
def test_schedule_warmup_then_decay(decay):
  sched = optim.learning_rate_schedule(1.0, total_steps=20, warmup_steps=5, decay=decay)
  values = np.array([float(sched(i)) for i in range(21)])
  assert values[0] == 0.0 and values[5] == pytest.approx(1.0)
  assert np.all(np.diff(values[:6]) > 0)
  if decay == "constant":
    assert values[20] == pytest.approx(1.0)
  else:
    assert values[20] == pytest.approx(0.0, abs=1e-6) and np.all(np.diff(values[5:]) <= 1e-7)


def test_bad_schedule_names_key():
  with pytest.raises(ValueError, match="optim.decay"):
    optim.learning_rate_schedule(1.0, 10, 1, "exp")


def test_mesh_that_does_not_fit():
  with pytest.raises(ValueError, match=r"mesh.shape=\(2, 2, 2\) needs 8 devices"):
    sharding.make_mesh((2, 2, 2), jax.devices()[:1])
  with pytest.raises(ValueError, match="not divisible"):
    sharding.make_mesh((3, -1, 1), jax.devices()[:1] * 1)
