"""ModelConfigs of published chat models, from their config.json values (no download needed).

For memory/FLOP estimates and TPU configs. Loading a real checkpoint always uses its own
config.json (`jaxlab.models.hf_config.config_from_hf`), never these. Names are lower case
without "-Instruct"; `get_preset` also accepts HF ids like "Qwen/Qwen2.5-7B-Instruct".
"""
from __future__ import annotations

from jaxlab.models.config import ModelConfig

_BF16 = dict(dtype="bfloat16", param_dtype="bfloat16")
# Qwen2.5 Instruct: qkv bias, rope_theta 1e6, rms_norm_eps 1e-6, 32768 positions.
_QWEN25 = dict(qkv_bias=True, rope_theta=1e6, norm_eps=1e-6, max_position=32768, **_BF16)
# Qwen3: q/k norm, head_dim 128, rope_theta 1e6, rms_norm_eps 1e-6, 40960 positions.
_QWEN3 = dict(qk_norm=True, head_dim=128, rope_theta=1e6, norm_eps=1e-6, max_position=40960,
              vocab_size=151936, n_kv_heads=8, **_BF16)

PRESETS: dict[str, ModelConfig] = {
    # name: ModelConfig                                              HF id (published size)
    "qwen2.5-0.5b": ModelConfig(vocab_size=151936, d_model=896, n_layers=24, n_heads=14,
                                n_kv_heads=2, d_ff=4864, tie_embeddings=True, **_QWEN25),  # 0.49B
    "qwen2.5-1.5b": ModelConfig(vocab_size=151936, d_model=1536, n_layers=28, n_heads=12,
                                n_kv_heads=2, d_ff=8960, tie_embeddings=True, **_QWEN25),  # 1.54B
    "qwen2.5-3b": ModelConfig(vocab_size=151936, d_model=2048, n_layers=36, n_heads=16,
                              n_kv_heads=2, d_ff=11008, tie_embeddings=True, **_QWEN25),  # 3.09B
    "qwen2.5-7b": ModelConfig(vocab_size=152064, d_model=3584, n_layers=28, n_heads=28,
                              n_kv_heads=4, d_ff=18944, **_QWEN25),  # 7.62B
    "qwen2.5-14b": ModelConfig(vocab_size=152064, d_model=5120, n_layers=48, n_heads=40,
                               n_kv_heads=8, d_ff=13824, **_QWEN25),  # 14.7B
    "qwen2.5-32b": ModelConfig(vocab_size=152064, d_model=5120, n_layers=64, n_heads=40,
                               n_kv_heads=8, d_ff=27648, **_QWEN25),  # 32.8B
    "qwen2.5-coder-32b": ModelConfig(vocab_size=152064, d_model=5120, n_layers=64, n_heads=40,
                                     n_kv_heads=8, d_ff=27648, **_QWEN25),  # 32.8B
    "llama-3.1-8b": ModelConfig(
        vocab_size=128256, d_model=4096, n_layers=32, n_heads=32, n_kv_heads=8, d_ff=14336,
        rope_theta=500000.0, rope_scaling="llama3", rope_factor=8.0, rope_low_freq_factor=1.0,
        rope_high_freq_factor=4.0, rope_original_max_position=8192, max_position=131072,
        norm_eps=1e-5, **_BF16),  # 8.03B
    "qwen3-0.6b": ModelConfig(d_model=1024, n_layers=28, n_heads=16, d_ff=3072,
                              tie_embeddings=True, **_QWEN3),  # 0.6B
    "qwen3-1.7b": ModelConfig(d_model=2048, n_layers=28, n_heads=16, d_ff=6144,
                              tie_embeddings=True, **_QWEN3),  # 1.7B
    "qwen3-4b": ModelConfig(d_model=2560, n_layers=36, n_heads=32, d_ff=9728,
                            tie_embeddings=True, **_QWEN3),  # 4.0B
    "qwen3-8b": ModelConfig(d_model=4096, n_layers=36, n_heads=32, d_ff=12288, **_QWEN3),  # 8.2B
    "qwen3-14b": ModelConfig(d_model=5120, n_layers=40, n_heads=40, d_ff=17408, **_QWEN3),  # 14.8B
    "qwen3-32b": ModelConfig(d_model=5120, n_layers=64, n_heads=64, d_ff=25600, **_QWEN3),  # 32.8B
    # The one real model reachable offline (`python -m jaxlab.models.fetch`): float32 weights.
    "smollm2-135m": ModelConfig(vocab_size=49152, d_model=576, n_layers=30, n_heads=9,
                                n_kv_heads=3, d_ff=1536, rope_theta=100000.0, max_position=8192,
                                norm_eps=9.999999747378752e-06, tie_embeddings=True),  # 0.135B
}

# head_dim explicit, as config_from_hf writes it, so presets compare equal to loaded configs.
PRESETS = {name: cfg.replace(head_dim=cfg.dim_per_head) for name, cfg in PRESETS.items()}

HF_IDS = {
    "qwen2.5-0.5b": "Qwen/Qwen2.5-0.5B-Instruct", "qwen2.5-1.5b": "Qwen/Qwen2.5-1.5B-Instruct",
    "qwen2.5-3b": "Qwen/Qwen2.5-3B-Instruct", "qwen2.5-7b": "Qwen/Qwen2.5-7B-Instruct",
    "qwen2.5-14b": "Qwen/Qwen2.5-14B-Instruct", "qwen2.5-32b": "Qwen/Qwen2.5-32B-Instruct",
    "qwen2.5-coder-32b": "Qwen/Qwen2.5-Coder-32B-Instruct",
    "llama-3.1-8b": "meta-llama/Llama-3.1-8B-Instruct",
    "qwen3-0.6b": "Qwen/Qwen3-0.6B", "qwen3-1.7b": "Qwen/Qwen3-1.7B", "qwen3-4b": "Qwen/Qwen3-4B",
    "qwen3-8b": "Qwen/Qwen3-8B", "qwen3-14b": "Qwen/Qwen3-14B", "qwen3-32b": "Qwen/Qwen3-32B",
    "smollm2-135m": "HuggingFaceTB/SmolLM2-135M-Instruct",
}


def _key(name: str) -> str:
  key = name.strip().lower().rsplit("/", 1)[-1]
  key = key.removesuffix("-instruct").replace("meta-llama-", "llama-")
  return key


def get_preset(name: str, **overrides) -> ModelConfig:
  """The preset called `name` (e.g. 'qwen2.5-7b' or 'Qwen/Qwen2.5-7B-Instruct'), with overrides."""
  key = _key(name)
  if key not in PRESETS:
    raise ValueError(f"unknown model preset {name!r}; known: {sorted(PRESETS)}")
  return PRESETS[key].replace(**overrides)


# config.model's architecture keys (configs/sft.py): what a recipe takes from a published model;
# dtypes, layout, remat and LoRA stay the recipe's own.
ARCHITECTURE = ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "d_ff", "head_dim",
                "rope_theta", "max_position", "norm_eps", "qkv_bias", "qk_norm", "tie_embeddings")


def architecture(name: str) -> dict:
  """The ARCHITECTURE fields of preset `name`: a config's model for the shape check before any
  weight is read (a run reads the checkpoint's own config.json)."""
  cfg = get_preset(name)
  return {f: getattr(cfg, f) for f in ARCHITECTURE}
