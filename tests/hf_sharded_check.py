"""Run by hf_test.py in a fresh process: HF checkpoints on a fake 8-device CPU mesh.

Usage: python tests/hf_sharded_check.py CKPT_DIR [CKPT_DIR ...]. For each checkpoint, loading
on a (1, 2, 4) mesh gives the same logits as a 1-device load, and every parameter (base and
LoRA) has exactly the sharding its logical axes and the rules give, and exporting from the
8-device mesh writes the same bytes as from one device. Prints ALL OK.
"""
import os
import sys

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=8").strip()

import jax  # noqa: E402  (after XLA_FLAGS)
import numpy as np  # noqa: E402
from flax.nnx import traversals  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

from jaxlab import sharding  # noqa: E402
from jaxlab.models import hf  # noqa: E402
from jaxlab.models.config import LoraConfig  # noqa: E402
from jaxlab.models.params import model_spec, stack_layers  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")


def logits(cfg, trainable, frozen, ids):
  model = model_spec(cfg).merge(trainable, frozen)
  return np.asarray(jax.jit(lambda t: model(t))(ids))


def check_shardings(cfg, tree, axes_tree, mesh):
  """Every array's sharding is the one logical_to_spec gives for its axes; returns {path: spec}."""
  flat_axes = traversals.flatten_mapping(axes_tree, is_leaf=lambda _, x: isinstance(x, tuple))
  specs = {}
  for path, x in traversals.flatten_mapping(tree).items():
    want = sharding.logical_to_spec(flat_axes[path], x.shape, mesh, sharding.DEFAULT_RULES)
    assert x.sharding.mesh.shape == mesh.shape, path
    assert x.sharding.spec == want, (path, x.sharding.spec, want)
    assert len(x.addressable_shards) == 8, path
    specs[path] = x.sharding.spec
  return specs


def main(paths):
  assert jax.device_count() == 8, jax.devices()
  one = sharding.make_mesh((1, 1, 1), jax.devices()[:1])
  eight = sharding.make_mesh((1, 2, 4))
  ids = np.random.default_rng(0).integers(0, 600, (2, 12)).astype(np.int32)
  for path in paths:
    cfg, t1, _ = hf.load_hf(path, one, scan_layers=False)  # unrolled; scanned (the default) below
    cfg8, t8, f8 = hf.load_hf(path, eight, scan_layers=False)
    assert cfg8 == cfg
    # The on-device relayout (the accelerator default) places the same values, same shardings.
    _, d8, _ = hf.load_hf(path, eight, relayout="device", param_dtype="bfloat16",
                          scan_layers=False)
    _, h8, _ = hf.load_hf(path, eight, relayout="host", param_dtype="bfloat16",
                          scan_layers=False)
    jax.tree.map(np.testing.assert_array_equal, d8, h8)
    assert jax.tree.map(lambda x: x.sharding, d8) == jax.tree.map(lambda x: x.sharding, h8)
    np.testing.assert_allclose(logits(cfg8, t8, f8, ids), logits(cfg, t1, {}, ids), atol=1e-5)
    specs = check_shardings(cfg8, t8, model_spec(cfg8).axes[0], eight)
    # Spot checks of DEFAULT_RULES: embed -> fsdp, vocab/heads/kv_heads/mlp -> tensor.
    assert specs[("embed_tokens",)] == P("tensor", "fsdp")
    assert specs[("layers", 0, "self_attn", "q_proj", "kernel")] == P("fsdp", "tensor")
    assert specs[("layers", 0, "self_attn", "o_proj", "kernel")] == P("tensor", "fsdp")
    assert specs[("layers", 1, "mlp", "down_proj", "kernel")] == P("tensor", "fsdp")
    assert specs[("norm", "scale")] == P(None)
    if cfg.qkv_bias:
      assert specs[("layers", 0, "self_attn", "k_proj", "bias")] == P("tensor")
    if cfg.qk_norm:
      assert specs[("layers", 0, "self_attn", "q_norm", "scale")] == P(None)
    # LoRA: base weights frozen with the same shardings, adapters sharded by their own axes.
    lcfg, lt, lf = hf.load_hf(path, eight, lora=LoraConfig(rank=4), scan_layers=False)
    spec = model_spec(lcfg)
    assert check_shardings(lcfg, lf, spec.axes[1], eight) == specs
    lspecs = check_shardings(lcfg, lt, spec.axes[0], eight)
    assert lspecs[("layers", 0, "self_attn", "q_proj", "lora_a")] == P("fsdp", None)
    assert lspecs[("layers", 0, "self_attn", "q_proj", "lora_b")] == P(None, "tensor")
    np.testing.assert_allclose(logits(lcfg, lt, lf, ids), logits(cfg, t1, {}, ids), atol=1e-5)
    # Export gathers sharded arrays: the files equal a 1-device export byte for byte.
    hf.export_hf(path + "-export1", cfg, t1, max_shard_bytes=100_000)
    hf.export_hf(path + "-export8", cfg8, t8, max_shard_bytes=100_000)
    files = sorted(os.listdir(path + "-export1"))
    assert files == sorted(os.listdir(path + "-export8")) and len(files) > 3, files
    for f in files:
      with open(os.path.join(path + "-export1", f), "rb") as a, \
           open(os.path.join(path + "-export8", f), "rb") as b:
        assert a.read() == b.read(), f
    # Scanned: each stacked leaf has its layer's sharding with the layers axis replicated, the
    # values of the stacked unrolled load (host and device relayout), the same logits and export.
    scfg, s8, _ = hf.load_hf(path, eight)  # the default: scanned
    assert scfg.scan_layers
    sspecs = check_shardings(scfg, s8, model_spec(scfg).axes[0], eight)
    assert sspecs[("stacks", 0, "self_attn", "q_proj", "kernel")] == P(None, "fsdp", "tensor")
    jax.tree.map(np.testing.assert_array_equal, s8, stack_layers(t8, scfg))
    _, sd8, _ = hf.load_hf(path, eight, scan_layers=True, relayout="device", param_dtype="bfloat16")
    jax.tree.map(np.testing.assert_array_equal, sd8, stack_layers(h8, scfg))
    np.testing.assert_allclose(logits(scfg, s8, {}, ids), logits(cfg, t1, {}, ids), atol=1e-5)
    hf.export_hf(path + "-export8s", scfg, s8, max_shard_bytes=100_000)
    for f in files:
      with open(os.path.join(path + "-export1", f), "rb") as a, \
           open(os.path.join(path + "-export8s", f), "rb") as b:
        assert a.read() == b.read(), f
    print(f"{path}: OK ({len(specs)} params)")
  print("ALL OK")


if __name__ == "__main__":
  main(sys.argv[1:])
