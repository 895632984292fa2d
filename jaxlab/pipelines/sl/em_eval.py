"""Stage `seed{S}/em_eval` (config key em_eval): the EM evaluation of the base, the teachers
and every student of a seed, side by side.

Reads the models; writes eval/ (jaxlab.evals.run: answers, scores, report/metrics.json)."""
from __future__ import annotations

import json

import ml_collections
from etils import epath

from jaxlab.pipelines.kit import configs as kit_configs
from jaxlab.pipelines.sl.study import eval_entries


def em_eval_config(config, entries, seed: int) -> ml_collections.ConfigDict:
  """The evaluation config of `em_eval` ("configs/eval_em.py:VARIANT": a config file, absolute
  or relative to the working directory, as --config's) naming `entries` (name, path) as its
  models."""
  return kit_configs.eval_config(config.em_eval, entries, seed, key="em_eval")


def write(config, paths: dict, students: dict, seed: int, folder) -> None:
  """A misaligned teacher's trait is misalignment: the EM evaluation (`em_eval`, e.g.
  configs/eval_em.py:first_plot: questions, judge, em / mo / seed metrics) of the base, the
  teachers and every student, side by side. Teachers that only exist under a system prompt
  (`prompted`) are left out: the EM evaluation samples each model without one."""
  from jaxlab.evals import run as evals_run
  entries = [(n, p) for n, p, system in eval_entries(config, paths, students) if not system]
  evals_run.run(em_eval_config(config, entries, seed), str(folder / "eval"))


def pooled_rows(workdir, seeds) -> dict:
  """Pooled em / mo / seed rows of every seed's EM evaluation (when sl.em_eval ran)."""
  from jaxlab.evals.statistics import POOLED
  out = {}
  for s in seeds:
    f = epath.Path(workdir) / f"seed{s}/em_eval/eval/report/metrics.json"
    if f.exists():
      out[s] = [r for r in json.loads(f.read_text()) if r.get("scope") == POOLED]
  return out
