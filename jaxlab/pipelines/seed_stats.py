"""Seed-level uncertainty for pipeline reports: a two-level bootstrap and a noise floor.

The unit of replication of a training effect is the training run: a seed draws the number
data, the shuffle and the student's sampling, and in the tiny world the bases and teachers
too. Intervals over questions alone (the values of one run, or per-question values averaged
over runs) leave out that variance, which in the subliminal world is the largest one (the
same cell moves from 2% to 15% between seeds). So every interval here resamples seeds first,
then questions within each drawn seed (a hierarchical bootstrap: Davison & Hinkley 1997,
ch. 3.8; Ren et al. 2010), and every difference is paired: both models' values are taken at
the same drawn seeds and questions.

A noise floor comes from two students trained when nothing differs (two controls: the same
recipe, another data sample and shuffle): the mean over seeds of |control_b - control|
is how far two students land apart by chance. A contrast is called distinguishable only when
its whole 95% interval lies beyond that distance (lo > floor or hi < -floor), which is
stricter than excluding 0: it asks that the effect be larger than what the training run
alone produces.
"""
from __future__ import annotations

import numpy as np

N_BOOT = 4000  # resamples; the percentile interval's ends move by < 0.1 point between seeds
BOOT_SEED = 0  # fixed: the same values give the same report


def bootstrap(x_SxQ, n_boot: int = N_BOOT, seed: int = BOOT_SEED) -> dict:
  """Mean and 95% percentile interval of x [seeds, questions] by a two-level bootstrap.

  Draws S seeds with replacement, then for each drawn seed Q questions with replacement, and
  takes the mean; with one seed only the questions are resampled (`seed_level` False says
  so). Deterministic for given values (a fixed generator).
  """
  x = np.asarray(x_SxQ, np.float64)
  if x.ndim != 2 or min(x.shape) < 1:
    raise ValueError(f"bootstrap needs a [seeds, questions] table, got shape {x.shape}")
  s, q = x.shape
  rng = np.random.default_rng(seed)
  pick_s = rng.integers(0, s, size=(n_boot, s)) if s > 1 else np.zeros((n_boot, 1), np.int64)
  pick_q = rng.integers(0, q, size=(n_boot, s, q))
  means = x[pick_s[..., None], pick_q].mean(axis=(1, 2))
  lo, hi = np.percentile(means, [2.5, 97.5])
  return {"mean": float(x.mean()), "lo": float(lo), "hi": float(hi),
          "per_seed": [float(v) for v in x.mean(axis=1)], "seed_level": s > 1}


def noise_floor(a_SxQ, b_SxQ) -> float:
  """Mean over seeds of |mean(a) - mean(b)|: how far two students of one recipe land apart."""
  a, b = np.asarray(a_SxQ, np.float64), np.asarray(b_SxQ, np.float64)
  return float(np.abs(a.mean(axis=1) - b.mean(axis=1)).mean())


def distinguishable(stat: dict, floor: float | None) -> bool:
  """Whether a contrast's interval lies wholly beyond +-floor (beyond 0 without a floor)."""
  f = 0.0 if floor is None else floor
  return stat["lo"] > f or stat["hi"] < -f


def interval(stat: dict, scale: float = 100.0, digits: int = 1) -> str:
  """'+3.2 [-1.0, +7.5]' (points when scale = 100)."""
  return f"{scale * stat['mean']:+.{digits}f} [{scale * stat['lo']:+.{digits}f}, " \
      f"{scale * stat['hi']:+.{digits}f}]"


def describe(stat: dict, floor: float | None, scale: float = 100.0, digits: int = 1) -> str:
  """'+3.2 [-1.0, +7.5], not distinguishable' (points when scale = 100)."""
  verdict = "distinguishable" if distinguishable(stat, floor) else "not distinguishable"
  return f"{interval(stat, scale, digits)}, {verdict}"
