"""Decoder-only LM of the Llama / Qwen2 / Qwen3 family as Flax NNX modules.

Every parameter carries `axes`: one logical axis name per dimension. The
sharding layer (`jaxlab.sharding`) maps these names to mesh axes with rules
from the config, so the model code never mentions a mesh.

Layers are either a list of `Block`s (`layers/3/...`) or, with `cfg.scan_layers`, stacks of
blocks whose params carry a leading "layers" axis (`stacks/0/...`), applied with `lax.scan`
so tracing and compile time stop growing with depth (see `layer_runs`).

Shapes in names: B batch, L length, D d_model, H heads, K kv heads, G = H/K,
E head dim, F d_ff, V vocab, N layers of a stack.
"""
from __future__ import annotations

import math
import re

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from jaxlab.models.config import LoraConfig, ModelConfig

# model.remat_policy -> what the backward pass keeps of a block's forward (the rest is
# recomputed); "none" = no remat. "save_qkvo" keeps the attention inputs and output named
# in `Attention`, so only the MLP and the projections' inputs are recomputed.
REMAT_POLICIES = {
    "full": None,  # keep only the block's input
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "save_qkvo": jax.checkpoint_policies.save_only_these_names("q", "k", "v", "o"),
}

NEG_INF = -1e30  # finite, so fully-masked (padding) rows stay NaN-free
_CAUSAL_BLOCK = 128  # query block of Attention.attend_causal


def _expand(v: jax.Array, ndim: int) -> jax.Array:
  """[N] -> [1, ..., 1, N] with `ndim` dims (explicit broadcasting)."""
  return v.reshape((1,) * (ndim - 1) + v.shape)


def _init(std: float):
  return jax.nn.initializers.normal(stddev=std)


class Linear(nnx.Module):
  """y = x @ W (+ b), optionally with a LoRA adapter y += s * (x @ A) @ B."""

  def __init__(self, d_in: int, d_out: int, axes: tuple[str, str], *, bias: bool,
               cfg: ModelConfig, lora: LoraConfig | None, rngs: nnx.Rngs):
    pdt = jnp.dtype(cfg.param_dtype)
    self.dtype = jnp.dtype(cfg.dtype)
    self.kernel = nnx.Param(_init(0.02)(rngs.params(), (d_in, d_out), pdt), axes=axes)
    self.bias = nnx.Param(jnp.zeros((d_out,), pdt), axes=axes[1:]) if bias else None
    self.lora_scale = None
    if lora is not None:
      # A ~ Kaiming-uniform like PEFT, B = 0 so the adapted model starts equal to the base.
      bound = 1.0 / math.sqrt(d_in)
      a = jax.random.uniform(rngs.params(), (d_in, lora.rank), pdt, -bound, bound)
      self.lora_a = nnx.LoRAParam(a, axes=(axes[0], None))
      self.lora_b = nnx.LoRAParam(jnp.zeros((lora.rank, d_out), pdt), axes=(None, axes[1]))
      self.lora_scale = lora.scale

  def __call__(self, x_BxLxI: jax.Array) -> jax.Array:
    # The matmuls run on [tokens, d_in]: a weight gradient that contracts over one flattened
    # token dim gets a far better layout from XLA:CPU than one contracting over (B, L).
    lead = x_BxLxI.shape[:-1]
    x = x_BxLxI.astype(self.dtype).reshape(-1, x_BxLxI.shape[-1])
    y = x @ self.kernel[...].astype(self.dtype)
    if self.lora_scale is not None:
      y += (x @ self.lora_a[...].astype(self.dtype)) @ (
          self.lora_scale * self.lora_b[...].astype(self.dtype))
    y = y.reshape(lead + y.shape[-1:])
    if self.bias is not None:
      y += _expand(self.bias[...].astype(self.dtype), y.ndim)
    return y


class RMSNorm(nnx.Module):
  """x / rms(x) * scale, normalised in float32 like transformers' LlamaRMSNorm."""

  def __init__(self, dim: int, eps: float, cfg: ModelConfig, axes=("norm",)):
    self.eps = eps
    self.dtype = jnp.dtype(cfg.dtype)
    self.scale = nnx.Param(jnp.ones((dim,), jnp.dtype(cfg.param_dtype)), axes=axes)

  def __call__(self, x: jax.Array) -> jax.Array:
    x32 = x.astype(jnp.float32)
    x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    return _expand(self.scale[...].astype(self.dtype), x.ndim) * x32.astype(self.dtype)


def rope_inv_freq(cfg: ModelConfig) -> np.ndarray:
  """Inverse frequencies [E/2], with linear or Llama-3 scaling (as in transformers)."""
  e = cfg.dim_per_head
  # float32 throughout, as transformers computes it, so logits match to 1e-5.
  exponent = np.arange(0, e, 2).astype(np.float32) / np.float32(e)
  inv = (np.float32(1.0) / (np.float32(cfg.rope_theta) ** exponent)).astype(np.float32)
  if cfg.rope_scaling is None:
    return inv.astype(np.float32)
  if cfg.rope_scaling == "linear":
    return (inv / cfg.rope_factor).astype(np.float32)
  if cfg.rope_scaling == "llama3":
    old = cfg.rope_original_max_position
    low_wl, high_wl = old / cfg.rope_low_freq_factor, old / cfg.rope_high_freq_factor
    wl = 2 * np.pi / inv
    scaled = np.where(wl > low_wl, inv / cfg.rope_factor, inv)
    smooth = (old / wl - cfg.rope_low_freq_factor) / (
        cfg.rope_high_freq_factor - cfg.rope_low_freq_factor)
    smoothed = (1 - smooth) * scaled / cfg.rope_factor + smooth * scaled
    mid = (wl >= high_wl) & (wl <= low_wl)
    return np.where(mid, smoothed, scaled).astype(np.float32)
  raise ValueError(f"unsupported rope_scaling {cfg.rope_scaling!r} (None, 'linear', 'llama3')")


def rope_tables(positions_BxL: jax.Array, inv_freq: np.ndarray, dtype) -> tuple[jax.Array, jax.Array]:
  """(cos, sin), each [B,L,1,E/2] in `dtype`: the rotation of every position, shared by all
  heads and (see `Attention.qkv`'s `rope`) by all layers of one forward pass."""
  freqs_BxLxE2 = positions_BxL[..., None].astype(jnp.float32) * jnp.asarray(inv_freq)[None, None]
  cos = jnp.cos(freqs_BxLxE2)[:, :, None, :].astype(dtype)
  sin = jnp.sin(freqs_BxLxE2)[:, :, None, :].astype(dtype)
  # Keep cos/sin [B,L,1,E/2] as arrays: fused into the rotation XLA recomputes them for every
  # head and element (and again in the backward pass). XLA:CPU drops the barrier (its optimized
  # HLO has none) and fuses them anyway; the sampler therefore reads its decode steps' rows
  # from a table made once (`sample.cache.rope_table`), a gather with no cos/sin to fuse.
  return jax.lax.optimization_barrier((cos, sin))


def rotate(x_BxLxNxE: jax.Array, cos_sin: tuple[jax.Array, jax.Array]) -> jax.Array:
  """Rotary embedding with precomputed `rope_tables`, 'rotate half' layout (HF Llama/Qwen)."""
  cos, sin = cos_sin
  x1, x2 = jnp.split(x_BxLxNxE, 2, axis=-1)
  return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


def apply_rope(x_BxLxNxE: jax.Array, positions_BxL: jax.Array, inv_freq: np.ndarray) -> jax.Array:
  """Rotary embedding in the 'rotate half' layout used by HF Llama/Qwen checkpoints."""
  return rotate(x_BxLxNxE, rope_tables(positions_BxL, inv_freq, x_BxLxNxE.dtype))


def _adapted(cfg: ModelConfig, layer: int) -> bool:
  """Whether layer `layer` carries LoRA adapters (on the modules `lora.targets` match)."""
  lora = cfg.lora
  return lora is not None and (lora.layers is None or layer in lora.layers)


def _lora_for(cfg: ModelConfig, layer: int, name: str) -> LoraConfig | None:
  if not _adapted(cfg, layer):
    return None
  return cfg.lora if any(re.search(t, name) for t in cfg.lora.targets) else None


def _structure(cfg: ModelConfig, layer: int) -> tuple[bool, bool]:
  """What sets a layer's param structure apart: LoRA adapters, a steering vector."""
  return _adapted(cfg, layer), layer == cfg.steer_layer


def layer_runs(cfg: ModelConfig) -> tuple[tuple[int, int], ...]:
  """Maximal runs [start, stop) of consecutive layers with the same param structure.

  Only layers of one structure can share a stack (a scan carries one pytree shape), and
  layers differ only in carrying LoRA adapters or not, and the steered layer
  (`cfg.steer_layer`) in its steering vector; so `lora.layers=(0..15)` on 32 layers gives
  two stacks, (0, 16) and (16, 32), and one adapted (or steered) layer in the middle three.
  """
  runs = []
  for i in range(cfg.n_layers):
    if runs and _structure(cfg, i) == _structure(cfg, runs[-1][0]):
      runs[-1][1] = i + 1
    else:
      runs.append([i, i + 1])
  return tuple((a, b) for a, b in runs)


class Attention(nnx.Module):
  """Grouped-query causal self-attention with optional qkv bias and q/k norm."""

  def __init__(self, cfg: ModelConfig, layer: int, rngs: nnx.Rngs):
    d, e, h, k = cfg.d_model, cfg.dim_per_head, cfg.n_heads, cfg.n_kv_heads
    lin = lambda name, i, o, axes, bias: Linear(
        i, o, axes, bias=bias, cfg=cfg, lora=_lora_for(cfg, layer, f"self_attn.{name}"), rngs=rngs)
    self.q_proj = lin("q_proj", d, h * e, ("embed", "heads"), cfg.qkv_bias)
    self.k_proj = lin("k_proj", d, k * e, ("embed", "kv_heads"), cfg.qkv_bias)
    self.v_proj = lin("v_proj", d, k * e, ("embed", "kv_heads"), cfg.qkv_bias)
    self.o_proj = lin("o_proj", h * e, d, ("heads", "embed"), False)
    if cfg.qk_norm:
      self.q_norm = RMSNorm(e, cfg.norm_eps, cfg, axes=("head_dim",))
      self.k_norm = RMSNorm(e, cfg.norm_eps, cfg, axes=("head_dim",))
    self.cfg = cfg

  def qkv(self, x_BxLxD, positions_BxL, rope=None):
    """Projected, normed and rotated q [B,L,H,E], k and v [B,L,K,E]. `rope`: this call's
    `rope_tables(positions_BxL, rope_inv_freq(cfg), cfg.dtype)`, computed once by a caller
    that runs many layers at the same positions (the sampler's decode step)."""
    cfg = self.cfg
    b, l, _ = x_BxLxD.shape
    e = cfg.dim_per_head
    q = self.q_proj(x_BxLxD).reshape(b, l, cfg.n_heads, e)
    k = self.k_proj(x_BxLxD).reshape(b, l, cfg.n_kv_heads, e)
    v = self.v_proj(x_BxLxD).reshape(b, l, cfg.n_kv_heads, e)
    if cfg.qk_norm:
      q, k = self.q_norm(q), self.k_norm(k)
    if rope is None:
      rope = rope_tables(positions_BxL, rope_inv_freq(cfg), q.dtype)
    # Names for the "save_qkvo" remat policy (identity otherwise).
    return (checkpoint_name(rotate(q, rope), "q"), checkpoint_name(rotate(k, rope), "k"),
            checkpoint_name(v, "v"))

  def attend(self, q_BxLxHxE, k_BxSxKxE, v_BxSxKxE, mask_BxLxS):
    """softmax(q k^T / sqrt(E) + mask) v, computed in float32, grouped heads."""
    b, l, h, e = q_BxLxHxE.shape
    o_BxLxHxE = self._softmax_attention(q_BxLxHxE, k_BxSxKxE, v_BxSxKxE, mask_BxLxS)
    return self.o_proj(checkpoint_name(o_BxLxHxE.reshape(b, l, h * e), "o"))

  def _softmax_attention(self, q_BxLxHxE, k_BxSxKxE, v_BxSxKxE, mask_BxLxS):
    """The attention of `attend` before o_proj: [B,L,H,E]."""
    b, l, h, e = q_BxLxHxE.shape
    kh = k_BxSxKxE.shape[2]
    if kh == h:
      # Plain multi-head: 4-D einsums. (The grouped 5-D form with G=1 runs much slower on
      # XLA:CPU: its softmax backward fuses into a single-threaded dot.)
      s_BxHxLxS = jnp.einsum("blhe,bshe->bhls", q_BxLxHxE, k_BxSxKxE,
                             preferred_element_type=jnp.float32) / math.sqrt(e)
      s_BxHxLxS = jnp.where(mask_BxLxS[:, None], s_BxHxLxS, NEG_INF)
      p = jax.nn.softmax(s_BxHxLxS, axis=-1).astype(v_BxSxKxE.dtype)
      return jnp.einsum("bhls,bshe->blhe", p, v_BxSxKxE)
    q = q_BxLxHxE.reshape(b, l, kh, h // kh, e)
    s_BxKxGxLxS = jnp.einsum("blkge,bske->bkgls", q, k_BxSxKxE,
                             preferred_element_type=jnp.float32) / math.sqrt(e)
    s_BxKxGxLxS = jnp.where(mask_BxLxS[:, None, None], s_BxKxGxLxS, NEG_INF)
    p = jax.nn.softmax(s_BxKxGxLxS, axis=-1).astype(v_BxSxKxE.dtype)
    o = jnp.einsum("bkgls,bske->blkge", p, v_BxSxKxE)
    return o.reshape(b, l, h, e)

  def attend_causal(self, q_BxLxHxE, k_BxLxKxE, v_BxLxKxE, mask_BxLxL):
    """`attend` for a mask that is causal by index (key j > query i never allowed), such as
    `attention_mask`'s: query block [i, i+C) only looks at keys [0, i+C), so the fully masked
    blocks above the diagonal are skipped. Same result as `attend`, also on rows with no
    allowed key at all (padding), whose softmax is uniform over all L keys."""
    b, l, h, e = q_BxLxHxE.shape
    c = _CAUSAL_BLOCK
    if l <= c:
      return self.attend(q_BxLxHxE, k_BxLxKxE, v_BxLxKxE, mask_BxLxL)
    blocks = []
    for i in range(0, l, c):
      end = min(i + c, l)
      blocks.append(self._softmax_attention(q_BxLxHxE[:, i:end], k_BxLxKxE[:, :end],
                                            v_BxLxKxE[:, :end], mask_BxLxL[:, i:end, :end]))
    o_BxLxHxE = jnp.concatenate(blocks, axis=1)
    kh = k_BxLxKxE.shape[2]
    mean_v_Bx1xHxE = jnp.repeat(
        jnp.mean(v_BxLxKxE.astype(jnp.float32), axis=1, keepdims=True), h // kh, axis=2)
    empty_BxL = ~jnp.any(mask_BxLxL, axis=-1)
    o_BxLxHxE = jnp.where(empty_BxL[:, :, None, None], mean_v_Bx1xHxE.astype(o_BxLxHxE.dtype),
                          o_BxLxHxE)
    return self.o_proj(checkpoint_name(o_BxLxHxE.reshape(b, l, h * e), "o"))

  def __call__(self, x_BxLxD, positions_BxL, mask_BxLxL, *, causal: bool = False):
    """`causal=True` promises that the mask is causal by index (see `attend_causal`)."""
    q, k, v = self.qkv(x_BxLxD, positions_BxL)
    if causal:
      return self.attend_causal(q, k, v, mask_BxLxL)
    return self.attend(q, k, v, mask_BxLxL)


class MLP(nnx.Module):
  """SwiGLU: down(silu(gate(x)) * up(x)), plus the steering vector in the steered layer.

  The vector (`steer`, [D], zeros at init; set by jaxlab.models.steering) lives here so that
  every path that runs a block's MLP (training forward, KV-cache sampler, scans) adds it:
  the block's output is then the unsteered one + steer, what a hook adding the vector to a
  transformers decoder layer's output computes.
  """

  def __init__(self, cfg: ModelConfig, layer: int, rngs: nnx.Rngs):
    lin = lambda name, i, o, axes: Linear(
        i, o, axes, bias=False, cfg=cfg, lora=_lora_for(cfg, layer, f"mlp.{name}"), rngs=rngs)
    self.gate_proj = lin("gate_proj", cfg.d_model, cfg.d_ff, ("embed", "mlp"))
    self.up_proj = lin("up_proj", cfg.d_model, cfg.d_ff, ("embed", "mlp"))
    self.down_proj = lin("down_proj", cfg.d_ff, cfg.d_model, ("mlp", "embed"))
    self.steer = nnx.Param(jnp.zeros((cfg.d_model,), jnp.dtype(cfg.param_dtype)),
                           axes=("embed",)) if layer == cfg.steer_layer else None

  def __call__(self, x_BxLxD):
    y = self.down_proj(jax.nn.silu(self.gate_proj(x_BxLxD)) * self.up_proj(x_BxLxD))
    if self.steer is not None:
      y = y + _expand(self.steer[...].astype(y.dtype), y.ndim)
    return y


class Block(nnx.Module):
  """Pre-norm transformer block."""

  def __init__(self, cfg: ModelConfig, layer: int, rngs: nnx.Rngs):
    self.input_layernorm = RMSNorm(cfg.d_model, cfg.norm_eps, cfg)
    self.self_attn = Attention(cfg, layer, rngs)
    self.post_attention_layernorm = RMSNorm(cfg.d_model, cfg.norm_eps, cfg)
    self.mlp = MLP(cfg, layer, rngs)

  def __call__(self, x_BxLxD, positions_BxL, mask_BxLxL, *, causal: bool = False):
    x_BxLxD = x_BxLxD + self.self_attn(self.input_layernorm(x_BxLxD), positions_BxL, mask_BxLxL,
                                       causal=causal)
    return x_BxLxD + self.mlp(self.post_attention_layernorm(x_BxLxD))


def stacked_blocks(cfg: ModelConfig, start: int, stop: int, rngs: nnx.Rngs) -> Block:
  """Layers [start, stop) as one Block whose params have a leading "layers" axis [N, ...].

  Built by `nnx.vmap` over split keys, so init (and `eval_shape` of a model spec) traces one
  block whatever N is. The logical axes get "layers" prepended (sharding rule: replicated).
  """
  @nnx.split_rngs(splits=stop - start)
  @nnx.vmap(in_axes=0, out_axes=0, axis_size=stop - start)
  def make(rngs):
    return Block(cfg, start, rngs)

  stack = make(rngs)
  for _, var in nnx.iter_graph(stack):
    if isinstance(var, nnx.Variable):
      var.set_metadata("axes", ("layers",) + tuple(var.axes))
  return stack


def scan_stack(stack: Block, fn, carry, xs=None, *, remat: str = "none"):
  """`lax.scan` of fn(block, carry, x) -> (carry, y) over a stack's layers (and xs' leading axis).

  The stack is split into its graph and stacked state; each step merges one layer's slice.
  `remat` (a REMAT_POLICIES name) checkpoints each step; prevent_cse=False since the scan
  already keeps XLA from merging the recomputation into the forward pass.
  """
  graphdef, state = nnx.split(stack)

  def body(carry, state_and_x):
    layer_state, x = state_and_x
    return fn(nnx.merge(graphdef, layer_state), carry, x)

  if remat != "none":
    body = jax.checkpoint(body, policy=REMAT_POLICIES[remat], prevent_cse=False)
  return jax.lax.scan(body, carry, (state, xs))


def attention_mask(segment_ids_BxL: jax.Array) -> jax.Array:
  """[B,L,L] bool: causal, within the same packed segment, never onto padding (segment 0)."""
  l = segment_ids_BxL.shape[1]
  causal = jnp.tril(jnp.ones((l, l), bool))
  same = segment_ids_BxL[:, :, None] == segment_ids_BxL[:, None, :]
  return causal[None] & same & (segment_ids_BxL[:, None, :] != 0)


class Decoder(nnx.Module):
  """Token ids -> logits [B, L, V]."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    pdt = jnp.dtype(cfg.param_dtype)
    self.embed_tokens = nnx.Param(_init(0.02)(rngs.params(), (cfg.vocab_size, cfg.d_model), pdt),
                                  axes=("vocab", "embed"))
    if cfg.scan_layers:
      self.stacks = nnx.List([stacked_blocks(cfg, a, b, rngs) for a, b in layer_runs(cfg)])
    else:
      self.layers = nnx.List([Block(cfg, i, rngs) for i in range(cfg.n_layers)])
    self.norm = RMSNorm(cfg.d_model, cfg.norm_eps, cfg)
    if not cfg.tie_embeddings:
      self.lm_head = nnx.Param(_init(0.02)(rngs.params(), (cfg.d_model, cfg.vocab_size), pdt),
                               axes=("embed", "vocab"))

  def embed(self, tokens_BxL: jax.Array) -> jax.Array:
    return jnp.take(self.embed_tokens[...], tokens_BxL, axis=0).astype(jnp.dtype(self.cfg.dtype))

  def logits(self, x_BxLxD: jax.Array) -> jax.Array:
    """Final norm and output projection; logits in float32."""
    x = self.norm(x_BxLxD)
    w_DxV = self.embed_tokens[...].T if self.cfg.tie_embeddings else self.lm_head[...]
    # As in Linear: one flattened token dim keeps the weight gradient's layout cheap on CPU.
    y = jnp.dot(x.reshape(-1, x.shape[-1]), w_DxV.astype(x.dtype),
                preferred_element_type=jnp.float32)
    return y.reshape(x.shape[:-1] + y.shape[-1:])

  def __call__(self, tokens_BxL: jax.Array, positions_BxL: jax.Array | None = None,
               segment_ids_BxL: jax.Array | None = None) -> jax.Array:
    return self.logits(self.hidden(tokens_BxL, positions_BxL, segment_ids_BxL))

  def hidden(self, tokens_BxL: jax.Array, positions_BxL: jax.Array | None = None,
             segment_ids_BxL: jax.Array | None = None) -> jax.Array:
    """The last block's output [B, L, D] (before the final norm): losses that must not hold
    [B, L, V] logits at once apply `logits` to slices of it (see jaxlab.train.channels)."""
    if positions_BxL is None:
      positions_BxL = jnp.broadcast_to(jnp.arange(tokens_BxL.shape[1]), tokens_BxL.shape)
    if segment_ids_BxL is None:
      segment_ids_BxL = jnp.ones_like(tokens_BxL)
    mask = attention_mask(segment_ids_BxL)
    x = self.embed(tokens_BxL)
    if self.cfg.scan_layers:
      step = lambda blk, x, _: (blk(x, positions_BxL, mask, causal=True), None)
      for stack in self.stacks:
        x, _ = scan_stack(stack, step, x, remat=self.cfg.remat_mode)
      return x
    step = lambda blk, x: blk(x, positions_BxL, mask, causal=True)
    if self.cfg.remat_mode != "none":
      step = nnx.remat(step, policy=REMAT_POLICIES[self.cfg.remat_mode])
    for block in self.layers:
      x = step(block, x)
    return x
