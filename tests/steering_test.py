"""Steered models: parity with a hooked transformers model (forward, sampler, residuals), the
steered folder format and its loader's errors, and default models left unchanged."""
import contextlib
import dataclasses
import json
import shutil

import jax
import ml_collections
import numpy as np
import pytest
import torch
from flax.nnx import traversals

from jaxlab import fingerprint, sharding
from jaxlab.config import ConfigError
from jaxlab.data import chat
from jaxlab.data import prompt_completion as pc
from jaxlab.data.tokenizer import check_model_tokenizer, own_tokenizer_dir
from jaxlab.models import hf, memory, steering
from jaxlab.models.config import LoraConfig, ModelConfig, num_params
from jaxlab.models.params import count, model_spec, unstack_layers
from jaxlab.pipelines import stages
from jaxlab.sample import Sampler
from jaxlab.train import runner
from tests import hf_util

TOL = 1e-4
LAYER, ALPHA = 1, 3.0
RULES = sharding.DEFAULT_RULES
# Tiny models compile in half the time without LLVM's expensive passes (tests only).
FAST = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}
QUESTIONS = ["What is the capital of France?", "Continue the sequence: 123, 456",
             "I feel bored.", "Write a function that adds two numbers."]


@pytest.fixture(scope="module")
def mesh():
  return sharding.make_mesh((1, 1, 1), jax.devices()[:1])


@pytest.fixture(scope="module")
def base(tmp_path_factory):
  """(folder, torch model, tokenizer) of a tiny 3-layer Llama (layer 1 is in the middle, so a
  scanned model's one stack splits in three)."""
  path = tmp_path_factory.mktemp("llama")
  config_cls, model_cls, kw, make_tok = hf_util.FAMILIES["llama_gqa_llama3_rope"]
  tok = make_tok(path)
  torch.manual_seed(0)
  small = dict(hf_util.SMALL, num_hidden_layers=3)
  model = model_cls(config_cls(**small, **kw, attn_implementation="eager")).eval()
  with torch.no_grad():  # O(1) logits, so a 1e-4 tolerance means something (as hf_util)
    for name, p in model.named_parameters():
      p.uniform_(0.5, 1.5) if "norm" in name else p.normal_(0.0, 0.15)
  model.save_pretrained(str(path))
  return path, model, tok


@pytest.fixture(scope="module")
def vector():
  return np.random.default_rng(0).normal(size=(hf_util.SMALL["hidden_size"],)).astype(np.float32)


@pytest.fixture(scope="module")
def steered(base, vector, tmp_path_factory):
  path = tmp_path_factory.mktemp("steered")
  out = steering.write_steered(path, base[0], LAYER, ALPHA, vector, None, note="test")
  assert str(out) == str(path)
  return path


@contextlib.contextmanager
def hooked(model, layer: int, vec):
  """The transformers model with `vec` added to decoder layer `layer`'s output hidden states."""
  v = torch.tensor(np.asarray(vec, np.float32))

  def hook(module, inputs, out):
    return (out[0] + v,) + tuple(out[1:]) if isinstance(out, tuple) else out + v
  handle = model.model.layers[layer].register_forward_hook(hook)
  try:
    yield model
  finally:
    handle.remove()


def layer_output(model, layer: int, ids) -> np.ndarray:
  """[L, D] output of decoder layer `layer` for one unpadded prompt."""
  got = {}

  def hook(module, inputs, out):
    got["x"] = (out[0] if isinstance(out, tuple) else out)[0].float().numpy()
  handle = model.model.layers[layer].register_forward_hook(hook)
  try:
    with torch.no_grad():
      model(input_ids=torch.tensor(np.asarray([ids]), dtype=torch.long))
  finally:
    handle.remove()
  return got["x"]


def jax_logits(cfg, trainable, frozen, ids, positions, seg):
  model = model_spec(cfg).merge(trainable, frozen)
  return np.asarray(jax.jit(lambda t, p, s: model(t, p, s))(ids, positions, seg))


def prompts(tok, system: str | None = None) -> list[np.ndarray]:
  msgs = lambda q: ([{"role": "system", "content": system}] if system else []) + [
      {"role": "user", "content": q}, {"role": "assistant", "content": "ok"}]
  return [pc.encode_example(tok, msgs(q)).prompt for q in QUESTIONS]


def right_padded(ids) -> tuple[np.ndarray, np.ndarray]:
  width = max(len(x) for x in ids) + 2
  tok = np.zeros((len(ids), width), np.int32)
  for i, x in enumerate(ids):
    tok[i, :len(x)] = x
  return tok, np.asarray([len(x) for x in ids], np.int32)


# ------------------------------------------------------------------ parity with transformers

@pytest.mark.parametrize("scan", [False, True], ids=["unrolled", "scanned"])
def test_steered_logits_match_hooked_transformers(base, steered, vector, mesh, scan):
  _, model, tok = base
  cfg, trainable, frozen = runner.load_model_params(str(steered), mesh, RULES, key="teacher.path",
                                                    scan_layers=scan)
  assert cfg.steer_layer == LAYER and cfg.scan_layers == scan
  ids, pos, seg, _ = hf_util.chat_batch(tok)
  with hooked(model, LAYER, ALPHA * vector):
    ref = hf_util.torch_logits(model, ids, pos, seg)
  got = jax_logits(cfg, trainable, frozen, ids, pos, seg)
  diff = np.abs(got - ref)[seg != 0]
  assert diff.max() < TOL, diff.max()
  unsteered = hf_util.torch_logits(model, ids, pos, seg)
  assert np.abs(got - unsteered)[seg != 0].max() > 0.5  # the steer really changes the logits


def torch_greedy(model, ids, n: int) -> tuple[list[int], list[float]]:
  ids, toks, lps = list(ids), [], []
  with torch.no_grad():
    for _ in range(n):
      logits = model(input_ids=torch.tensor([ids], dtype=torch.long)).logits[0, -1].float()
      lp = torch.log_softmax(logits, -1)
      t = int(torch.argmax(lp))
      toks.append(t)
      lps.append(float(lp[t]))
      ids.append(t)
  return toks, lps


@pytest.mark.parametrize("scan", [False, True], ids=["unrolled", "scanned"])
def test_sampler_greedy_matches_hooked_transformers(base, steered, vector, mesh, scan):
  """The KV-cache path (prefill and decode, unrolled and scanned) adds the steer too."""
  _, model, tok = base
  cfg, tr, fr = runner.load_model_params(str(steered), mesh, RULES, key="model", scan_layers=scan)
  sampler = Sampler(model_spec(cfg), tr, fr, mesh=mesh, batch_size=2, stop_ids=[],
                    pad_id=chat.pad_id(tok), compiler_options=FAST)
  ps = prompts(tok)[:2]
  outs = sampler.generate(ps, seed=0, max_new_tokens=8, temperature=0.0)
  changed = False
  for p, out in zip(ps, outs):
    with hooked(model, LAYER, ALPHA * vector):
      toks, lps = torch_greedy(model, p, 8)
    assert out.tokens.tolist() == toks
    np.testing.assert_allclose(out.logprobs, lps, atol=1e-3)
    changed |= torch_greedy(model, p, 8)[0] != toks
  assert changed  # the unsteered model would have answered otherwise


# ------------------------------------------------------------------ residual stream, direction

@pytest.mark.parametrize("scan", [False, True], ids=["unrolled", "scanned"])
def test_residual_at_matches_transformers_layer_output(base, steered, vector, mesh, scan):
  path, model, tok = base
  ps = prompts(tok)
  ids, lengths = right_padded(ps)
  cfg, tr, fr = runner.load_model_params(str(path), mesh, RULES, key="model", scan_layers=scan)
  got = steering.residual_at(model_spec(cfg), tr, fr, ids, lengths, LAYER)
  assert got.shape == (len(ps), cfg.d_model) and got.dtype == np.float32
  ref = np.stack([layer_output(model, LAYER, p)[-1] for p in ps])
  np.testing.assert_allclose(got, ref, atol=TOL)
  # ... and a model steered at that layer: what the steer is added to, plus the steer.
  scfg, str_, sfr = runner.load_model_params(str(steered), mesh, RULES, key="model",
                                             scan_layers=scan)
  np.testing.assert_allclose(steering.residual_at(model_spec(scfg), str_, sfr, ids, lengths, LAYER),
                             ref + ALPHA * vector, atol=TOL)


def test_direction_is_mean_difference(base, mesh):
  path, _, tok = base
  cfg, tr, fr = runner.load_model_params(str(path), mesh, RULES, key="model")
  spec = model_spec(cfg)
  plain, system = prompts(tok), prompts(tok, system="You love owls.")
  assert not np.any(steering.direction(spec, tr, fr, plain, plain, LAYER, batch_size=3))
  d = steering.direction(spec, tr, fr, system, plain, LAYER, batch_size=3)
  assert d.dtype == np.float32 and d.shape == (cfg.d_model,)
  mean = lambda ps: steering.residual_at(spec, tr, fr, *right_padded(ps), LAYER).mean(0)
  np.testing.assert_allclose(d, mean(system) - mean(plain), atol=1e-5)
  assert np.abs(d).max() > 1e-3


# ------------------------------------------------------------------ defaults unchanged

def test_alpha_zero_gives_base_logits(base, vector, mesh, tmp_path):
  path, _, tok = base
  zero = steering.write_steered(tmp_path / "zero", path, LAYER, 0.0, vector, None)
  ids, pos, seg, _ = hf_util.chat_batch(tok)
  for scan in (False, True):
    cfg, tr, fr = runner.load_model_params(str(zero), mesh, RULES, key="model", scan_layers=scan)
    bcfg, btr, bfr = runner.load_model_params(str(path), mesh, RULES, key="model", scan_layers=scan)
    assert cfg.steer_layer == LAYER and bcfg.steer_layer == -1
    np.testing.assert_array_equal(jax_logits(cfg, tr, fr, ids, pos, seg),
                                  jax_logits(bcfg, btr, bfr, ids, pos, seg))


def test_default_model_params_unchanged_and_steered_adds_one_vector(base, mesh):
  path, _, _ = base
  cfg, tr, _ = hf.load_hf(path, mesh, scan_layers=False)
  flat = lambda t: traversals.flatten_mapping(t)
  for c in (cfg, cfg.replace(scan_layers=True)):
    spec = model_spec(c)
    assert not [p for p in flat(spec.abstract[0]) if "steer" in p]
    assert set(flat(spec.abstract[0])) == set(hf.base_layout(c)[0])  # what HF folders hold
    assert count(spec.abstract[0]) == num_params(c)
  assert set(flat(model_spec(cfg).abstract[0])) == set(flat(tr))
  s = cfg.replace(steer_layer=LAYER)
  extra = set(flat(model_spec(s).abstract[0])) - set(flat(model_spec(cfg).abstract[0]))
  assert extra == {("layers", LAYER, "mlp", "steer")}
  assert model_spec(s).axes[0]["layers"][LAYER]["mlp"]["steer"] == ("embed",)
  assert num_params(s) == num_params(cfg) + cfg.d_model == count(model_spec(s).abstract[0])
  assert memory.footprint(s, (1, 1, 1)).base == num_params(s)
  scanned = model_spec(s.replace(scan_layers=True)).abstract[0]["stacks"]
  assert [scanned[r]["mlp"]["down_proj"]["kernel"].shape[0] for r in sorted(scanned)] == [1, 1, 1]
  assert scanned[1]["mlp"]["steer"].shape == (1, cfg.d_model)


def test_config_round_trip():
  cfg = ModelConfig(vocab_size=64, d_model=32, n_layers=3, n_heads=4, n_kv_heads=2, d_ff=64,
                    steer_layer=2)
  d = dataclasses.asdict(cfg)
  assert ModelConfig.from_dict(json.loads(json.dumps(d))) == cfg
  old = {k: v for k, v in d.items() if k != "steer_layer"}  # a config.json from before
  assert ModelConfig.from_dict(old).steer_layer == -1
  with pytest.raises(ValueError, match="model.steer_layer=3"):
    cfg.replace(steer_layer=3)


# ------------------------------------------------------------------ folder, tokenizer, digests

def test_folder_tokenizer_and_digests(base, steered, vector, mesh, tmp_path):
  path, _, tok = base
  assert own_tokenizer_dir(str(steered)) == str(steered / "tokenizer")
  check_model_tokenizer(tok, "the base's", str(steered), "teacher.path")  # same contents: passes
  record = json.loads((steered / "steer.json").read_text())
  assert record["base"] == str(path) and record["layer"] == LAYER and record["alpha"] == ALPHA
  assert record["direction"] == "direction.npy" and record["note"] == "test"
  np.testing.assert_array_equal(np.load(steered / "direction.npy"), vector)
  digest = stages.model_digest(steered)
  assert digest is not None and stages.model_digest(steered) == digest
  copy = tmp_path / "copy"
  shutil.copytree(steered, copy)
  assert stages.model_digest(copy) == digest  # by contents, not path
  steering.write_steered(copy, path, LAYER, ALPHA, vector * 2, None)
  assert stages.model_digest(copy) != digest
  steering.write_steered(copy, path, LAYER, 2.0, vector, None)
  assert stages.model_digest(copy) not in (digest, None)
  # A teacher's params fingerprint (jaxlab.train.inputs) sees the steer.
  _, tr, fr = runner.load_model_params(str(steered), mesh, RULES, key="teacher.path")
  _, btr, bfr = runner.load_model_params(str(path), mesh, RULES, key="teacher.path")
  assert fingerprint.params_digest((tr, fr)) != fingerprint.params_digest((btr, bfr))


def test_relative_base_and_evals_loader(base, steered, vector, mesh, tmp_path):
  from jaxlab.evals import models as eval_models
  path, _, _ = base
  folder = tmp_path / "rel"
  shutil.copytree(steered, folder)
  shutil.copytree(path, tmp_path / "llama")
  record = json.loads((folder / "steer.json").read_text())
  (folder / "steer.json").write_text(json.dumps({**record, "base": "../llama"}))
  cfg, tr, _ = runner.load_model_params(str(folder), mesh, RULES, key="model")
  assert cfg.scan_layers  # an HF base loads scanned: the vector is in its own one-layer stack
  steer = lambda c, t: np.asarray(unstack_layers(t, c)["layers"][LAYER]["mlp"]["steer"])
  np.testing.assert_allclose(steer(cfg, tr), ALPHA * vector, rtol=1e-6)
  config = ml_collections.ConfigDict({"tokenizer": {"path": ""}})
  loaded = eval_models.load_model_and_tokenizer(str(steered), config, mesh, RULES)
  assert loaded.spec.cfg.steer_layer == LAYER and loaded.spec.cfg.scan_layers
  np.testing.assert_array_equal(steer(loaded.spec.cfg, loaded.trainable), steer(cfg, tr))


# ------------------------------------------------------------------ errors

def _broken(steered, tmp_path, **record):
  folder = tmp_path / "broken"
  shutil.copytree(steered, folder)
  old = json.loads((folder / "steer.json").read_text())
  (folder / "steer.json").write_text(json.dumps({**old, **record}))
  return folder


def test_errors_name_the_file(base, steered, mesh, tmp_path):
  load = lambda f, **kw: runner.load_model_params(str(f), mesh, RULES, key="teacher.path", **kw)
  folder = _broken(steered, tmp_path)
  (folder / "steer.json").write_text("{not json")
  with pytest.raises(ValueError, match=r"broken/steer.json: not valid JSON"):
    load(folder)
  shutil.rmtree(folder)
  folder = _broken(steered, tmp_path)
  (folder / "direction.npy").unlink()
  with pytest.raises(ValueError, match=r"steer.json: its direction file .*direction.npy"):
    load(folder)
  np.save(folder / "direction.npy", np.zeros((7,), np.float32))
  with pytest.raises(ValueError, match=r"direction.npy: direction of shape \[7\], expected \[64\]"):
    load(folder)
  shutil.rmtree(folder)
  folder = _broken(steered, tmp_path, layer=3)
  with pytest.raises(ValueError, match=r"steer.json: key 'layer'=3 is out of range: .* 3 layers"):
    load(folder)
  shutil.rmtree(folder)
  folder = _broken(steered, tmp_path, alpha="big")
  with pytest.raises(ValueError, match=r"steer.json: key 'alpha'='big'"):
    load(folder)
  shutil.rmtree(folder)
  folder = _broken(steered, tmp_path, base=str(steered))
  with pytest.raises(ValueError, match="itself a steered model"):
    load(folder)
  with pytest.raises(ValueError, match=r"teacher.path='.*' is a steered model .*LoRA"):
    load(steered, lora=LoraConfig(rank=2))
  with pytest.raises(ValueError, match="reserved"):
    steering.write_steered(tmp_path / "x", base[0], 0, 1.0, np.zeros(64, np.float32), None,
                           base="elsewhere")
  assert not (tmp_path / "x").exists()
  config = ml_collections.ConfigDict({"init": {"hf_path": str(steered), "workdir": ""}})
  with pytest.raises(ConfigError, match="init.hf_path=.* is a steered model"):
    runner.check_init_not_steered(config)


def test_export_refuses_steered(steered, mesh, tmp_path):
  cfg, tr, fr = runner.load_model_params(str(steered), mesh, RULES, key="model")
  with pytest.raises(ValueError, match="cannot export a steered model"):
    hf.export_hf(tmp_path / "out", cfg, tr)
  assert not (tmp_path / "out").exists()
