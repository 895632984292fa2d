"""Fine-tune, then evaluate: one training run and the evaluation of its model beside its base.

  python -m jaxlab.main --config=configs/sft.py:smollm_insecure --workdir=DIR [--plan]
  python -m jaxlab.pipelines.sft_eval --config=configs/sft.py:smollm_insecure --workdir=DIR

The config is a training config (any channel the runner trains) with `job="sft_eval"` and:
  evaluation   the eval config that measures the trained model, e.g.
               "configs/eval_em.py:first_plot" (a config file, absolute or relative to the
               working directory, as --config's)
  eval         overrides of that eval config's keys, as nested groups (eval.questions.*,
               eval.sample.*, eval.judge.*: e.g. --config.eval.sample.max_new_tokens=64)
  eval_base    True: the base (init.hf_path / init.workdir) is evaluated too, the zero of the
               comparison (same questions, samples and judge)

Stages (each a folder of DIR, skipped when complete, so a killed run resumes):
  train/     the training runner's workdir (checkpoints, metrics, config.json)
  eval/      the evaluation (jaxlab.evals.run) of base and tuned model: answers/, scores/,
             report/ (metrics.md, plots)
  report.md, report.json   the evaluation's table, the judge's scored shares, the training's
             last metrics and each stage's wall time (rewritten every run)

Each stage is a module of jaxlab.pipelines.sft naming the files it reads and writes; this module
composes them (`plan` lists the stages, `run` runs them in the same order).
"""
from __future__ import annotations

import sys

from etils import epath

from jaxlab.pipelines import stages
from jaxlab.pipelines.kit import main as kit_main
from jaxlab.pipelines.sft import report as report_lib
from jaxlab.pipelines.sft.evals import eval_stage
from jaxlab.pipelines.sft.study import base_path, validate
from jaxlab.pipelines.sft.training import train_stage


def plan(config, workdir) -> stages.Plan:
  """The stages `run` executes, in its order, with the stages (or model folders) each reads."""
  validate(config, workdir)
  p = stages.Plan(workdir)
  p.add("train", workdir, [base_path(config)])
  p.add("eval", workdir, ["train"] + ([base_path(config)] if config.eval_base else []))
  return p


def describe_plan(config, workdir) -> str:
  """What `--plan` prints: the stage graph, each complete stage's recorded settings compared
  with this config's; runs and writes nothing."""
  return plan(config, workdir).check(lambda: _run(config, workdir, lambda _: None)).describe()


def run(config, workdir: str, log=stages.stderr_log) -> dict:
  """Trains (or resumes), evaluates, then writes report.md and report.json; returns the report."""
  validate(config, workdir)
  from jaxlab.train.runner import check_model_folders
  check_model_folders(config)  # a missing base (or tokenizer) before anything runs
  report = kit_main.run_planned(plan(config, workdir), lambda: _run(config, workdir, log), log,
                                name="sft_eval pipeline")
  report_lib.write(workdir, report)
  return report


def _run(config, workdir, log) -> dict:
  """The stages of `run`, in the order `plan` lists them, then the report (written by `run`,
  once it holds the run's times)."""
  train_stage(config, workdir, log)
  eval_stage(config, workdir, log)
  if stages.checking():  # --plan: every stage compared; the report is not written
    return {}
  return report_lib.build(config, workdir)


def summary(workdir: str, report: dict | None = None) -> str:
  """The ending: wall and CPU time, where the report is, and the report."""
  md = epath.Path(workdir) / "report.md"
  return f"{kit_main.took(report)}\nreport: {md}\n\n{md.read_text()}"


def main(argv: list[str]) -> int:
  return kit_main.main(argv, prog="jaxlab.pipelines.sft_eval", describe_plan=describe_plan,
                       run=run, summary=summary, job=("sft_eval", "configs/sft.py"))


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
