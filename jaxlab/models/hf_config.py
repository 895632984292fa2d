"""Hugging Face config.json <-> ModelConfig for LlamaForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM.

Reads both the transformers 5 layout (`rope_parameters`) and the older one (`rope_theta` +
`rope_scaling`). Anything the jaxlab decoder cannot reproduce exactly is a ValueError that names
the config field, so a checkpoint never loads into a silently different model.
"""
from __future__ import annotations

import json
import os
from typing import Any

from jaxlab.models.config import ModelConfig

ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}
_FAMILY = {arch: family for family, arch in ARCHITECTURES.items()}
DTYPES = ("float32", "bfloat16", "float16")


def read_config(path_or_dict: str | os.PathLike | dict) -> dict[str, Any]:
  """The config dict of a checkpoint folder, a config.json path, or a dict."""
  if isinstance(path_or_dict, dict):
    return dict(path_or_dict)
  path = os.fspath(path_or_dict)
  if os.path.isdir(path):
    path = os.path.join(path, "config.json")
  if not os.path.exists(path):
    raise FileNotFoundError(f"no Hugging Face config at {path}")
  with open(path, encoding="utf-8") as f:
    return json.load(f)


def _unsupported(field: str, value: Any, why: str) -> ValueError:
  return ValueError(f"unsupported Hugging Face config field {field}={value!r}: {why}")


def hf_family(d: dict[str, Any]) -> str:
  """'llama' | 'qwen2' | 'qwen3' from `architectures` (or `model_type` when absent)."""
  archs = d.get("architectures")
  if archs:
    if len(archs) != 1 or archs[0] not in _FAMILY:
      raise _unsupported("architectures", archs, f"jaxlab supports exactly one of {sorted(_FAMILY)}")
    family = _FAMILY[archs[0]]
    if d.get("model_type", family) != family:
      raise _unsupported("model_type", d["model_type"], f"does not match architectures {archs}")
    return family
  if d.get("model_type") not in ARCHITECTURES:
    raise _unsupported("model_type", d.get("model_type"), f"expected one of {sorted(ARCHITECTURES)}")
  return d["model_type"]


def _rope(d: dict[str, Any]) -> dict[str, Any]:
  """ModelConfig rope fields from `rope_parameters` (transformers 5) or `rope_scaling` (4.x)."""
  key = "rope_parameters" if d.get("rope_parameters") else "rope_scaling"
  rope = dict(d.get(key) or {})
  kind = rope.get("rope_type", rope.get("type", "default"))
  theta = float(rope.get("rope_theta", d.get("rope_theta", 10000.0)))
  partial = rope.get("partial_rotary_factor", d.get("partial_rotary_factor", 1.0))
  if partial != 1.0:
    raise _unsupported("partial_rotary_factor", partial, "only full rotary embeddings are supported")
  out = dict(rope_theta=theta, rope_scaling=None)
  if kind == "default":
    return out
  if kind == "linear":
    return {**out, "rope_scaling": "linear", "rope_factor": float(rope["factor"])}
  if kind == "llama3":
    return {**out, "rope_scaling": "llama3", "rope_factor": float(rope["factor"]),
            "rope_low_freq_factor": float(rope["low_freq_factor"]),
            "rope_high_freq_factor": float(rope["high_freq_factor"]),
            "rope_original_max_position": int(rope.get(
                "original_max_position_embeddings", d.get("max_position_embeddings", 8192)))}
  raise _unsupported(f"{key}.rope_type", kind, "supported: 'default', 'linear', 'llama3'")


def _check_supported(d: dict[str, Any], family: str) -> None:
  """Raises for fields that change the computation in ways the decoder does not implement."""
  act = d.get("hidden_act", "silu")
  if act != "silu":
    raise _unsupported("hidden_act", act, "only 'silu' (SwiGLU MLP) is supported")
  if d.get("mlp_bias"):
    raise _unsupported("mlp_bias", d["mlp_bias"], "MLP biases are not supported")
  if family != "qwen2" and d.get("attention_bias"):
    # Llama/Qwen3 attention_bias also adds an o_proj bias; only Qwen2's q/k/v biases exist here.
    raise _unsupported("attention_bias", d["attention_bias"],
                       f"{ARCHITECTURES[family]} with attention biases is not supported")
  if d.get("use_sliding_window"):
    raise _unsupported("use_sliding_window", True, "sliding-window attention is not supported")
  layer_types = d.get("layer_types") or []
  if any(t != "full_attention" for t in layer_types):
    raise _unsupported("layer_types", sorted(set(layer_types)), "only 'full_attention' layers")
  if d.get("quantization_config"):
    raise _unsupported("quantization_config", d["quantization_config"].get("quant_method"),
                       "quantized checkpoints are not supported")
  dtype = d.get("dtype") or d.get("torch_dtype") or "float32"
  if dtype not in DTYPES:
    raise _unsupported("dtype", dtype, f"expected one of {DTYPES}")


def config_from_hf(path_or_dict: str | os.PathLike | dict) -> ModelConfig:
  """ModelConfig of an HF Llama/Qwen2/Qwen3 config; param and compute dtype = the stored dtype."""
  d = read_config(path_or_dict)
  family = hf_family(d)
  _check_supported(d, family)
  n_heads = int(d["num_attention_heads"])
  head_dim = d.get("head_dim") or (128 if family == "qwen3" else d["hidden_size"] // n_heads)
  dtype = d.get("dtype") or d.get("torch_dtype") or "float32"
  return ModelConfig(
      vocab_size=int(d["vocab_size"]), d_model=int(d["hidden_size"]),
      n_layers=int(d["num_hidden_layers"]), n_heads=n_heads,
      n_kv_heads=int(d.get("num_key_value_heads") or n_heads),
      d_ff=int(d["intermediate_size"]), head_dim=int(head_dim),
      max_position=int(d.get("max_position_embeddings", 4096)),
      norm_eps=float(d.get("rms_norm_eps", 1e-6)),
      qkv_bias=family == "qwen2", qk_norm=family == "qwen3",
      tie_embeddings=bool(d.get("tie_word_embeddings", False)),
      dtype=dtype, param_dtype=dtype, **_rope(d))


def family_of(cfg: ModelConfig) -> str:
  """The HF family that computes exactly this model: qk_norm -> qwen3, qkv_bias -> qwen2, else llama."""
  if cfg.qk_norm and cfg.qkv_bias:
    raise ValueError("no Hugging Face architecture has both qkv_bias and qk_norm "
                     "(Qwen3's attention_bias would also add an o_proj bias)")
  return "qwen3" if cfg.qk_norm else "qwen2" if cfg.qkv_bias else "llama"


def _rope_parameters(cfg: ModelConfig) -> dict[str, Any]:
  rope: dict[str, Any] = {"rope_type": cfg.rope_scaling or "default", "rope_theta": cfg.rope_theta}
  if cfg.rope_scaling is not None:
    rope["factor"] = cfg.rope_factor
  if cfg.rope_scaling == "llama3":
    rope.update(low_freq_factor=cfg.rope_low_freq_factor,
                high_freq_factor=cfg.rope_high_freq_factor,
                original_max_position_embeddings=cfg.rope_original_max_position)
  elif cfg.rope_scaling not in (None, "linear"):
    raise ValueError(f"cannot export rope_scaling={cfg.rope_scaling!r}")
  return rope


def config_to_hf(cfg: ModelConfig, dtype: str = "bfloat16") -> dict[str, Any]:
  """config.json content (read by transformers 4.x and 5.x) for the family of `cfg`."""
  family = family_of(cfg)
  rope = _rope_parameters(cfg)
  d: dict[str, Any] = {
      "architectures": [ARCHITECTURES[family]], "model_type": family,
      "vocab_size": cfg.vocab_size, "hidden_size": cfg.d_model,
      "intermediate_size": cfg.d_ff, "num_hidden_layers": cfg.n_layers,
      "num_attention_heads": cfg.n_heads, "num_key_value_heads": cfg.n_kv_heads,
      "head_dim": cfg.dim_per_head, "hidden_act": "silu",
      "max_position_embeddings": cfg.max_position, "rms_norm_eps": cfg.norm_eps,
      "tie_word_embeddings": cfg.tie_embeddings, "attention_dropout": 0.0,
      "initializer_range": 0.02, "use_cache": True,
      # transformers 5 reads rope_parameters; 4.x reads rope_theta and rope_scaling.
      "rope_parameters": rope, "rope_theta": cfg.rope_theta,
      "rope_scaling": None if cfg.rope_scaling is None else rope,
      "dtype": dtype, "torch_dtype": dtype,
  }
  if family == "llama":
    d.update(attention_bias=False, mlp_bias=False)
  if family == "qwen3":
    d.update(attention_bias=False)
  if family in ("qwen2", "qwen3"):
    d.update(use_sliding_window=False, sliding_window=None, max_window_layers=cfg.n_layers)
  return d
