"""Tests for jaxlab.shapecheck: every config in configs/ passes; figures exact where they can be."""

import glob
import importlib.util
import json
import os
import re
import subprocess
import sys

import pytest

from jaxlab import shapecheck
from jaxlab.config import load_config_file

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GiB = 2**30

# One fresh process with 16 fake CPU devices checks every variant of every config file: the
# real sizes abstractly, the train step lowered with 2 of its layers (full depth is lowered by
# the CLI by default; layers are identical). Eval configs that name no model use a 7B stand-in.
WORKER = r"""
import glob, importlib.util, json, os, sys
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=16"
from jaxlab import shapecheck
from jaxlab.config import load_config_file
out = []
for path in sorted(glob.glob("configs/*.py")):
  spec = importlib.util.spec_from_file_location("m", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  for variant in getattr(module, "VARIANTS", (None,)):
    name = path + (f":{variant}" if variant else "")
    config = load_config_file(name)
    model = "qwen2.5-7b" if config.get("job") == "eval" else None
    real = model or ("init" in config and config.init.get("hf_path", "").startswith("/models/"))
    acc = "v5p-32" if real else "cpu"
    for r in shapecheck.check(config, acc, model=model, lower_layers=2, title=name):
      out.append({"name": name, "accelerator": acc, "fits": r.fits, "total": r.total,
                  "per_device": r.per_device, "notes": r.notes, "text": r.text()})
print("RESULTS " + json.dumps(out))
"""


@pytest.fixture(scope="module")
def all_configs():
  p = subprocess.run([sys.executable, "-c", WORKER], cwd=ROOT, capture_output=True, text=True,
                     env={**os.environ, "JAX_PLATFORMS": "cpu"}, timeout=600)
  assert p.returncode == 0, p.stderr[-4000:]
  line = next(l for l in p.stdout.splitlines() if l.startswith("RESULTS "))
  return json.loads(line[len("RESULTS "):])


def test_every_config_in_configs_passes_the_shape_check(all_configs):
  files = sorted(glob.glob(os.path.join(ROOT, "configs", "*.py")))
  checked = {r["name"].split(":")[0] for r in all_configs}
  assert checked == {os.path.relpath(f, ROOT) for f in files}
  for r in all_configs:
    assert r["fits"], r["text"]
    if r["per_device"]["grads"]:  # training: the step was lowered on the fake mesh
      assert any("lowered on a fake CPU mesh" in n for n in r["notes"]), r["text"]


def test_real_configs_document_the_checked_figures(all_configs):
  """The v5p-32 column of configs/em_real.py's table is what the shape check computes."""
  doc = load_module("configs/em_real.py").__doc__
  for r in all_configs:
    if r["name"].startswith("configs/em_real.py:"):
      variant = r["name"].split(":")[1]
      row = re.search(rf"^  {variant} +\S+ GiB \S+ +(\S+) GiB", doc, re.M)
      assert row, f"{variant} missing from the table in configs/em_real.py"
      assert float(row.group(1)) == round(r["total"] / GiB, 2), (variant, r["text"])


def load_module(path):
  spec = importlib.util.spec_from_file_location("m", os.path.join(ROOT, path))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_accelerator_names():
  a = shapecheck.parse_accelerator("v5p-32")
  assert (a.chips, a.memory) == (16, 95 * GiB)
  assert shapecheck.parse_accelerator("v5e-16").chips == 16
  assert shapecheck.parse_accelerator("v5litepod-16").memory == 16 * GiB
  assert (shapecheck.parse_accelerator("8xh100").chips, shapecheck.parse_accelerator("h100").chips) == (8, 8)
  assert shapecheck.parse_accelerator("v4-8").chips == 4
  with pytest.raises(ValueError, match="unknown accelerator 'tpu9'"):
    shapecheck.parse_accelerator("tpu9")
  assert shapecheck.resolve_mesh((1, -1, 1), 16) == (1, 16, 1)
  with pytest.raises(ValueError, match=r"mesh.shape=\(2, 3, 1\) needs 6 devices"):
    shapecheck.resolve_mesh((2, 3, 1), 8)


def test_params_grads_and_optimizer_are_exact_sharded_bytes():
  """Against jaxlab.models.memory.footprint (independent per-layer count) and AdamW's 2 moments."""
  from jaxlab.models import memory, presets
  c = load_config_file("configs/sft.py:em_full")
  cfg = presets.get_preset("qwen2.5-7b", remat=True)
  r = shapecheck.check_train(c, cfg, shapecheck.parse_accelerator("v5p-32"), (1, 16, 1), lower=False)
  fp = memory.footprint(cfg, (1, 16, 1))
  assert r.params == fp.base == 7_615_616_512
  assert r.per_device["params"] == 2 * fp.base_per_device
  assert r.per_device["grads"] == 2 * r.per_device["params"]  # gradient + update
  # mu and nu per param plus a few scalars (counts) replicated
  assert 0 <= r.per_device["optimizer"] - 2 * r.per_device["params"] < 1024


@pytest.mark.parametrize("lora", [None, dict(rank=8, alpha=16.0),
                                  dict(rank=1, alpha=512.0, targets=("down_proj",), layers=(3, 20))])
def test_sizes_from_two_layers_equal_the_full_models(lora):
  from jax.sharding import AbstractMesh, AxisType
  from jaxlab import sharding
  from jaxlab.models import presets
  from jaxlab.models.config import LoraConfig
  from jaxlab.train import optim
  optimizer, _ = optim.make_optimizer(load_config_file("configs/sft.py:em_lora").optim, 10)
  mesh = AbstractMesh((1, 4, 2), sharding.MESH_AXES, axis_types=(AxisType.Auto,) * 3)
  cfg = presets.get_preset("qwen2.5-0.5b", lora=lora and LoraConfig(**lora))
  got = shapecheck.sizes_by_depth(cfg, optimizer, mesh, sharding.DEFAULT_RULES)
  assert got == shapecheck._sizes(cfg, optimizer, mesh, sharding.DEFAULT_RULES)
  assert got["n_params"] > 490_000_000


def test_activation_estimate_formula():
  """The documented per-token formula, written out for one small case."""
  from jaxlab.models.config import ModelConfig
  cfg = ModelConfig(vocab_size=1000, d_model=64, n_layers=3, n_heads=4, n_kv_heads=2, d_ff=128,
                    dtype="bfloat16")
  tokens, keys = 2 * 256, 256 / 2 + 64
  layer = 2 * (4 * 64 + (2 * 4 + 2 * 2) * 16 + 4 * 128) + (4 + 2) * 4 * keys
  want = tokens * (3 * layer + 12 * 1000) + 2 * 256 * 256
  assert shapecheck.activation_bytes(cfg, 4, 256, (1, 2, 1)) == int(want)
  remat = cfg.replace(remat=True)
  want = tokens * (3 * 64 * 2 + 2 * layer + 12 * 1000) + 2 * 256 * 256
  assert shapecheck.activation_bytes(remat, 4, 256, (1, 2, 1)) == int(want)
  assert shapecheck.kv_cache_bytes(cfg, 4, 100, (1, 2, 1)) == 2 * 3 * 2 * 2 * 100 * 16 * 2


def cli(*args):
  return subprocess.run([sys.executable, "-m", "jaxlab.shapecheck", *args], cwd=ROOT,
                        capture_output=True, text=True, env={**os.environ, "JAX_PLATFORMS": "cpu"})


def test_cli_fails_when_a_config_does_not_fit():
  p = cli("--config=configs/em_real.py:em_qwen_coder32b", "--accelerator=v5e-16", "--no-lower",
          "--config.model.lora.enabled=False")  # full fine-tuning of 33B on 16 x 16 GiB
  assert p.returncode == 1, p.stderr
  assert "parameters 32,763,876,352" in p.stdout and "DOES NOT FIT" in p.stdout
  p = cli("--config=configs/em_real.py:em_qwen7b", "--accelerator=v5e-16", "--no-lower")
  assert p.returncode == 0 and "FITS" in p.stdout


def test_cli_names_the_config_key_of_a_batch_that_cannot_be_sharded():
  p = cli("--config=configs/em_real.py:subliminal_qwen7b", "--accelerator=v5p-32", "--mesh=1,16,1",
          "--no-lower")
  assert p.returncode == 2
  assert "config key train.global_batch_size=66 with train.grad_accum=3" in p.stderr
