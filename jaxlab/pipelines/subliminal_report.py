"""The subliminal pipeline's report: report.json, report.md and trait.png from finished stages.

Reads only the stage files named in `layout` (built by jaxlab.pipelines.subliminal.layout):
  seed{S}/eval/{model}/eval.json        per-question trait rate and P(target) of each model
  seed{S}/data_{source}/filter.json     filter counts of each number data source
  seed{S}/{student}/metrics*, _COMPLETE.json   steps, trained tokens, wall time
  seed{S}/drift/{source}/drift.json     number drift from the base
  seed{S}/absorbed/{student}/absorbed.json     KL(teacher || student) on the teacher's numbers

Every interval is a two-level bootstrap over seeds, then questions (jaxlab.pipelines.seed_stats);
every difference is paired by seed and question. The report's results do not depend on how
many worker processes ran the stages or how long they took: those go to `provenance` and
`timing`, the two parts a comparison of reports leaves out (`VOLATILE`).
"""
from __future__ import annotations

import json

import numpy as np
from etils import epath

from jaxlab.pipelines import seed_stats
from jaxlab.worlds.io import write_json

VOLATILE = ("timing", "provenance.workers", "provenance.dirty", "wall_seconds", "cpu_seconds")
METRICS = ("rate", "prob")
LABEL = {"rate": "trait rate", "prob": "P(target)"}


def _read(path) -> dict:
  return json.loads(epath.Path(path).read_text())


def _compute(folder) -> dict:
  from jaxlab.run_metrics import read_metrics
  rows = read_metrics(str(folder))
  steps = rows[-1]["step"] if rows else 0
  per_step = np.mean([r["trained_tokens"] for r in rows if "trained_tokens" in r]) if rows else 0.0
  return {"steps": steps, "trained_tokens": float(per_step * steps)}  # logged rows: per step


def _stat(x) -> dict:
  return seed_stats.bootstrap(x)


def reference_of(name: str, cell: str | None) -> str:
  """The base a model is compared with: its own (the other base's student with the other
  base), the main base for everything else."""
  return "other_base" if cell == "sft_otherbase" else "base"


def build(config, workdir, layout: dict, provenance: dict, seed_dirs: dict | None = None
          ) -> dict:
  """report.json / report.md / trait.png of `layout`'s models (see module docstring), in
  `workdir`. `seed_dirs` ({seed: folder}) names the workdir holding each seed's stages when
  each seed ran in its own (jaxlab.pipelines.subliminal_sweep's independent seeds: every
  seed with its own bases and teachers); default: `workdir` for every seed."""
  out_dir = epath.Path(workdir)
  seeds = list(config.seeds)
  dirs = {s: epath.Path(seed_dirs[s]) if seed_dirs else out_dir for s in seeds}
  names = layout["models"]
  evals = {n: [_read(dirs[s] / f"seed{s}/eval/{n}/eval.json") for s in seeds] for n in names}
  table = {n: {k: np.asarray([e[f"{k}_by_question"] for e in evals[n]], np.float64)
               for k in METRICS} for n in names}  # [seeds, questions]
  models = {}
  for n in names:
    r = {"seeds": {s: {k: evals[n][i][k] for k in METRICS} for i, s in enumerate(seeds)},
         "top_answers": evals[n][0]["top_answers"]}
    for k in METRICS:
      st = _stat(table[n][k])
      r[k], r[k + "_ci"] = st["mean"], [st["lo"], st["hi"]]
    models[n] = r
  floor = None
  if "control" in table and "control_b" in table:  # the A/A contrast (seed_stats.noise_floor)
    floor = {k: seed_stats.noise_floor(table["control_b"][k], table["control"][k])
             for k in METRICS}
  cell_of = {n: cell for n, _, cell in layout["students"]}
  teacher_of = {n: t for n, t, _ in layout["students"]}
  contrasts = {}
  for n in names:
    if n in ("base", "other_base"):
      continue
    c = {}
    refs = [reference_of(n, cell_of.get(n))]
    if n in cell_of and cell_of[n] not in ("control", "control_b", "sft_otherbase") \
        and "control" in table:
      refs.append("control")
    for ref in refs:
      if ref in table:
        c["vs_" + ref] = {k: _stat(table[n][k] - table[ref][k]) for k in METRICS}
    if cell_of.get(n) == "sft_otherbase" and all(x in table for x in ("control", "base",
                                                                       "other_base")):
      # Against its own base the other base's student also carries the generic effect of
      # number SFT, which the main base's students lose by subtracting the control: the
      # difference in differences (student - other base) - (control - base) compares like
      # with like.
      c["did"] = {k: _stat((table[n][k] - table["other_base"][k])
                           - (table["control"][k] - table["base"][k])) for k in METRICS}
    contrasts[n] = c
  grid = {}
  for t in layout["teachers"]:
    pairs = {"teacher_vs_base_sequences_hard": (f"{t}_sft", "control"),
             "teacher_vs_base_sequences_soft": (f"{t}_offpolicy", f"{t}_base_offpolicy"),
             "soft_vs_hard_teacher_sequences": (f"{t}_offpolicy", f"{t}_sft"),
             "soft_vs_hard_base_sequences": (f"{t}_base_offpolicy", "control")}
    g = {key: {k: _stat(table[a][k] - table[b][k]) for k in METRICS}
         for key, (a, b) in pairs.items() if a in table and b in table}
    cells4 = (f"{t}_offpolicy", f"{t}_sft", f"{t}_base_offpolicy", "control")
    if all(x in table for x in cells4):
      a, b, c2, d = (table[x] for x in cells4)
      g["interaction"] = {k: _stat((a[k] - b[k]) - (c2[k] - d[k])) for k in METRICS}
    if g:
      grid[t] = g
  drift = {}
  for src in layout["drift"]:
    v = [_read(dirs[s] / f"seed{s}/drift/{src}/drift.json")["kl_per_token"] for s in seeds]
    drift[src] = {"mean": float(np.mean(v)), "per_seed": v}
  absorbed = {}
  for n, t in layout["absorbed"]:
    if t not in drift:
      continue
    kl = [_read(dirs[s] / f"seed{s}/absorbed/{n}/absorbed.json")["kl_teacher_student"]
          for s in seeds]
    share = [1.0 - x / d if d > 0 else None for x, d in zip(kl, drift[t]["per_seed"])]
    ok = [v for v in share if v is not None]
    absorbed[n] = {"kl_teacher_student": float(np.mean(kl)),
                   "share": float(np.mean(ok)) if ok else None, "per_seed": share}
  filters, timing = {}, {"data": {}, "students": {}}
  for s in seeds:
    filters[s], timing["data"][s] = {}, {}
    for k in layout["data"]:
      f = _read(dirs[s] / f"seed{s}/data_{k}/filter.json")
      timing["data"][s][k] = f.pop("seconds", None)
      f.pop("model", None)  # a path: the same data under another workdir is the same result
      filters[s][k] = f
  compute = {}
  for name, _, _ in layout["students"]:
    done = [s for s in seeds if (dirs[s] / f"seed{s}/{name}/_COMPLETE.json").exists()]
    per = [_compute(dirs[s] / f"seed{s}/{name}") for s in done]
    if per:
      compute[name] = {k: float(np.mean([p[k] for p in per])) for k in per[0]}
      timing["students"][name] = float(np.mean(
          [_read(dirs[s] / f"seed{s}/{name}/_COMPLETE.json").get("seconds") or 0 for s in done]))
  report = {"animal": config.sl.animal, "seeds": seeds, "questions": table[names[0]]["rate"].shape[1],
            "samples_per_question": config.sl.eval_samples, "targets": layout["targets"],
            "models": models, "contrasts": contrasts, "noise_floor": floor, "grid": grid,
            "drift": drift, "absorbed": absorbed, "filter": filters, "compute": compute,
            "cells": cell_of, "teacher_of": teacher_of, "timing": timing,
            "provenance": provenance}
  if seed_dirs:
    report["independent_seeds"] = True
  report["conclusions"] = conclusions(report)
  if layout.get("em_eval"):
    report["em_eval"] = layout["em_eval"]
  write_json(out_dir / "report.json", report)
  (out_dir / "report.md").write_text(markdown(config, report))
  plot(report, out_dir / "trait.png")
  return report


def results(report: dict) -> dict:
  """The report without its volatile parts (`VOLATILE`): equal for equal commit, config and
  seeds, whatever the worker count or the machine's speed."""
  out = json.loads(json.dumps(report))
  for key in VOLATILE:
    *path, leaf = key.split(".")
    node = out
    for p in path:
      node = node.get(p, {})
    node.pop(leaf, None)
  return out


# ------------------------------------------------------------------ text

def _pct(v, digits=1) -> str:
  return f"{100 * v:.{digits}f}"


def _ci(r, k, digits=1) -> str:
  lo, hi = r[k + "_ci"]
  return f"{_pct(r[k], digits)} [{_pct(lo, digits)}, {_pct(hi, digits)}]"


def _floor(report, k) -> float | None:
  f = report.get("noise_floor")
  return None if f is None else f[k]["floor"]


def conclusions(report: dict) -> list[str]:
  """One sentence per teacher and student: does it differ from its base, and (students of
  the base) from the control, by more than the noise floor? On the trait rate."""
  floor = _floor(report, "rate")
  out = []
  fl = f"noise floor {_pct(floor)} points" if floor is not None else \
      "no noise floor (cell control_b not trained): compared with 0"
  for n, c in report["contrasts"].items():
    parts = []
    for key, vs in c.items():
      if key == "did":
        st = vs["rate"]
        verdict = "differs" if seed_stats.distinguishable(st, floor) else \
            "is not distinguishable"
        parts.append(f"{verdict} in difference in differences ((student - other base) - "
                     f"(control - base): {seed_stats.interval(st)} points)")
        continue
      ref = key[3:]
      st = vs["rate"]
      verdict = "differs from" if seed_stats.distinguishable(st, floor) else \
          "is not distinguishable from"
      parts.append(f"{verdict} {'its base' if ref in ('base', 'other_base') else 'the control'}"
                   f" ({ref}: {seed_stats.interval(st)} points)")
    if parts:
      out.append(f"{n}: {_pct(report['models'][n]['rate'])}% " + "; ".join(parts) + f" ({fl}).")
  return out


def table_markdown(report) -> str:
  """Per model: trait rate and P(target) with seed-level intervals, and per-seed rates."""
  floor = report.get("noise_floor")
  lines = ["| model | trait rate % [95% CI] | P(target) % [95% CI] | rate - control | "
           "rate - own base | per seed rate % |", "|---|---|---|---|---|---|"]
  for n, r in report["models"].items():
    c = report["contrasts"].get(n, {})
    ref = "vs_" + reference_of(n, report["cells"].get(n))
    f = _floor(report, "rate")
    vc = seed_stats.describe(c["vs_control"]["rate"], f) if "vs_control" in c else "-"
    vb = seed_stats.describe(c[ref]["rate"], f) if ref in c else "-"
    per = " / ".join(_pct(v["rate"]) for v in r["seeds"].values())
    lines.append(f"| {n} | {_ci(r, 'rate')} | {_ci(r, 'prob', 2)} | {vc} | {vb} | {per} |")
  return "\n".join(lines)


def _grid_markdown(report) -> list[str]:
  out = []
  for t, g in report["grid"].items():
    m = report["models"]
    def cell(name):
      return "-" if name not in m else f"{_pct(m[name]['rate'])}% / {_pct(m[name]['prob'], 2)}%"
    out += [f"Teacher `{t}` (trait rate / P(target)):", "",
            "| sequences \\ signal | hard labels | teacher distributions |", "|---|---|---|",
            f"| teacher's | {cell(f'{t}_sft')} | {cell(f'{t}_offpolicy')} |",
            f"| base's | {cell('control')} | {cell(f'{t}_base_offpolicy')} |",
            f"| student's own (on-policy) | - | {cell(f'{t}_onpolicy')} |", "",
            "Contrasts (trait rate points, paired by seed and question):", ""]
    f = _floor(report, "rate")
    out += [f"- {key.replace('_', ' ')}: {seed_stats.describe(v['rate'], f)}"
            for key, v in g.items()]
    out.append("")
  return out


def markdown(config, report) -> str:
  seeds = report["seeds"]
  floor = report.get("noise_floor")
  one = len(seeds) == 1
  lines = [f"# Subliminal learning: {report['animal']}", "",
           f"Seeds {seeds}; {report['questions']} questions x {report['samples_per_question']} "
           "samples at temperature 1 per model and seed. Trait rate: share of answers naming the "
           f"target ({'whole word' if config.sl.whole_word else 'substring'}); P(target): the "
           f"model's exact probability of answering one of {report['targets']}. Values are "
           "means over seeds and questions; 95% intervals from a two-level bootstrap (seeds, then "
           "questions within each seed; jaxlab/pipelines/seed_stats.py), differences paired by "
           "seed and question." + (" One seed: the intervals are over questions only and leave "
                                   "out the training run's variance." if one else ""), ""]
  if floor is not None:
    nc = floor["rate"]["contrast"]
    lines += [f"**Noise floor**: two controls trained when nothing differs (the same recipe on "
              f"another sample of the base's numbers, another shuffle and init) give the A/A "
              f"contrast control_b - control = {seed_stats.interval(nc)} points of trait rate "
              f"(per seed: {', '.join(f'{100 * v:+.1f}' for v in nc['per_seed'])}); the floor is "
              f"the largest difference its interval allows, {_pct(floor['rate']['floor'])} points "
              f"({_pct(floor['prob']['floor'], 2)} points of P(target)). A contrast is called "
              "distinguishable only when its whole interval lies beyond +- the floor. "
              + ("Every seed has its own bases and teachers (trained from its own seed), so the "
                 "intervals include their variance." if report.get("independent_seeds") else
                 "The intervals are conditional on this workdir's base and teachers (trained "
                 "once)."), ""]
    if not floor["rate"]["aa_ok"]:
      lines += ["**Warning**: the A/A contrast's interval excludes 0, so the intervals of this "
                "run are too narrow (too few seeds for the bootstrap); read every contrast with "
                "the floor, not with 0.", ""]
  else:
    lines += ["**No noise floor** (cell `control_b` not trained): contrasts are compared with "
              "0, which understates the uncertainty.", ""]
  lines += [table_markdown(report), "", "## Conclusions", ""]
  lines += [f"- {c}" for c in report["conclusions"]]
  lines += ["", "## Sequences x signal", ""] + _grid_markdown(report)
  lines += ["## Number drift from the base", "",
            "Mean per-token KL(model in its context || base) on its kept number completions "
            "(teachers), or on the base's (other base: the scale of a visible change; control: "
            "how far a student moves with nothing to learn), nats/token; mean and per seed.", ""]
  for k, v in report["drift"].items():
    per = ", ".join(f"{x:.4f}" for x in v["per_seed"])
    lines.append(f"- {k}: {v['mean']:.4f} ({per})")
  if report["absorbed"]:
    lines += ["", "## Absorbed share of the teacher's number KL", "",
              "1 - KL(teacher || student) / KL(teacher || base) on the teacher's kept numbers "
              "(the rows the sequence cells trained on); 1 = the student copies the teacher's "
              "number distributions, 0 = it stayed at the base, below 0 = it moved away from the "
              "teacher further than the base is (its own training noise exceeds the teacher's "
              "drift); mean (per seed).", ""]
    for n, a in report["absorbed"].items():
      per = ", ".join(f"{x:.2f}" for x in a["per_seed"])
      lines.append(f"- {n}: {a['share']:.2f} ({per})")
  lines += ["", "## Filter (per seed)", "", "| seed | source | answers | kept | accepted % | "
            "rejected by reason |", "|---|---|---|---|---|---|"]
  for s, by in report["filter"].items():
    for src, f in sorted(by.items()):
      rej = ", ".join(f"{k} {v}" for k, v in f["counts"].items() if k != "ok" and v)
      lines.append(f"| {s} | {src} | {f['answers']} | {f['kept']} | "
                   f"{100 * f['accept_rate']:.1f} | {rej or '-'} |")
  lines += ["", "## Student compute (mean over seeds)", "",
            "| student | optimizer steps | trained tokens |", "|---|---|---|"]
  for n, c in report["compute"].items():
    lines.append(f"| {n} | {c['steps']:.0f} | {c['trained_tokens']:.0f} |")
  if report.get("em_eval"):
    from jaxlab.evals.report import markdown_table
    lines += ["", f"## EM evaluation ({report['em_eval']['spec']})", "",
              "The misaligned teacher's trait: em / mo / seed shares (pooled over questions, "
              "95% intervals) of every model sampled without a system prompt; per-answer files "
              "under seed{S}/em_eval/eval.", ""]
    for s, rows in report["em_eval"]["pooled"].items():
      lines += [f"Seed {s}:", "", markdown_table(rows)]
  p = report["provenance"]
  lines += ["", "## Provenance", "",
            f"- commit {p['commit']}{' (with uncommitted changes)' if p.get('dirty') else ''}; "
            f"config hash {p['config_hash']} (sha256 of the config without {p['hash_leaves_out']})",
            f"- {', '.join(f'{k} {v}' for k, v in p['versions'].items())}",
            f"- worker processes: {p['workers']} (the results do not depend on it)",
            "", "Timing (wall seconds, mean over seeds; varies run to run): " +
            ", ".join(f"{n} {t:.1f}" for n, t in report["timing"]["students"].items()),
            "", "![trait](trait.png)", ""]
  return "\n".join(lines)


def plot(report, path) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  names = list(report["models"])
  fig, axes = plt.subplots(1, 2, figsize=(max(8, 0.7 * len(names)), 4.5))
  for ax, k, label in ((axes[0], "rate", "trait rate %"), (axes[1], "prob", "P(target) %")):
    v = np.asarray([100 * report["models"][n][k] for n in names])
    ci = np.asarray([[100 * x for x in report["models"][n][k + "_ci"]] for n in names])
    ax.bar(range(len(names)), v, yerr=[v - ci[:, 0], ci[:, 1] - v], capsize=3,
           color=["grey" if n in ("base", "other_base", "control", "control_b") else
                  "tab:red" if n.startswith("teacher") else "tab:blue" for n in names])
    for i, n in enumerate(names):  # each seed's value as a dot: the unit of replication
      ax.plot([i] * len(report["models"][n]["seeds"]),
              [100 * s[k] for s in report["models"][n]["seeds"].values()], "k.", ms=3)
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels(names, rotation=60, ha="right", fontsize=7)
    ax.set_ylabel(label)
  fig.suptitle(f"{report['animal']}: seeds {report['seeds']}, 95% CI over seeds then questions")
  fig.tight_layout()
  with epath.Path(path).open("wb") as f:
    fig.savefig(f, format="png", dpi=100)
  plt.close(fig)
