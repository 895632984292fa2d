"""Layers under lax.scan: same logits, gradients, HF files and sampled tokens as unrolled."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import AbstractMesh, AxisType
from safetensors import numpy as st_numpy

from jaxlab import shapecheck, sharding
from jaxlab.models import hf, hf_config, safetensors_io
from jaxlab.models.config import LoraConfig, ModelConfig
from jaxlab.models.decoder import layer_runs
from jaxlab.models.params import (merge_lora, model_spec, stack_layers, unstack_layers,
                                  with_layout)
from jaxlab.sample import sample
from tests import hf_util

CFG = ModelConfig(vocab_size=64, d_model=32, n_layers=4, n_heads=4, n_kv_heads=2, d_ff=48,
                  qkv_bias=True, qk_norm=True)  # GQA (G=2), Qwen2 bias, Qwen3 q/k norm
SUBSET = LoraConfig(rank=2, layers=(1, 2), targets=("q_proj", "v_proj", "down_proj"))
FAST = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


@pytest.fixture(scope="module")
def mesh():
  return sharding.make_mesh((1, 1, 1), jax.devices()[:1])


def params(cfg, seed=0):
  """Random unrolled (trainable, frozen), LoRA B != 0 included, drawn by NumPy (nothing to
  compile): norm scales around 1, weights N(0, 0.1)."""
  rng = np.random.default_rng(seed)
  def draw(path, a):
    x = rng.normal(0.0, 0.1, a.shape)
    return jnp.asarray(x + (path[-1].key == "scale"), a.dtype)
  return jax.tree.map_with_path(draw, model_spec(cfg).abstract)


def packed_batch():
  """Two rows: two packed segments, and one segment followed by padding (segment 0)."""
  tokens = np.asarray(jax.random.randint(jax.random.key(7), (2, 12), 0, 64), np.int32)
  seg = np.asarray([[1] * 5 + [2] * 7, [1] * 9 + [0] * 3], np.int32)
  pos = np.asarray([list(range(5)) + list(range(7)), list(range(9)) + [0] * 3], np.int32)
  return tokens, pos, seg


def logits_and_grads(cfg, tr, fr):
  spec = model_spec(cfg)
  tokens, pos, seg = packed_batch()
  def loss(tr):
    logits = spec.merge(tr, fr)(tokens, pos, seg)
    return jnp.sum(jnp.where(seg[..., None] != 0, jnp.sin(logits), 0.0)), logits
  (_, logits), grads = jax.jit(jax.value_and_grad(loss, has_aux=True),
                               compiler_options=FAST)(tr)
  return np.asarray(logits), grads


@pytest.mark.parametrize("lora, policy", [
    (None, "none"), (None, "save_qkvo"), (SUBSET, "dots")])
def test_scanned_equals_unrolled_logits_and_grads(mesh, lora, policy):
  cfg = CFG.replace(lora=lora, remat_policy=policy)
  scfg = cfg.replace(scan_layers=True)
  tr, fr = params(cfg)
  str_, sfr = stack_layers(tr, scfg), stack_layers(fr, scfg)
  spec = model_spec(scfg)  # the stacked trees are exactly the scanned model's params
  assert jax.tree.structure(str_) == jax.tree.structure(spec.abstract[0])
  assert jax.tree.map(lambda x: (x.shape, x.dtype), str_) == jax.tree.map(
      lambda a: (a.shape, a.dtype), spec.abstract[0])
  if lora is not None:
    assert sorted(str_["stacks"]) == [1] and "kernel" in sfr["stacks"][2]["mlp"]["down_proj"]
  want_logits, want_grads = logits_and_grads(cfg, tr, fr)
  got_logits, got_grads = logits_and_grads(scfg, str_, sfr)
  assert np.abs(want_logits).max() > 0.5
  np.testing.assert_allclose(got_logits, want_logits, atol=2e-5)
  got_grads = unstack_layers(got_grads, scfg)
  assert jax.tree.structure(got_grads) == jax.tree.structure(want_grads)
  scale = max(float(jnp.abs(g).max()) for g in jax.tree.leaves(want_grads))
  assert scale > 1e-2
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=2e-5 * scale), got_grads,
               want_grads)


def _count_eqns(jaxpr) -> int:
  return len(jaxpr.eqns)


@pytest.mark.parametrize("policy", ["none", "full"])
def test_traced_program_does_not_grow_with_depth(policy):
  """The scanned train-step graph is the same size at 2 and 8 layers (compile time flat)."""
  def size(n, scan):
    cfg = CFG.replace(n_layers=n, scan_layers=scan, remat_policy=policy)
    spec = model_spec(cfg)
    tokens = jnp.zeros((1, 8), jnp.int32)
    grad = jax.grad(lambda tr, fr: jnp.sum(spec.merge(tr, fr)(tokens)))
    return _count_eqns(jax.make_jaxpr(grad)(*spec.abstract).jaxpr)
  assert size(2, True) == size(8, True)
  assert size(8, False) > size(2, False) + 6 * 20


def test_layer_runs_cut_at_structure_changes():
  assert layer_runs(CFG) == ((0, 4),)
  assert layer_runs(CFG.replace(lora=LoraConfig())) == ((0, 4),)
  assert layer_runs(CFG.replace(lora=SUBSET)) == ((0, 1), (1, 3), (3, 4))
  assert layer_runs(CFG.replace(n_layers=32, lora=LoraConfig(layers=tuple(range(16))))) == (
      (0, 16), (16, 32))
  spec = model_spec(CFG.replace(n_layers=32, lora=LoraConfig(layers=(24,)), scan_layers=True))
  assert [spec.abstract[1]["stacks"][r]["mlp"]["up_proj"]["kernel"].shape[0]
          for r in range(3)] == [24, 1, 7]
  assert list(spec.abstract[0]["stacks"]) == [1]
  assert spec.axes[1]["stacks"][0]["mlp"]["up_proj"]["kernel"] == ("layers", "embed", "mlp")


def test_remat_config_keys():
  assert CFG.remat_mode == "none" and CFG.replace(remat=True).remat_mode == "full"
  assert CFG.replace(remat=True, remat_policy="dots").remat_mode == "dots"
  d = dict(vocab_size=8, d_model=8, n_layers=1, n_heads=1, n_kv_heads=1, d_ff=8)
  assert ModelConfig.from_dict({**d, "remat": True, "remat_policy": ""}).remat_mode == "full"
  with pytest.raises(ValueError, match="model.remat_policy='everything'"):
    ModelConfig.from_dict({**d, "remat_policy": "everything"})


def test_with_layout_round_trip(mesh):
  cfg = CFG.replace(lora=SUBSET)
  tr, fr = params(cfg)
  scfg, str_, sfr = with_layout(cfg, tr, fr, True)
  assert scfg.scan_layers and "stacks" in str_ and "layers" not in sfr
  ucfg, utr, ufr = with_layout(scfg, str_, sfr, False)
  assert ucfg == cfg
  jax.tree.map(np.testing.assert_array_equal, (utr, ufr), (tr, fr))
  # merge_lora folds stacked adapters ([N, in, r] @ [N, r, out]) like per-layer ones.
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6),
               unstack_layers(merge_lora(str_, sfr, scfg), scfg), merge_lora(tr, fr, cfg))


def test_hf_load_scanned_and_export_round_trip(mesh, tmp_path):
  src = tmp_path / "src"
  hf_util.make_checkpoint("qwen3_qk_norm", src, max_shard_size="100KB")
  cfg, tr, fr = hf.load_hf(src, mesh, scan_layers=True)
  assert cfg.scan_layers and fr == {} and tr["stacks"][0]["mlp"]["up_proj"]["kernel"].shape[0] == 2
  ucfg, utr, _ = hf.load_hf(src, mesh, scan_layers=False)
  jax.tree.map(np.testing.assert_array_equal, tr, stack_layers(utr, cfg))
  _, dev, _ = hf.load_hf(src, mesh, scan_layers=True, relayout="device", param_dtype="bfloat16")
  _, host, _ = hf.load_hf(src, mesh, scan_layers=True, relayout="host", param_dtype="bfloat16")
  jax.tree.map(np.testing.assert_array_equal, dev, host)
  hf.export_hf(tmp_path / "out", cfg, tr, dtype="float32", max_shard_bytes=200_000)
  assert hf_config.config_from_hf(tmp_path / "out") == ucfg
  original = {}
  for f in sorted(src.glob("*.safetensors")):
    original.update(st_numpy.load_file(f))
  exported = {}
  for f in sorted((tmp_path / "out").glob("*.safetensors")):
    exported.update(st_numpy.load_file(f))
  assert len((list((tmp_path / "out").glob("*.safetensors")))) > 1
  assert sorted(exported) == sorted(original)
  for name, x in original.items():
    np.testing.assert_array_equal(exported[name], x, err_msg=name)
  # LoRA on one layer of a scanned model: two base stacks, adapters only in the second.
  lcfg, ltr, lfr = hf.load_hf(src, mesh, scan_layers=True, lora=LoraConfig(rank=2, layers=(1,)))
  assert list(ltr["stacks"]) == [1] and sorted(lfr["stacks"]) == [0, 1]
  hf.export_hf(tmp_path / "lora", lcfg, merge_lora(ltr, lfr, lcfg), dtype="float32")
  tensors = safetensors_io.checkpoint_tensors(tmp_path / "lora")
  w = "model.layers.1.self_attn.q_proj.weight"
  np.testing.assert_array_equal(safetensors_io.read_rows(tensors[w], 0, tensors[w].shape[0]),
                                original[w])  # B = 0: the merged base is unchanged


def test_hf_folders_load_scanned_by_default(mesh, tmp_path):
  """HF folders (students, teachers, evaluated and judge models) load scanned unless a config
  says model.scan_layers=False; workdirs keep their own layout; fresh models stay unrolled."""
  import ml_collections
  from jaxlab.config import apply_overrides, resume_changes
  from jaxlab.evals.models import load_model_and_tokenizer
  from jaxlab.models.config import resolve_layout
  from jaxlab.train import runner
  hf_util.make_checkpoint("llama_gqa_llama3_rope", tmp_path)
  rules = sharding.DEFAULT_RULES
  cfg, tr, fr = hf.load_hf(tmp_path, mesh)
  assert cfg.scan_layers and set(tr) == {"embed_tokens", "lm_head", "norm", "stacks"}
  assert list(tr["stacks"]) == [0]  # identical layers: one stack of all of them
  ucfg, utr, _ = hf.load_hf(tmp_path, mesh, scan_layers=False)
  assert not ucfg.scan_layers and "layers" in utr
  tokens, pos, seg = packed_batch()
  tokens = tokens % cfg.vocab_size
  got, want = (np.asarray(jax.jit(lambda t, c=c: model_spec(c).merge(t, {})(tokens, pos, seg))(t))
               for c, t in ((cfg, tr), (ucfg, utr)))
  assert np.abs(want).max() > 1.0
  np.testing.assert_allclose(got, want, atol=2e-5)  # the same model, in either layout
  # The loaders built on load_hf: runner (students, teachers, sampler users) and evals.
  for scan, want_scan in ((None, True), ("auto", True), (True, True), (False, False)):
    c, t, f = runner.load_model_params(str(tmp_path), mesh, rules, key="k", scan_layers=scan)
    assert c.scan_layers == want_scan and ("stacks" in t) == want_scan and f == {}
  lora = LoraConfig(rank=2)
  c, t, f = runner.load_model_params(str(tmp_path), mesh, rules, key="k", lora=lora)
  assert c.scan_layers and "stacks" in t and "stacks" in f
  config = ml_collections.ConfigDict(dict(dtype="", tokenizer=dict(path="")))
  m = load_model_and_tokenizer(str(tmp_path), config, mesh, rules)
  assert m.spec.cfg.scan_layers and "stacks" in m.trainable
  # The config key: True / False / None / "auto"; anything else is an error naming it.
  assert [resolve_layout(v, own=o) for v, o in ((None, True), ("auto", False), (False, True),
                                                (True, False))] == [True, False, False, True]
  with pytest.raises(ValueError, match="config key model.scan_layers='yes'"):
    resolve_layout("yes", own=True)
  assert ModelConfig.from_dict({**CFG.__dict__, "lora": None, "scan_layers": None}) == CFG
  c = apply_overrides(ml_collections.ConfigDict({"model": {"scan_layers": False}}),
                      ["model.scan_layers=auto"])
  assert c.model.scan_layers is None
  # A run started with auto records the layout it resolved; resuming with auto is no change.
  assert resume_changes({"model": {"scan_layers": True}}, c) == []
  c.model.scan_layers = False
  assert resume_changes({"model": {"scan_layers": True}}, c) == [
      "model.scan_layers: True -> False"]


def test_sampler_scanned_equals_unrolled(mesh):
  tr, fr = params(CFG)
  scfg = CFG.replace(scan_layers=True)
  prompts = np.asarray([[0, 0, 5, 9, 11], [12, 2, 30, 31, 3]], np.int32)
  lengths = np.asarray([3, 5], np.int32)
  def run(cfg, tr, fr):  # 24 new tokens: decode runs in segments over a growing cache
    fn = jax.jit(lambda tr, fr: sample(model_spec(cfg), tr, fr, prompts, lengths,
                                       jax.random.key(0), max_new_tokens=24, temperature=0.0),
                 compiler_options=FAST)
    return jax.device_get(fn(tr, fr))
  want = run(CFG, tr, fr)
  got = run(scfg, stack_layers(tr, scfg), stack_layers(fr, scfg))
  assert len(set(want.tokens[0].tolist())) > 2  # not a degenerate repeat
  np.testing.assert_array_equal(got.tokens, want.tokens)
  np.testing.assert_allclose(got.logprobs, want.logprobs, atol=2e-5)


def test_shapecheck_sizes_and_activations_with_scan():
  mesh = AbstractMesh((1, 2, 1), sharding.MESH_AXES, axis_types=(AxisType.Auto,) * 3)
  cfg = CFG.replace(n_layers=6, lora=LoraConfig(rank=4, layers=(2,)))
  opt = optax.adamw(1e-3)
  want = shapecheck.sizes_by_depth(cfg, opt, mesh, sharding.DEFAULT_RULES)
  got = shapecheck.sizes_by_depth(cfg.replace(scan_layers=True), opt, mesh, sharding.DEFAULT_RULES)
  assert got == want
  act = {p: shapecheck.activation_bytes(cfg.replace(remat_policy=p), 4, 256, (1, 2, 1))
         for p in ("none", "full", "dots", "dots_no_batch", "save_qkvo")}
  assert act["none"] > act["dots"] > act["dots_no_batch"] > act["full"]
  assert act["dots_no_batch"] > act["save_qkvo"] > act["full"]
