"""Model configuration for the Llama / Qwen2 / Qwen3 decoder family."""
from __future__ import annotations

import dataclasses
from typing import Any

# Names of jaxlab.models.decoder.REMAT_POLICIES, plus "none".
REMAT_POLICY_NAMES = ("none", "full", "dots", "dots_no_batch", "save_qkvo")


@dataclasses.dataclass(frozen=True)
class LoraConfig:
  """Low-rank adapters on linear layers whose name matches one of `targets`.

  `targets` are regular expressions searched in the module path (for example
  "down_proj" or "(q|k|v|o)_proj"); `layers` restricts adapters to those layer
  indices (None = all). rsLoRA scales by alpha/sqrt(rank) instead of alpha/rank.
  """
  rank: int = 8
  alpha: float = 16.0
  rslora: bool = False
  targets: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj",
                              "gate_proj", "up_proj", "down_proj")
  layers: tuple[int, ...] | None = None

  @property
  def scale(self) -> float:
    return self.alpha / (self.rank ** 0.5 if self.rslora else self.rank)


# The layout a model takes when config key model.scan_layers is None / "auto" (`resolve_layout`):
# HF checkpoints of the Llama / Qwen family have identical layers, so they load as one stack
# under lax.scan (a 30-layer model's sampler and train step compile in seconds, flat in depth);
# a fresh init stays unrolled (the tiny CPU models: a few layers, where unrolled steps run
# faster); a jaxlab workdir keeps the layout it was saved in.
HF_SCANNED = True
FRESH_SCANNED = False
AUTO = (None, "auto")


def resolve_layout(scan_layers: bool | str | None, *, own: bool) -> bool:
  """The layout (True: scanned) that config key model.scan_layers asks of a model: True or
  False as given; None or "auto": `own`, its source's (HF_SCANNED for an HF folder, the saved
  layout for a jaxlab workdir, FRESH_SCANNED for a fresh init)."""
  if scan_layers in AUTO:
    return bool(own)
  if isinstance(scan_layers, bool):
    return scan_layers
  raise ValueError(f"config key model.scan_layers={scan_layers!r}: expected True, False or "
                   "None / 'auto' (HF folders scanned, workdirs as saved, fresh models unrolled)")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Sizes and switches of a decoder-only LM; HF field names in comments."""
  vocab_size: int
  d_model: int            # hidden_size
  n_layers: int           # num_hidden_layers
  n_heads: int            # num_attention_heads
  n_kv_heads: int         # num_key_value_heads
  d_ff: int               # intermediate_size
  head_dim: int | None = None  # defaults to d_model // n_heads
  rope_theta: float = 10000.0
  # None | "linear" | "llama3"; the factors below follow HF's rope_parameters.
  rope_scaling: str | None = None
  rope_factor: float = 1.0
  rope_low_freq_factor: float = 1.0
  rope_high_freq_factor: float = 4.0
  rope_original_max_position: int = 8192
  max_position: int = 4096
  norm_eps: float = 1e-6  # rms_norm_eps
  qkv_bias: bool = False  # Qwen2
  qk_norm: bool = False   # Qwen3
  tie_embeddings: bool = False
  dtype: str = "float32"        # compute dtype
  param_dtype: str = "float32"  # storage dtype
  # Storage dtype of the trainable params (hence of the optimizer moments); None = param_dtype.
  # Training configs set "float32": bf16 adapters/master weights round small updates to nothing.
  trainable_dtype: str | None = None
  remat: bool = False  # the old switch: remat_policy "full" (True) or "none" (False)
  # What the backward pass keeps of each block (decoder.REMAT_POLICIES); "" = from `remat`.
  remat_policy: str = ""
  # Layers as stacked params under lax.scan: compile time independent of depth (decoder.py).
  # Config key model.scan_layers may also be None / "auto": see `resolve_layout`.
  scan_layers: bool = False
  lora: LoraConfig | None = None
  # A steered model (jaxlab.models.steering): the block of this layer adds a constant vector
  # (param `layers/L/mlp/steer`, [D]) to the residual stream after its MLP; -1 = none.
  steer_layer: int = -1

  def __post_init__(self):
    if self.remat_policy and self.remat_policy not in REMAT_POLICY_NAMES:
      raise ValueError(f"config key model.remat_policy={self.remat_policy!r} is not one of "
                       f"{REMAT_POLICY_NAMES}")
    if not -1 <= self.steer_layer < self.n_layers:
      raise ValueError(f"config key model.steer_layer={self.steer_layer} is not a layer of "
                       f"the model's {self.n_layers} (or -1: no steering vector)")

  @property
  def remat_mode(self) -> str:
    """The remat policy in force: `remat_policy`, else "full" / "none" from `remat`."""
    if self.remat_policy:
      return self.remat_policy
    return "full" if self.remat else "none"

  @property
  def dim_per_head(self) -> int:
    return self.head_dim or self.d_model // self.n_heads

  def replace(self, **kw: Any) -> "ModelConfig":
    return dataclasses.replace(self, **kw)

  @classmethod
  def from_dict(cls, d: dict[str, Any]) -> "ModelConfig":
    """Builds a config from a (ml_collections) dict; unknown keys are errors.

    scan_layers None / "auto" becomes a fresh model's layout (unrolled): loaders of HF folders
    and workdirs resolve it first (`resolve_layout`).
    """
    d = dict(d)
    if "scan_layers" in d:
      d["scan_layers"] = resolve_layout(d["scan_layers"], own=FRESH_SCANNED)
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - fields)
    if unknown:
      raise ValueError(f"unknown model config keys: {unknown}; known: {sorted(fields)}")
    lora = d.pop("lora", None)
    if lora is not None and not isinstance(lora, LoraConfig):
      lora = dict(lora)
      if not lora.pop("enabled", True):
        lora = None
      else:
        for k in ("targets", "layers"):
          if lora.get(k) is not None:
            lora[k] = tuple(lora[k])
        lora = LoraConfig(**lora)
    return cls(lora=lora, **d)


def num_params(cfg: ModelConfig) -> int:
  """Parameter count of the base model (no LoRA; a steering vector counts)."""
  h = cfg.dim_per_head
  attn = cfg.d_model * h * (2 * cfg.n_heads + 2 * cfg.n_kv_heads)
  if cfg.qkv_bias:
    attn += h * (cfg.n_heads + 2 * cfg.n_kv_heads)
  if cfg.qk_norm:
    attn += 2 * h
  mlp = 3 * cfg.d_model * cfg.d_ff
  layer = attn + mlp + 2 * cfg.d_model
  emb = cfg.vocab_size * cfg.d_model * (1 if cfg.tie_embeddings else 2)
  steer = cfg.d_model if cfg.steer_layer >= 0 else 0
  return cfg.n_layers * layer + emb + cfg.d_model + steer


def flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
  """Training FLOPs per token (forward+backward = 3x forward), PaLM appendix B."""
  n = num_params(cfg) - cfg.vocab_size * cfg.d_model * (0 if cfg.tie_embeddings else 1)
  attn = 2 * cfg.n_layers * seq_len * cfg.n_heads * cfg.dim_per_head  # QK^T and AV, causal not halved
  return 6.0 * n + 6.0 * attn
