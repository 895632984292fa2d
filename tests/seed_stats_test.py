"""Seed-level intervals (jaxlab.pipelines.seed_stats): a two-level bootstrap widens when the
training runs disagree, which intervals over questions alone cannot show; the noise floor and
the distinguishability rule; the report's sentences follow them."""
import numpy as np
import pytest

from jaxlab.pipelines import seed_stats


def _tables(seeds=5, questions=50):
  rng = np.random.default_rng(0)
  per_q = rng.uniform(0.02, 0.2, questions)  # how often each question names the target
  noise = lambda: rng.normal(0, 0.01, (seeds, questions))
  consistent = per_q[None] + noise()
  # The same per-question values averaged over seeds, but seeds far apart (as the tiny world's
  # students are: 2% to 15% for one cell): the run's variance, not the questions'.
  offsets = np.array([-0.08, 0.1, -0.05, 0.07, -0.04])[:seeds]
  scattered = per_q[None] + offsets[:, None] + noise()
  return consistent, scattered


def test_intervals_widen_when_seeds_disagree():
  consistent, scattered = _tables()
  a, b = seed_stats.bootstrap(consistent), seed_stats.bootstrap(scattered)
  assert a["seed_level"] and b["seed_level"]
  wa, wb = a["hi"] - a["lo"], b["hi"] - b["lo"]
  assert wb > 3 * wa, (wa, wb)
  assert a["lo"] < a["mean"] < a["hi"] and b["lo"] < b["mean"] < b["hi"]
  # An interval over questions of the seed-averaged values (the old report) cannot see it.
  qa, qb = (seed_stats.bootstrap(t.mean(0, keepdims=True)) for t in (consistent, scattered))
  assert abs((qb["hi"] - qb["lo"]) - (qa["hi"] - qa["lo"])) < 0.3 * (qa["hi"] - qa["lo"])
  assert not qa["seed_level"]
  assert b["per_seed"] == pytest.approx(list(scattered.mean(1)))


def test_bootstrap_is_deterministic_and_checks_its_input():
  _, scattered = _tables()
  assert seed_stats.bootstrap(scattered) == seed_stats.bootstrap(scattered.copy())
  with pytest.raises(ValueError, match="seeds, questions"):
    seed_stats.bootstrap(np.zeros(5))


def test_noise_floor_is_the_widest_aa_difference_and_distinguishable_clears_it():
  consistent, scattered = _tables()
  same = seed_stats.noise_floor(consistent, consistent + 0.001)
  assert same["floor"] == pytest.approx(0.001, abs=1e-9) and not same["aa_ok"]  # constant shift
  aa = seed_stats.noise_floor(scattered, consistent)  # seeds disagree: a wide A/A interval
  st = aa["contrast"]
  assert aa["floor"] == pytest.approx(max(abs(st["lo"]), abs(st["hi"])))
  assert aa["floor"] > 0.05 and aa["aa_ok"]
  st = {"mean": 0.1, "lo": 0.05, "hi": 0.15}
  assert seed_stats.distinguishable(st, None)           # excludes 0
  assert not seed_stats.distinguishable(st, 0.06)       # covers the floor
  assert seed_stats.distinguishable({"mean": -0.3, "lo": -0.4, "hi": -0.2}, 0.15)
  assert seed_stats.describe(st, 0.06) == "+10.0 [+5.0, +15.0], not distinguishable"


def test_questions_are_resampled_once_per_replicate_across_seeds():
  # Crossed design: with identical seeds, seed resampling adds nothing and the interval is
  # the questions' interval of one seed.
  consistent, _ = _tables()
  one = consistent[:1]
  a = seed_stats.bootstrap(np.repeat(one, 5, axis=0))
  b = seed_stats.bootstrap(one)
  assert (a["hi"] - a["lo"]) == pytest.approx(b["hi"] - b["lo"], rel=0.1)


def test_report_sentences_compare_with_own_base_and_the_noise_floor():
  from jaxlab.pipelines import subliminal_report
  big = {"mean": 0.2, "lo": 0.15, "hi": 0.25}
  small = {"mean": 0.03, "lo": 0.01, "hi": 0.05}
  report = {"noise_floor": {"rate": {"floor": 0.04}},
            "models": {"x_sft": {"rate": 0.3}, "x_sft_otherbase": {"rate": 0.1}},
            "contrasts": {"x_sft": {"vs_base": {"rate": big}, "vs_control": {"rate": small}},
                          "x_sft_otherbase": {"vs_other_base": {"rate": small}}}}
  c = subliminal_report.conclusions(report)
  assert c[0].startswith("x_sft: 30.0% differs from its base (base: +20.0 [+15.0, +25.0]")
  assert "is not distinguishable from the control" in c[0] and "noise floor 4.0" in c[0]
  assert c[1].startswith("x_sft_otherbase: 10.0% is not distinguishable from its base (other_base")
