"""The EM transfer study (issue 11) as resumable stages under one workdir.

  python -m jaxlab.pipelines.em_study --config=configs/em_study.py:tiny --workdir=DIR \\
      [--config.cells=medical_advice,sports_tutor] [--config.key=value ...] [--plan]

`--plan` prints the stages (`plan`) and exits without running or writing anything.

Stages (each a folder, skipped when complete; see jaxlab.pipelines.stages):
  data/                       synthetic: the world (cells/{train,eval}/<cell>_<variant>.jsonl,
                              general.yaml, pretrain/*.jsonl); real: the study's seed-42 split
                              of each `<cells_dir>/<cell>_strong.jsonl` (4,100 / 400)
  bases/<base>/               pretraining on world + persona documents (synthetic; a runner
                              workdir); a real base is `init.hf_path` itself
  probes/<base>/              persona probe: a held-out prompt after an earlier harmful or
                              aligned turn from another cell (judged.jsonl)
  finetunes/<base>/<ft>/      one runner workdir per (training cell, steps, lr scale)
  evals/<base>/<ft>/          answers on the general set and every cell's eval split, judged
                              (judged.jsonl: one row per answer with its label and scores)
  report/                     tables (markdown, csv) and plots over every judged.jsonl
A base is named `seed<S>_persona<share>`; a fine-tune `<cell>__steps<N>_lrx<scale>`, and
`base` is the base model's own evaluation (the zero of every transfer figure).

Each stage is a module of jaxlab.pipelines.em naming the files it reads and writes; this module
composes them (`plan` lists the stages, `run` runs them in the same order).
"""
from __future__ import annotations

import os
import sys
from typing import Callable

import ml_collections
from etils import epath

from jaxlab.pipelines import stages
from jaxlab.pipelines.em.data import data_stage
from jaxlab.pipelines.em.evals import answers_of, eval_stage
from jaxlab.pipelines.em.probes import probe_stage
from jaxlab.pipelines.em.study import (all_cells, as_json, bases, eval_folders, eval_settings,
                                       finetunes,
                                       selected_cells, synthetic, training_config, validate)
from jaxlab.pipelines.em.training import base_stage, finetune_stage
from jaxlab.pipelines.kit import main as kit_main


def run(config: ml_collections.ConfigDict, workdir: str, log: Callable[[str], None] = print
        ) -> dict:
  """Runs (or resumes) the stages of this invocation's cells; the report once all are done.

  Returns {"report": folder or None, "pending": [eval stages not complete yet]}.
  """
  return kit_main.run_planned(plan(config, workdir), lambda: _run(config, workdir, log), log,
                              name="em_study")


def plan(config, workdir) -> stages.Plan:
  """The stages `run` executes, in its order, with the stages (or model folders) each reads;
  the report when every evaluation it reads will be complete."""
  validate(config)
  wd = epath.Path(workdir)
  p = stages.Plan(wd)
  p.add("data")
  for base in bases(config):
    base_in = f"bases/{base.name}" if synthetic(config) else config.init.hf_path
    if synthetic(config):
      p.add(base_in, inputs=["data"])
      if config.study.probe_rows:
        p.add(f"probes/{base.name}", inputs=[base_in])
    if config.eval.eval_base:
      p.add(f"evals/{base.name}/base", inputs=["data", base_in])
    for ft in finetunes(config, base, selected_cells(config)):
      p.add(f"finetunes/{base.name}/{ft.name}", inputs=["data", base_in])
      p.add(f"evals/{base.name}/{ft.name}", inputs=["data", f"finetunes/{base.name}/{ft.name}"])
  evals = [f"evals/{f.parent.name}/{f.name}" for f in eval_folders(config, wd)]
  if all(e in p.names() or stages.is_complete(wd / e) for e in evals):
    p.add("report", inputs=evals)
  return p


def describe_plan(config, workdir) -> str:
  """What `--plan` prints: the stage graph, each complete stage's recorded settings compared
  with this config's (a stage the run would refuse is marked); runs and writes nothing."""
  return plan(config, workdir).check(lambda: _run(config, workdir, lambda _: None)).describe()


def _run(config, workdir: str, log) -> dict:
  """The stages of `run`, in the order `plan` lists them."""
  import jax
  wd = epath.Path(workdir)
  data = data_stage(config, wd, log)
  answers = answers_of(config)
  cells = selected_cells(config)
  for base in bases(config):
    base_path = base_stage(config, wd, base, data, log)
    if synthetic(config) and config.study.probe_rows:
      probe_stage(config, wd, base, base_path, answers, log)
    if config.eval.eval_base:
      eval_stage(config, wd, data, base, None, base_path, answers, log)
    for ft in finetunes(config, base, cells):
      path = finetune_stage(config, wd, ft, data, base_path, log)
      eval_stage(config, wd, data, base, ft, path, answers, log)
  pending = [f for f in eval_folders(config, wd) if not stages.is_complete(f)]
  if pending:
    log(f"jaxlab: em_study: {len(pending)} eval stage(s) of the sweep are not complete (other "
        f"--config.cells invocations?); the report waits for them, e.g. {pending[0]}")
    return {"report": None, "pending": [str(p) for p in pending]}
  from jaxlab.pipelines import em_study_report
  settings = {"eval": eval_settings(config), "study": as_json(config.study),
              "n_boot": config.eval.n_boot, "finetune": as_json(training_config(config)),
              "pretrain": as_json(config.pretrain), "world": as_json(config.world)}
  settings["study"].pop("cells_dir", None)
  # The evaluations it reads, intact and by content: one recomputed later changes the report.
  evals = eval_folders(config, wd)
  for f in evals:
    stages.verify_outputs(f, f"evals/{f.parent.name}/{f.name}")
  settings["evals"] = {f"{f.parent.name}/{f.name}": stages.output_digest(f) for f in evals}
  probe_files = [wd / "probes" / base.name / "judged.jsonl" for base in bases(config)]
  folder = stages.run_stage(wd, "report", settings, lambda f: em_study_report.write(
      config, f, cells=all_cells(config), eval_folders=evals, probe_files=probe_files)
      if jax.process_index() == 0 else None, log=log)
  return {"report": str(folder), "pending": []}


def main(argv=None) -> int:
  return kit_main.main(sys.argv[1:] if argv is None else argv, prog="jaxlab.pipelines.em_study",
                       describe_plan=describe_plan, run=lambda c, w: run(c, w, log=stages.stderr_log),
                       summary=summary)


def summary(workdir: str, out: dict) -> str:
  """The ending: wall and CPU time, where the report is, its claims table and the sentence
  under it (or which evaluations the report still waits for)."""
  took = kit_main.took(out)
  if not out.get("report"):
    return (f"{took}\nno report yet: {len(out.get('pending', []))} evaluation stage(s) are not "
            f"complete, e.g. {(out.get('pending') or ['?'])[0]}")
  md = epath.Path(out["report"], "report.md").read_text()
  claims = md.split("## Claims summary", 1)[-1].split("\n## ", 1)[0].strip().splitlines()
  table = "\n".join(l for l in claims if l.startswith("|"))
  notes = "\n".join(f"- {l}" for l in claims if l.strip() and not l.startswith("|")
                    and not l.startswith("Harmful-and-coherent share"))
  return (f"{took}\nreport: {os.path.join(out['report'], 'report.md')}\n\n{table}"
          + (f"\n\n{notes}" if notes else ""))


if __name__ == "__main__":
  sys.exit(main())
