"""AdamW with warmup + linear/cosine/constant decay, weight decay mask and clipping."""
from __future__ import annotations

import jax
import optax


def learning_rate_schedule(lr: float, total_steps: int, warmup_steps: int,
                           decay: str = "linear", end_ratio: float = 0.0) -> optax.Schedule:
  """Linear warmup from 0 to `lr`, then `decay` ('linear'|'cosine'|'constant') to lr*end_ratio."""
  warmup = optax.linear_schedule(0.0, lr, max(warmup_steps, 1))
  rest = max(total_steps - warmup_steps, 1)
  if decay == "linear":
    after = optax.linear_schedule(lr, lr * end_ratio, rest)
  elif decay == "cosine":
    after = optax.cosine_decay_schedule(lr, rest, alpha=end_ratio)
  elif decay == "constant":
    after = optax.constant_schedule(lr)
  else:
    raise ValueError(f"config key optim.decay={decay!r}: expected 'linear', 'cosine' or 'constant'")
  if warmup_steps <= 0:
    return after
  return optax.join_schedules([warmup, after], [warmup_steps])


def _decay_mask(params):
  # Like HF Trainer: no weight decay on biases and norm scales (1-D params).
  return jax.tree.map(lambda p: p.ndim >= 2, params)


def make_optimizer(optim_cfg, total_steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """AdamW from the `optim` config block; returns (optimizer, learning-rate schedule)."""
  schedule = learning_rate_schedule(optim_cfg.lr, total_steps, optim_cfg.warmup_steps,
                                    optim_cfg.decay, optim_cfg.get("end_ratio", 0.0))
  parts = []
  if optim_cfg.clip_norm and optim_cfg.clip_norm > 0:
    parts.append(optax.clip_by_global_norm(optim_cfg.clip_norm))
  parts.append(optax.adamw(schedule, b1=optim_cfg.b1, b2=optim_cfg.b2, eps=optim_cfg.eps,
                           weight_decay=optim_cfg.weight_decay, mask=_decay_mask))
  return optax.chain(*parts), schedule
