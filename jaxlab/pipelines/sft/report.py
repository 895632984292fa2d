"""report.md and report.json (rewritten every run, by process 0 only): the evaluation's table,
the judge's scored share per model and metric, the training's first and last logged loss and
each stage's wall time; from the complete stages train/ and eval/."""
from __future__ import annotations

import json

from etils import epath

from jaxlab import console
from jaxlab.pipelines import stages
from jaxlab.pipelines.sft.study import eval_config


def build(config, workdir) -> dict:
  """What report.json holds (but the run's times), read from the complete stages."""
  from jaxlab.evals import judging
  from jaxlab.evals.records import read_jsonl
  from jaxlab.evals.run import judge_tag
  from jaxlab.run_metrics import read_metrics
  wd = epath.Path(workdir)
  ec = eval_config(config, workdir)
  rows = json.loads((wd / "eval/report/metrics.json").read_text())
  metrics = read_metrics(str(wd / "train"))
  last = metrics[-1] if metrics else {}
  shares = {}
  for name, _ in [m.split("=", 1) for m in ec.models]:
    answers = read_jsonl(wd / "eval/answers" / f"{name}.jsonl")
    scores = read_jsonl(wd / "eval/scores" / judge_tag(ec) / f"{name}.jsonl")
    shares[name] = {m: {k: d[k] for k in ("scored", "judged", "statuses")}
                    for m, d in judging.scored_shares(answers, scores).items()}
  seconds = {s: stages.recorded_seconds(wd / s) for s in ("train", "eval")}
  report = {"variant": config.get("variant", ""), "evaluation": config.evaluation,
            "models": list(ec.models), "judge": ec.judge.to_dict(), "rows": rows,
            "scored_shares": shares, "stage_seconds": seconds,
            "train": {"steps": last.get("step"), "loss": last.get("loss"),
                      "first_loss": metrics[0].get("loss") if metrics else None}}
  return report


def markdown(report: dict) -> str:
  """report.md: the training line, the evaluation's table, the judge's scored shares."""
  from jaxlab.evals import report as report_lib
  judge = report["judge"]
  lines = [f"# {report['variant']}: fine-tune, then {report['evaluation']}", "",
           f"Training: {report['train']['steps']} steps, loss {report['train']['first_loss']} "
           f"(first logged) -> {report['train']['loss']} (last); models: "
           f"{', '.join(report['models'])}.", "",
           report_lib.markdown_table(report["rows"]), "",
           f"Judge: {judge['kind']} {judge['mode']} {judge['model_path'] or judge['model']}; "
           "scored answers per model and metric (the rest have no score: "
           "low_mass = less than judge.min_mass of the judge's probability on 0..100):", ""]
  for name, by_metric in report["scored_shares"].items():
    for m, d in by_metric.items():
      lines.append(f"- {name} / {m}: {d['scored']} of {d['judged']} scored; {d['statuses']}")
  lines += ["", "Stage wall times: " + ", ".join(
      f"{s} {console.duration(v)}" for s, v in report["stage_seconds"].items() if v is not None)]
  return "\n".join(lines) + "\n"


def write(workdir, report: dict) -> None:
  """report.md and report.json in WORKDIR, by process 0 only (every process of a multi-host
  run computes the same report; one writes the shared files)."""
  import jax
  if jax.process_index() != 0:
    return
  wd = epath.Path(workdir)
  (wd / "report.md").write_text(markdown(report))
  (wd / "report.json").write_text(json.dumps(report, indent=2, default=str))
