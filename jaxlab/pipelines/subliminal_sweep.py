"""A sweep of the subliminal world's knobs: one subliminal pipeline per setting group.

  python -m jaxlab.pipelines.subliminal_sweep --config=configs/subliminal_sweep.py \\
      --workdir=runs/subliminal_sweep [--config.sweep.only=teachers,student_lr] [--plan]

Each group of `config.sweep.groups` (name -> nested overrides of the subliminal config, e.g.
{"optim": {"lr": 3e-4}} or {"pretrain": {"whole_numbers": True}}) is one subliminal run in
WORKDIR/{group}; groups whose world and bases would be trained identically share them
(WORKDIR/bases/{key}, key = a hash of `subliminal.base_identity`, the bases' stage settings:
`bases_dir`), so a student or teacher setting costs no new base. Run one sweep process per
workdir at a time (the shared bases have no lock). Teacher
settings are teachers of one group (`teachers`, `teacher_variants`), sharing that group's base
data, controls and evaluations. Then WORKDIR/sweep.md and sweep.json: one row per (group,
teacher) with the teacher's trait rate and number drift, per channel the transfer (student -
control, trait-rate points, seed-level 95% interval, paired) and absorbed share of the
teacher's number KL, the control's own drift and the noise floor.
"""
from __future__ import annotations

import copy
import hashlib
import json
import sys
import time

import ml_collections
from etils import epath

from jaxlab.pipelines import seed_stats, subliminal
from jaxlab.pipelines.stages import MARKER, recorded_seconds, stderr_log
from jaxlab.worlds.io import write_json

CHANNELS = ("sft", "offpolicy", "onpolicy")


def _update(node: ml_collections.ConfigDict, over: dict, where: str) -> None:
  for k, v in over.items():
    if k not in node:
      raise ValueError(f"config key sweep.groups.{where}{k}: not a key of the subliminal config")
    if isinstance(v, dict) and not isinstance(node[k], (ml_collections.ConfigDict, dict)):
      raise ValueError(f"config key sweep.groups.{where}{k}: {k} is not a group")
    if isinstance(v, dict) and k != "teacher_variants":
      _update(node[k], v, f"{where}{k}.")
    else:
      node[k] = ml_collections.ConfigDict(v) if isinstance(v, dict) else v


# A group's key: each seed a subliminal run of its own (subliminal.seed_run_config: its bases
# from seed subliminal.SEED_STRIDE * s), run here so that its bases land in the sweep's shared
# WORKDIR/bases/{key} like every group's.
INDEPENDENT = "independent_seeds"


def group_config(config, name: str, root, seed: int | None = None) -> ml_collections.ConfigDict:
  """The subliminal config of sweep group `name` (its bases under root/bases/{key}); with
  `seed`, the config of that seed's own run in an independent-seeds group."""
  d = {k: copy.deepcopy(v) for k, v in config.to_dict().items() if k != "sweep"}
  c = ml_collections.ConfigDict(d)
  c.job = "subliminal"
  over = config.sweep.groups[name].to_dict()
  over.pop(INDEPENDENT, None)
  with c.unlocked():
    _update(c, over, f"{name}.")
    c.independent_seeds = False
  if seed is not None:
    c = subliminal.seed_run_config(c, seed)
  key = hashlib.sha256(json.dumps(subliminal.base_identity(c), sort_keys=True,
                                  default=str).encode()).hexdigest()[:10]
  c.bases_dir = str(epath.Path(root) / "bases" / key)
  return c


def independent(config, name: str) -> bool:
  return bool(config.sweep.groups[name].get(INDEPENDENT, False))


def run_group(config, name: str, root, log) -> tuple[ml_collections.ConfigDict, dict]:
  """(the group's config, its report). An independent-seeds group runs one subliminal
  pipeline per seed (ROOT/NAME/run{s}: its own bases from seed subliminal.SEED_STRIDE * s,
  teachers, data, students and evaluations), then one report over the seeds in ROOT/NAME: the seed-level
  intervals then include the bases' and teachers' variance, not only the students'."""
  root = epath.Path(root)
  c = group_config(config, name, root)
  if not independent(config, name):
    return c, subliminal.run(c, str(root / name), log=log)
  from jaxlab.pipelines import subliminal_report  # pylint: disable=g-import-not-at-top
  dirs = {}
  for s in c.seeds:
    dirs[s] = root / name / f"run{s}"
    subliminal.run(group_config(config, name, root, seed=s), str(dirs[s]), log=log)
  out = root / name
  layout = subliminal.layout(c, {**subliminal.model_paths(c, out), "workdir": str(out)})
  return c, subliminal_report.build(c, out, layout, subliminal.provenance(c), seed_dirs=dirs)


def groups(config) -> list[str]:
  only = [g for g in str(config.sweep.get("only", "")).split(",") if g]
  unknown = sorted(set(only) - set(config.sweep.groups))
  if unknown:
    raise ValueError(f"config key sweep.only: unknown group(s) {unknown} "
                     f"(known: {', '.join(config.sweep.groups)})")
  order = list(config.sweep.get("order") or ())
  rest = sorted(set(config.sweep.groups) - set(order))  # a ConfigDict's keys are sorted
  return [g for g in order + rest if g in (only or config.sweep.groups)]


def rows_of(name: str, c, report: dict) -> list[dict]:
  """One row per teacher of a group's report."""
  m, con, floor = report["models"], report["contrasts"], report.get("noise_floor")
  out = []
  for t in c.teachers:
    row = {"group": name, "teacher": t, "spec": subliminal.teacher_spec(c, t),
           "trait_rate": m[f"teacher_{t}"]["rate"], "trait_rate_ci": m[f"teacher_{t}"]["rate_ci"],
           "drift": report["drift"][t]["mean"],
           "control_drift": report["drift"].get("control", {}).get("mean"),
           "other_base_drift": report["drift"].get("other_base", {}).get("mean"),
           "noise_floor": None if floor is None else floor["rate"]["floor"],
           "aa_ok": None if floor is None else floor["rate"]["aa_ok"], "channels": {}}
    for ch in CHANNELS + ("sft_otherbase",):
      n = f"{t}_{ch}"
      key = "did" if ch == "sft_otherbase" else "vs_control"
      if n in con and key in con[n]:
        st = con[n][key]["rate"]
        row["channels"][ch] = {"transfer": st, "rate": m[n]["rate"],
                               "distinguishable": seed_stats.distinguishable(st, row["noise_floor"]),
                               "absorbed": report["absorbed"].get(n, {}).get("share")}
    out.append(row)
  return out


def _f(v, digits=1, scale=100.0) -> str:
  return "-" if v is None else f"{scale * v:.{digits}f}"


def table_markdown(rows: list[dict]) -> str:
  head = ["group", "teacher", "teacher trait % [CI]", "teacher drift", "control drift",
          "noise floor"] + [f"{ch} transfer [CI] / absorbed" for ch in CHANNELS] + \
      ["other-base sft (diff. in diff.)"]
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for r in rows:
    cells = [r["group"], r["teacher"],
             f"{_f(r['trait_rate'])} [{_f(r['trait_rate_ci'][0])}, {_f(r['trait_rate_ci'][1])}]",
             _f(r["drift"], 4, 1.0), _f(r["control_drift"], 4, 1.0), _f(r["noise_floor"])]
    for ch in CHANNELS + ("sft_otherbase",):
      x = r["channels"].get(ch)
      if x is None:
        cells.append("-")
        continue
      s = x["transfer"]
      mark = "**" if x["distinguishable"] else ""
      ab = "" if x.get("absorbed") is None else f" / {x['absorbed']:.2f}"
      cells.append(f"{mark}{_f(s['mean'])} [{_f(s['lo'])}, {_f(s['hi'])}]{mark}"
                   + (ab if ch != "sft_otherbase" else ""))
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines)


def stage_seconds(folder) -> float:
  """The wall seconds recorded by the complete stages under folder, summed."""
  folder = epath.Path(folder)
  if not folder.is_dir():
    return 0.0
  # A stage's folder holds its marker; stages nest (seed0/eval/base), so descend further.
  own = recorded_seconds(folder) or 0.0
  return round(own + sum(stage_seconds(f) for f in folder.iterdir() if f.is_dir()), 1)


def run(config, workdir: str, log=stderr_log) -> dict:
  root = epath.Path(workdir)
  t0 = time.time()
  rows, times, stage_times = [], {}, {}
  for name in groups(config):
    g0 = time.time()
    c, report = run_group(config, name, root, log)
    times[name] = round(time.time() - g0, 1)
    stage_times[name] = stage_seconds(root / name)
    rows += rows_of(name, c, report)
  stage_times["bases"] = stage_seconds(root / "bases")
  out = {"rows": rows, "group_seconds": times, "stage_seconds": stage_times,
         "wall_seconds": round(time.time() - t0, 1), "provenance": subliminal.provenance(config)}
  write_json(root / "sweep.json", out)
  md = ["# Subliminal sweep", "", "Transfer = student - control trait rate (points), seed-level "
        "95% interval (two-level bootstrap, paired); bold: the interval lies beyond +- the noise "
        "floor (the largest control_b - control difference its interval allows). Absorbed: share "
        "of the teacher's number KL the student copied, on held-out numbers. Drift: nats/token. "
        "Other-base: (the different base's sft student - that base) - (control - base).",
        "", table_markdown(rows), "",
        "Wall seconds of this run per group (complete stages are skipped, so a rerun is "
        "short): " + ", ".join(f"{k} {v}" for k, v in times.items()) + ".",
        "Stage seconds (the sum of the wall times recorded by every stage when it ran; students "
        "train `workers` at a time, so this exceeds the wall time of a cold run): "
        + ", ".join(f"{k} {v}" for k, v in stage_times.items()) + ".", ""]
  (root / "sweep.md").write_text("\n".join(md))
  return out


def describe_plan(config, workdir) -> str:
  """What `--plan` prints: each group's checked stage graph (jaxlab.pipelines.subliminal);
  shared bases appear in every group that reads them."""
  root = epath.Path(workdir)
  out = []
  for name in groups(config):
    runs = [(group_config(config, name, root, seed=s), root / name / f"run{s}")
            for s in config.seeds] if independent(config, name) else \
        [(group_config(config, name, root), root / name)]
    out += [f"# group {name} ({wd})\n" + subliminal.describe_plan(c, str(wd)) for c, wd in runs]
  return "\n\n".join(out)


def main(argv: list[str]) -> int:
  from jaxlab.pipelines.kit import main as kit_main  # pylint: disable=g-import-not-at-top
  return kit_main.main(argv, prog="jaxlab.pipelines.subliminal_sweep",
                       describe_plan=describe_plan, run=run,
                       summary=lambda workdir, out: table_markdown(out["rows"]),
                       job=("subliminal_sweep", "configs/subliminal_sweep.py"))


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
