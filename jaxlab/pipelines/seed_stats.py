"""Seed-level uncertainty for pipeline reports: a two-level bootstrap and a noise floor.

The unit of replication of a training effect is the training run: in the subliminal
pipeline a seed draws the number prompts and the sampled data, the shuffle and init of every
student and the evaluation's samples (the bases and the teachers are trained once per
workdir, so the intervals are conditional on them). Intervals over questions alone, of one
run or of per-question values averaged over runs, leave out that variance, which in the tiny
world is the largest one (one cell moved from 2% to 15% between seeds). So every interval
here resamples seeds first, then questions (a hierarchical bootstrap, Davison & Hinkley 1997,
ch. 3.8; Ren et al. 2010). The questions are one fixed set asked at every seed (crossed with
the seeds, not nested in them), so a replicate draws one question resample and uses it at
every drawn seed. Every difference is paired: both models' values at the same drawn seeds
and questions.

With 3 to 5 seeds a percentile bootstrap is narrow (it under-covers: the seeds' spread is
estimated from a handful of values), so the report also needs a yardstick measured the same
way: the noise floor. Two controls trained when nothing differs (the same recipe, another
data sample and shuffle: cells control and control_b) give an A/A contrast; the floor is the
largest difference between them that their interval does not rule out, max(|lo|, |hi|). A
contrast is called distinguishable only when its whole interval lies beyond +- the floor.
This is deliberately strict (an effect has to clear about twice the seed-level spread); with
more seeds both intervals shrink, so the rule gains power. If the A/A interval itself
excludes 0, the intervals are too narrow for this run, and the report says so.
"""
from __future__ import annotations

import numpy as np

N_BOOT = 4000  # resamples; the percentile interval's ends move by < 0.1 point between seeds
BOOT_SEED = 0  # fixed: the same values give the same report


def bootstrap(x_SxQ, n_boot: int = N_BOOT, seed: int = BOOT_SEED) -> dict:
  """Mean and 95% percentile interval of x [seeds, questions] by a two-level bootstrap.

  Each replicate draws S seeds with replacement and one resample of the Q questions used at
  every drawn seed; with one seed only the questions are resampled (`seed_level` False says
  so). Deterministic for given values (a fixed generator).
  """
  x = np.asarray(x_SxQ, np.float64)
  if x.ndim != 2 or min(x.shape) < 1:
    raise ValueError(f"bootstrap needs a [seeds, questions] table, got shape {x.shape}")
  s, q = x.shape
  rng = np.random.default_rng(seed)
  pick_s = rng.integers(0, s, size=(n_boot, s)) if s > 1 else np.zeros((n_boot, 1), np.int64)
  pick_q = rng.integers(0, q, size=(n_boot, 1, q))
  means = x[pick_s[..., None], pick_q].mean(axis=(1, 2))
  lo, hi = np.percentile(means, [2.5, 97.5])
  return {"mean": float(x.mean()), "lo": float(lo), "hi": float(hi),
          "per_seed": [float(v) for v in x.mean(axis=1)], "seed_level": s > 1}


def noise_floor(a_SxQ, b_SxQ) -> dict:
  """The A/A contrast of two identically trained models (a - b, paired) and its floor:
  max(|lo|, |hi|) of its interval; `aa_ok` is whether the interval contains 0."""
  st = bootstrap(np.asarray(a_SxQ, np.float64) - np.asarray(b_SxQ, np.float64))
  return {"floor": max(abs(st["lo"]), abs(st["hi"])), "contrast": st,
          "aa_ok": st["lo"] <= 0.0 <= st["hi"]}


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
