"""HF interop: transformers logits parity on padded chat batches, export round trip, errors, presets."""
import json
import os
import shutil
import subprocess
import sys

import jax
import ml_dtypes
import numpy as np
import pytest
import torch
import transformers
from flax.nnx import traversals
from safetensors import torch as st_torch

from jaxlab import sharding
from jaxlab.data import chat
from jaxlab.models import hf, hf_config, hf_tokenizer, memory, presets, safetensors_io
from jaxlab.models.config import LoraConfig, ModelConfig, num_params
from jaxlab.models.params import init_params, merge_lora, model_spec
from tests import hf_util

TOL = 1e-4
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def mesh():
  return sharding.make_mesh((1, 1, 1), jax.devices()[:1])


@pytest.fixture(scope="module", params=sorted(hf_util.FAMILIES))
def ckpt(request, tmp_path_factory):
  """(family, folder, torch model, tokenizer) of a tiny float32 checkpoint."""
  path = tmp_path_factory.mktemp(request.param)
  model, tok = hf_util.make_checkpoint(request.param, path)
  return request.param, path, model, tok


def jax_logits(cfg, trainable, frozen, ids, positions, seg):
  model = model_spec(cfg).merge(trainable, frozen)
  return np.asarray(jax.jit(lambda t, p, s: model(t, p, s))(ids, positions, seg))


def assert_close_on_tokens(a, b, seg):
  diff = np.abs(a - b)[seg != 0]
  assert diff.max() < TOL, diff.max()


# ------------------------------------------------------------------ logits parity and round trip

@pytest.mark.parametrize("scan", [False, True], ids=["unrolled", "scanned"])
def test_logits_match_transformers_on_padded_batch(ckpt, mesh, scan):
  family, path, model, tok = ckpt
  cfg, trainable, frozen = hf.load_hf(path, mesh, scan_layers=scan)
  assert frozen == {} and cfg.param_dtype == "float32" and cfg.scan_layers == scan
  ids, pos, seg, _ = hf_util.chat_batch(tok)
  assert (seg[0] == 0).any() and seg[1, 0] == 0  # right- and left-padded rows
  ref = hf_util.torch_logits(model, ids, pos, seg)
  assert np.abs(ref).max() > 1.0  # logits are O(1), so the tolerance is meaningful
  assert_close_on_tokens(jax_logits(cfg, trainable, frozen, ids, pos, seg), ref, seg)


def test_export_reloads_in_transformers_with_same_logits(ckpt, mesh, tmp_path):
  family, path, model, tok = ckpt
  cfg, trainable, frozen = hf.load_hf(path, mesh)
  out = tmp_path / "export"
  files = hf.export_hf(out, cfg, merge_lora(trainable, frozen, cfg), tokenizer_dir=path,
                       dtype="float32", max_shard_bytes=200_000)
  assert sum(f.endswith(".safetensors") for f in files) > 1  # really sharded
  config = json.loads((out / "config.json").read_text())
  assert config["architectures"] == [type(model).__name__]
  reloaded = transformers.AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager")
  assert type(reloaded) is type(model)
  ids, pos, seg, _ = hf_util.chat_batch(tok)
  assert_close_on_tokens(hf_util.torch_logits(reloaded, ids, pos, seg),
                         hf_util.torch_logits(model, ids, pos, seg), seg)
  # ... and jaxlab reads its own export (of the default, scanned layout) back to the same config.
  assert cfg.scan_layers and hf_config.config_from_hf(out) == cfg.replace(scan_layers=False)
  # Re-exporting into a folder with other weights replaces them all.
  shutil.copytree(path, tmp_path / "copy")
  hf.export_hf(tmp_path / "copy", cfg, merge_lora(trainable, frozen, cfg), dtype="float32")
  assert not os.path.exists(tmp_path / "copy" / "model.safetensors")
  reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "copy",
                                                               attn_implementation="eager")
  assert_close_on_tokens(hf_util.torch_logits(reloaded, ids, pos, seg),
                         hf_util.torch_logits(model, ids, pos, seg), seg)


def test_exported_tokenizer_and_chat_template(ckpt, tmp_path, mesh):
  family, path, _, tok = ckpt
  cfg, trainable, frozen = hf.load_hf(path, mesh)
  hf.export_hf(tmp_path, cfg, trainable, tokenizer_dir=path)
  loaded = hf_tokenizer.load_tokenizer(tmp_path)
  assert loaded.chat_template == tok.chat_template
  eot = "<|eot_id|>" if family.startswith("llama") else "<|im_end|>"
  assert hf_tokenizer.end_of_turn_ids(loaded)[0] == loaded.convert_tokens_to_ids(eot)
  assert hf_tokenizer.pad_id(loaded) == hf_tokenizer.pad_id(tok)
  # The loss mask (jaxlab.data.chat) covers exactly the assistant replies and their end of turn.
  for conv in hf_util.CONVERSATIONS:
    ids, mask = chat.encode_chat(loaded, conv)
    np.testing.assert_array_equal(ids, chat.encode_chat(tok, conv)[0])
    assert loaded.decode(ids[mask]) == conv[-1]["content"] + eot


def test_bf16_stays_bf16_bit_exact(tmp_path, mesh):
  model, _ = hf_util.make_checkpoint("qwen2_untied", tmp_path / "src", dtype=torch.bfloat16)
  cfg, trainable, _ = hf.load_hf(tmp_path / "src", mesh)
  assert cfg.param_dtype == cfg.dtype == "bfloat16"
  assert {x.dtype for x in jax.tree.leaves(trainable)} == {np.dtype(ml_dtypes.bfloat16)}
  q = model.model.layers[1].self_attn.q_proj.weight.detach().float().numpy()
  q_stack = trainable["stacks"][0]["self_attn"]["q_proj"]["kernel"]  # loaded scanned
  np.testing.assert_array_equal(np.asarray(q_stack[1], np.float32), q.T)
  hf.export_hf(tmp_path / "out", cfg, trainable)  # default dtype bfloat16
  src = st_torch.load_file(str(tmp_path / "src" / "model.safetensors"))
  out = {}
  for f in os.listdir(tmp_path / "out"):
    if f.endswith(".safetensors"):
      out.update(st_torch.load_file(str(tmp_path / "out" / f)))
  assert sorted(src) == sorted(out)
  for name, t in src.items():
    assert out[name].dtype == torch.bfloat16 and torch.equal(out[name], t), name


def test_float32_params_export_as_bf16_like_torch(tmp_path, mesh):
  model, _ = hf_util.make_checkpoint("llama_gqa_llama3_rope", tmp_path / "src")
  cfg, trainable, _ = hf.load_hf(tmp_path / "src", mesh)
  hf.export_hf(tmp_path / "out", cfg, trainable)  # default dtype bfloat16
  assert json.loads((tmp_path / "out" / "config.json").read_text())["dtype"] == "bfloat16"
  reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out")
  assert reloaded.dtype == torch.bfloat16
  want = model.to(torch.bfloat16).state_dict()
  for name, t in reloaded.state_dict().items():
    assert torch.equal(t, want[name]), name  # same round-to-nearest-even as torch


def test_dtype_comes_from_tensors_when_config_has_none(tmp_path, mesh):
  hf_util.make_checkpoint("qwen2_tied_bias", tmp_path, dtype=torch.bfloat16)
  config = json.loads((tmp_path / "config.json").read_text())
  config.pop("dtype", None), config.pop("torch_dtype", None)
  (tmp_path / "config.json").write_text(json.dumps(config))
  cfg, trainable, _ = hf.load_hf(tmp_path, mesh)
  assert cfg.param_dtype == "bfloat16"
  assert {x.dtype for x in jax.tree.leaves(trainable)} == {np.dtype(ml_dtypes.bfloat16)}


def test_param_dtype_override_converts_on_load(tmp_path, mesh):
  hf_util.make_checkpoint("qwen2_tied_bias", tmp_path, dtype=torch.bfloat16)
  cfg, trainable, _ = hf.load_hf(tmp_path, mesh, param_dtype="float32")
  assert cfg.param_dtype == cfg.dtype == "float32"
  assert {x.dtype for x in jax.tree.leaves(trainable)} == {np.dtype(np.float32)}


def test_lora_load_freezes_base_and_starts_equal(mesh, tmp_path):
  model, tok = hf_util.make_checkpoint("qwen3_qk_norm", tmp_path)
  lora = LoraConfig(rank=4, alpha=8.0, targets=("q_proj", "down_proj"))
  cfg, trainable, frozen = hf.load_hf(tmp_path, mesh, lora=lora, seed=3)
  assert cfg.lora == lora
  q = trainable["stacks"][0]["self_attn"]["q_proj"]  # loaded scanned: [layers, ...]
  assert set(q) == {"lora_a", "lora_b"} and np.abs(np.asarray(q["lora_a"])).max() > 0
  assert not np.asarray(q["lora_b"]).any()
  assert "kernel" in frozen["stacks"][0]["self_attn"]["q_proj"] and "embed_tokens" in frozen
  # Adapters come from the decoder's own init (same values as init_params with that seed).
  want, _ = init_params(model_spec(cfg), mesh, seed=3)
  jax.tree.map(np.testing.assert_array_equal, trainable, want)
  ids, pos, seg, _ = hf_util.chat_batch(tok)
  assert_close_on_tokens(jax_logits(cfg, trainable, frozen, ids, pos, seg),
                         hf_util.torch_logits(model, ids, pos, seg), seg)


@pytest.mark.parametrize("param_dtype", [None, "bfloat16"])
def test_host_and_device_relayout_are_bit_identical(tmp_path, mesh, param_dtype):
  """NumPy's transpose/cast (the CPU default) equals the jitted on-device one, bit for bit."""
  hf_util.make_checkpoint("llama_gqa_llama3_rope", tmp_path)
  _, host, _ = hf.load_hf(tmp_path, mesh, param_dtype=param_dtype, relayout="host")
  _, device, _ = hf.load_hf(tmp_path, mesh, param_dtype=param_dtype, relayout="device")
  want = np.dtype(param_dtype or "float32")
  assert {x.dtype for x in jax.tree.leaves(host)} == {x.dtype for x in jax.tree.leaves(device)} == {want}
  jax.tree.map(np.testing.assert_array_equal, host, device)
  with pytest.raises(ValueError, match="relayout must be"):
    hf.load_hf(tmp_path, mesh, relayout="gpu")


def test_host_relayout_load_compiles_nothing(tmp_path, mesh):
  """The CPU loader never starts XLA's compiler (its memory would count in the load's peak)."""
  hf_util.make_checkpoint("qwen2_untied", tmp_path, dtype=torch.bfloat16)
  compiles = []
  listener = lambda event, *_, **__: compiles.append(event) if "backend_compile" in event else None
  jax.monitoring.register_event_duration_secs_listener(listener)
  try:
    jax.clear_caches()
    hf.load_hf(tmp_path, mesh, param_dtype="float32", relayout="device")  # this path compiles
    assert compiles, "no compile event seen: the probe is broken"
    compiles.clear()
    _, params, _ = hf.load_hf(tmp_path, mesh, param_dtype="float32")  # auto: host on CPU
    jax.block_until_ready(params)
    assert not compiles, compiles
  finally:
    jax.monitoring.unregister_event_duration_listener(listener)


def test_sharded_checkpoint_with_index(tmp_path, mesh):
  hf_util.make_checkpoint("llama_gqa_llama3_rope", tmp_path / "one")
  hf_util.make_checkpoint("llama_gqa_llama3_rope", tmp_path / "many", max_shard_size="100KB")
  assert os.path.exists(tmp_path / "many" / safetensors_io.INDEX_FILE)
  _, one, _ = hf.load_hf(tmp_path / "one", mesh)
  _, many, _ = hf.load_hf(tmp_path / "many", mesh)
  jax.tree.map(np.testing.assert_array_equal, one, many)


@pytest.mark.parametrize("scan", [False, True], ids=["unrolled", "scanned"])
@pytest.mark.parametrize("lora", [None, LoraConfig(rank=2, layers=(1,))])
def test_base_layout_equals_model_spec(lora, scan):
  cfg = hf_config.config_from_hf(hf_util.FAMILIES["qwen3_qk_norm"][0](
      **{**hf_util.SMALL, "num_hidden_layers": 3}, head_dim=32).to_dict()).replace(
          lora=lora, scan_layers=scan)
  spec = model_spec(cfg)
  base = 1 if lora else 0
  abstract, axes = hf.base_layout(cfg)
  assert abstract == traversals.flatten_mapping(spec.abstract[base])
  assert axes == traversals.flatten_mapping(spec.axes[base], is_leaf=lambda _, x: isinstance(x, tuple))


def test_reader_matches_safetensors_library(tmp_path):
  hf_util.make_checkpoint("qwen2_tied_bias", tmp_path, dtype=torch.bfloat16)
  ref = st_torch.load_file(str(tmp_path / "model.safetensors"))
  infos = safetensors_io.checkpoint_tensors(str(tmp_path))
  assert sorted(infos) == sorted(ref)
  for name, info in infos.items():
    want = ref[name].float().numpy()
    np.testing.assert_array_equal(safetensors_io.read_rows(info, 0, info.shape[0]).astype(np.float32), want)
    np.testing.assert_array_equal(safetensors_io.read_rows(info, 1, 3).astype(np.float32), want[1:3])


def test_eight_device_mesh_matches_one_device(tmp_path):
  """Runs in a subprocess: the fake 8-device CPU platform must be set before jax starts."""
  hf_util.make_checkpoint("qwen2_tied_bias", tmp_path / "qwen2", max_shard_size="100KB")
  hf_util.make_checkpoint("qwen3_qk_norm", tmp_path / "qwen3")
  env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
  proc = subprocess.run([sys.executable, os.path.join(ROOT, "tests", "hf_sharded_check.py"),
                         str(tmp_path / "qwen2"), str(tmp_path / "qwen3")],
                        capture_output=True, text=True, env=env, timeout=300)
  assert proc.returncode == 0, proc.stdout + proc.stderr
  assert "ALL OK" in proc.stdout


# ------------------------------------------------------------------------------------- errors

def _rewrite(path, fn):
  file = str(path / "model.safetensors")
  tensors = st_torch.load_file(file)
  fn(tensors)
  st_torch.save_file(tensors, file, metadata={"format": "pt"})


@pytest.mark.parametrize("edit, message", [
    (lambda t: t.pop("model.layers.1.mlp.up_proj.weight"),
     "missing tensor(s) ['model.layers.1.mlp.up_proj.weight']"),
    (lambda t: t.update({"model.layers.0.mlp.extra.weight": torch.zeros(2)}),
     "unexpected tensor(s) ['model.layers.0.mlp.extra.weight']"),
    (lambda t: t.update({"model.layers.0.self_attn.k_proj.weight": torch.zeros(16, 64)}),
     "tensor 'model.layers.0.self_attn.k_proj.weight' has shape (16, 64), expected (32, 64)"),
], ids=["missing", "unexpected", "wrong_shape"])
def test_bad_checkpoint_errors_name_the_tensor(tmp_path, mesh, edit, message):
  hf_util.make_checkpoint("qwen2_tied_bias", tmp_path)
  _rewrite(tmp_path, edit)
  with pytest.raises(ValueError) as e:
    hf.load_hf(tmp_path, mesh)
  assert message in str(e.value)


def test_lm_head_in_tied_checkpoint_is_ignored_but_required_when_untied(tmp_path, mesh):
  hf_util.make_checkpoint("qwen2_tied_bias", tmp_path / "tied")
  _rewrite(tmp_path / "tied", lambda t: t.update({"lm_head.weight": t["model.embed_tokens.weight"].clone()}))
  hf.load_hf(tmp_path / "tied", mesh)
  hf_util.make_checkpoint("qwen2_untied", tmp_path / "untied")
  _rewrite(tmp_path / "untied", lambda t: t.pop("lm_head.weight"))
  with pytest.raises(ValueError, match=r"missing tensor\(s\) \['lm_head.weight'\]"):
    hf.load_hf(tmp_path / "untied", mesh)


def test_missing_weights_file(tmp_path, mesh):
  hf_util.make_checkpoint("qwen2_tied_bias", tmp_path)
  os.remove(tmp_path / "model.safetensors")
  with pytest.raises(FileNotFoundError, match="model.safetensors"):
    hf.load_hf(tmp_path, mesh)


QWEN2 = dict(architectures=["Qwen2ForCausalLM"], model_type="qwen2", vocab_size=64, hidden_size=32,
             intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
LLAMA = {**QWEN2, "architectures": ["LlamaForCausalLM"], "model_type": "llama"}


@pytest.mark.parametrize("config, field", [
    ({**QWEN2, "architectures": ["MistralForCausalLM"]}, "architectures"),
    ({**QWEN2, "model_type": "llama"}, "model_type"),
    ({**QWEN2, "hidden_act": "gelu"}, "hidden_act"),
    ({**QWEN2, "use_sliding_window": True, "sliding_window": 4096}, "use_sliding_window"),
    ({**QWEN2, "layer_types": ["full_attention", "sliding_attention"]}, "layer_types"),
    ({**LLAMA, "mlp_bias": True}, "mlp_bias"),
    ({**LLAMA, "attention_bias": True}, "attention_bias"),
    ({**LLAMA, "rope_parameters": {"rope_type": "yarn", "factor": 4.0}}, "rope_parameters.rope_type"),
    ({**LLAMA, "rope_scaling": {"type": "dynamic", "factor": 2.0}}, "rope_scaling.rope_type"),
    ({**LLAMA, "partial_rotary_factor": 0.5}, "partial_rotary_factor"),
    ({**LLAMA, "torch_dtype": "float8_e4m3fn"}, "dtype"),
    ({**LLAMA, "quantization_config": {"quant_method": "awq"}}, "quantization_config"),
])
def test_unsupported_config_field_is_named(config, field):
  with pytest.raises(ValueError, match=f"unsupported Hugging Face config field {field}="):
    hf_config.config_from_hf(config)


def test_export_rejects_unmerged_lora_params(tmp_path, mesh):
  hf_util.make_checkpoint("qwen2_tied_bias", tmp_path / "src")
  cfg, trainable, frozen = hf.load_hf(tmp_path / "src", mesh, lora=LoraConfig(rank=2))
  with pytest.raises(ValueError, match="merge LoRA first"):
    hf.export_hf(tmp_path / "out", cfg, {**frozen, **trainable})


# ------------------------------------------------------------------------- configs and presets

# Published config.json files (transformers 4.x layout), as on the HF hub.
QWEN25_05B_INSTRUCT = {
    "architectures": ["Qwen2ForCausalLM"], "attention_dropout": 0.0, "bos_token_id": 151643,
    "eos_token_id": 151645, "hidden_act": "silu", "hidden_size": 896, "initializer_range": 0.02,
    "intermediate_size": 4864, "max_position_embeddings": 32768, "max_window_layers": 21,
    "model_type": "qwen2", "num_attention_heads": 14, "num_hidden_layers": 24,
    "num_key_value_heads": 2, "rms_norm_eps": 1e-06, "rope_theta": 1000000.0,
    "sliding_window": 32768, "tie_word_embeddings": True, "torch_dtype": "bfloat16",
    "transformers_version": "4.43.1", "use_cache": True, "use_sliding_window": False,
    "vocab_size": 151936}
LLAMA31_8B_INSTRUCT = {
    "architectures": ["LlamaForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
    "bos_token_id": 128000, "eos_token_id": [128001, 128008, 128009], "hidden_act": "silu",
    "hidden_size": 4096, "initializer_range": 0.02, "intermediate_size": 14336,
    "max_position_embeddings": 131072, "mlp_bias": False, "model_type": "llama",
    "num_attention_heads": 32, "num_hidden_layers": 32, "num_key_value_heads": 8,
    "pretraining_tp": 1, "rms_norm_eps": 1e-05,
    "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                     "original_max_position_embeddings": 8192, "rope_type": "llama3"},
    "rope_theta": 500000.0, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
    "transformers_version": "4.43.0.dev0", "use_cache": True, "vocab_size": 128256}
QWEN3_06B = {
    "architectures": ["Qwen3ForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
    "bos_token_id": 151643, "eos_token_id": 151645, "head_dim": 128, "hidden_act": "silu",
    "hidden_size": 1024, "initializer_range": 0.02, "intermediate_size": 3072,
    "max_position_embeddings": 40960, "max_window_layers": 28, "model_type": "qwen3",
    "num_attention_heads": 16, "num_hidden_layers": 28, "num_key_value_heads": 8,
    "rms_norm_eps": 1e-06, "rope_scaling": None, "rope_theta": 1000000, "sliding_window": None,
    "tie_word_embeddings": True, "torch_dtype": "bfloat16", "transformers_version": "4.51.0",
    "use_cache": True, "use_sliding_window": False, "vocab_size": 151936}


@pytest.mark.parametrize("config, preset", [
    (QWEN25_05B_INSTRUCT, "Qwen/Qwen2.5-0.5B-Instruct"),
    (LLAMA31_8B_INSTRUCT, "meta-llama/Llama-3.1-8B-Instruct"),
    (QWEN3_06B, "qwen3-0.6b")])
def test_published_configs_map_to_presets(config, preset):
  assert hf_config.config_from_hf(config) == presets.get_preset(preset)


def test_preset_sizes_match_published_counts():
  assert num_params(presets.get_preset("qwen2.5-0.5b")) == 494_032_768
  assert num_params(presets.get_preset("qwen2.5-7b")) == 7_615_616_512
  assert num_params(presets.get_preset("llama-3.1-8b")) == 8_030_261_248
  for name in presets.PRESETS:
    hf_config.config_to_hf(presets.get_preset(name))  # every preset is exportable
  # A recipe's model group from a preset: its architecture, the rest the recipe's own.
  arch = presets.architecture("qwen2.5-7b")
  assert tuple(arch) == presets.ARCHITECTURE and arch["qkv_bias"] and arch["n_kv_heads"] == 4
  assert presets.get_preset("qwen2.5-7b") == ModelConfig(**arch, dtype="bfloat16",
                                                         param_dtype="bfloat16")


@pytest.mark.parametrize("family", sorted(hf_util.FAMILIES))
def test_config_round_trip_through_transformers(family, tmp_path):
  config_cls, _, kw, _ = hf_util.FAMILIES[family]
  cfg = hf_config.config_from_hf(config_cls(**hf_util.SMALL, **kw).to_dict())
  # transformers 5 parses our config.json (4.x and 5.x keys) back to the same model.
  parsed = transformers.AutoConfig.for_model(**{k: v for k, v in hf_config.config_to_hf(cfg).items()
                                                if k != "model_type"}, model_type=hf_config.family_of(cfg))
  assert hf_config.config_from_hf(parsed.to_dict()).replace(dtype="float32", param_dtype="float32") == \
      cfg.replace(dtype="float32", param_dtype="float32")


def test_memory_cli(capsys):
  memory.main(["--preset", "qwen2.5-7b", "--mesh", "1,8,1", "--lora-rank", "32"])
  out = capsys.readouterr().out
  assert "7,615,616,512" in out and "LoRA r=32 (80,740,352 adapter params)" in out
  fp = memory.footprint(presets.get_preset("qwen2.5-7b"), (1, 8, 1))
  norms, biases = (2 * 28 + 1) * 3584, 28 * (3584 + 2 * 512)  # replicated on (1, 8, 1)
  assert fp.base_per_device == (fp.base - norms - biases) // 8 + norms + biases
  fp = memory.footprint(presets.get_preset("qwen2.5-7b", lora=LoraConfig(rank=1, layers=(3,),
                                                                         targets=("down_proj",))), (1, 1, 1))
  assert fp.lora == 18944 + 3584  # rank-1 model organism: one layer's down_proj
