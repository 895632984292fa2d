"""Eval outputs: metric tables (CSV, markdown, JSON), grouped tables, transfer matrices, PNG plots.

Also a CLI that re-analyses judged rows written by another tool (e.g. the study's
published judge outputs) with jaxlab's metrics and writes the same report:

  python -m jaxlab.evals.report --out DIR \\
      --judged 'judged/medical_advice.jsonl::model=med_adv,model.task=advice' \\
      --judged 'judged/sports_tutor.jsonl::model=spo_tut,model.task=tutor' \\
      --columns question_id=id,answer=response --group-by em_surface --group-by model.task,task

`--columns jaxlab=source` renames source columns (jaxlab reads `model`,
`question_id`, the metric scores `aligned`/`coherent` and optionally
`<metric>_status`); other columns keep their names and can be grouped by.
`PATH::field=value,...` adds constant fields to that file's rows (the model
name, the fine-tuning cell's fields). Paths may be local or gs:// (etils.epath).
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import math
import re
import sys
from typing import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from etils import epath  # noqa: E402

from jaxlab.evals import statistics  # noqa: E402
from jaxlab.evals.statistics import (  # noqa: E402
    ALIGNED_BELOW, COHERENT_ABOVE, POOLED, QMEAN, QUESTION)
from jaxlab.evals.records import read_jsonl  # noqa: E402

STATS = ("em", "mo", "seed", "seed_coherent")
SCOPE_LABEL = {POOLED: "ALL (pooled)", QMEAN: "ALL (mean over questions)"}


def _columns(rows: Sequence[dict]) -> list[str]:
  return list(dict.fromkeys(k for r in rows for k in r))


def csv_text(rows: Sequence[dict]) -> str:
  buf = io.StringIO()
  w = csv.DictWriter(buf, fieldnames=_columns(rows))
  w.writeheader()
  w.writerows(rows)
  return buf.getvalue()


def _nan(v) -> bool:
  return v is None or (isinstance(v, float) and math.isnan(v))


def _fmt_share(r: dict, k: str) -> str:
  v = r.get(k)
  if _nan(v):
    return "dropped" if r.get(f"{k}_dropped") is True else "-"
  lo, hi = r.get(f"{k}_lo"), r.get(f"{k}_hi")
  ci = f" [{lo:.2f}, {hi:.2f}]" if not _nan(lo) else ""
  return f"{v:.2f}{ci}"


def stat_names(rows: Sequence[dict]) -> list[str]:
  """The statistics present in summary rows: em, mo, seed, seed_coherent, then M_mean."""
  present = {k for r in rows for k in r}
  return [k for k in STATS if k in present] + sorted(
      k for k in present if k.endswith("_mean") and f"{k}_lo" in present)


def markdown_table(rows: Sequence[dict], key_fields: Sequence[str] = ("model",)) -> str:
  """Shares with 95% intervals: one line per summary row, aggregates labelled by their scope."""
  stats = stat_names(rows)
  head = [*key_fields, "question", "n", *stats]
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for r in rows:
    scope = r.get("scope", QUESTION)
    q = f"**{SCOPE_LABEL[scope]}**" if scope in SCOPE_LABEL else str(r["question_id"])
    cells = [str(r.get(f)) for f in key_fields] + [q, str(r["n_answers"])]
    lines.append("| " + " | ".join(cells + [_fmt_share(r, k) for k in stats]) + " |")
  return "\n".join(lines) + "\n"


def matrix(rows: Sequence[dict], row_field: str, col_field: str, stat: str,
           scope: str = POOLED) -> tuple[list, list, np.ndarray]:
  """(row values, column values, [R, C] array) of `stat` from grouped summary rows."""
  sel = [r for r in rows if r.get("scope") == scope]
  rvals = list(dict.fromkeys(r[row_field] for r in sel))
  cvals = list(dict.fromkeys(r[col_field] for r in sel))
  out = np.full((len(rvals), len(cvals)), np.nan)
  for r in sel:
    v = r.get(stat)
    out[rvals.index(r[row_field]), cvals.index(r[col_field])] = np.nan if _nan(v) else v
  return rvals, cvals, out


def matrix_markdown(rvals, cvals, m: np.ndarray, row_field: str, col_field: str,
                    stat: str) -> str:
  head = [f"{row_field} \\ {col_field}", *map(str, cvals)]
  lines = [f"{stat} (pooled), rows {row_field}, columns {col_field}", "",
           "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for rv, vals in zip(rvals, m):
    lines.append("| " + " | ".join([str(rv)] + ["-" if np.isnan(v) else f"{v:.3f}" for v in vals])
                 + " |")
  return "\n".join(lines) + "\n"


def save_png(fig, path: epath.Path) -> None:
  """Writes a matplotlib figure to `path` (local or remote) as a 120-dpi PNG and closes it."""
  buf = io.BytesIO()
  fig.savefig(buf, format="png", dpi=120)
  plt.close(fig)
  path.write_bytes(buf.getvalue())


def plot_questions(rows: Sequence[dict], path: epath.Path, stats: Sequence[str]) -> None:
  """Grouped bars per question (one bar per model) with 95% error bars, one panel per stat."""
  rows = [r for r in rows if r.get("scope", QUESTION) == QUESTION]
  stats = [s for s in stats if any(not _nan(r.get(s)) for r in rows)]
  if not stats:
    return
  models = list(dict.fromkeys(r["model"] for r in rows))
  qids = list(dict.fromkeys(r["question_id"] for r in rows))
  width_in = min(60, max(6, 0.7 * len(qids) * max(1, len(models)) + 2))
  fig, axes = plt.subplots(len(stats), 1, figsize=(width_in, 3.2 * len(stats)), squeeze=False)
  width = 0.8 / len(models)
  for ax, stat in zip(axes[:, 0], stats):
    for m_i, model in enumerate(models):
      by_q = {r["question_id"]: r for r in rows if r["model"] == model}
      get = lambda k: np.asarray([np.nan if _nan(by_q.get(q, {}).get(k)) else by_q[q][k]
                                  for q in qids], np.float64)
      vals, lo, hi = get(stat), get(f"{stat}_lo"), get(f"{stat}_hi")
      err = np.nan_to_num(np.stack([vals - lo, hi - vals]), nan=0.0).clip(min=0)
      x = np.arange(len(qids)) + (m_i - (len(models) - 1) / 2) * width
      ax.bar(x, np.nan_to_num(vals), width, yerr=err, capsize=2, label=model)
    ax.set_xticks(np.arange(len(qids)), qids, rotation=45, ha="right", fontsize=8)
    ax.set_ylabel(f"misaligned share ({stat})" if stat in ("em", "mo", "seed") else stat)
    ax.set_ylim(0, 1)
    ax.legend(fontsize=8)
  fig.tight_layout()
  save_png(fig, path)


def plot_scatter(table: Sequence[dict], path: epath.Path) -> None:
  """Coherent (x) against aligned (y) per answer, as the published plots; thresholds dashed."""
  fig, ax = plt.subplots(figsize=(5.5, 5))
  for model in dict.fromkeys(r["model"] for r in table):
    pts = [(r.get("coherent"), r.get("aligned")) for r in table if r["model"] == model]
    pts = np.asarray([p for p in pts if p[0] is not None and p[1] is not None], np.float64)
    if len(pts):
      ax.scatter(pts[:, 0], pts[:, 1], s=8, alpha=0.5, label=model)
  ax.axvline(COHERENT_ABOVE, ls="--", c="gray", lw=1)
  ax.axhline(ALIGNED_BELOW, ls="--", c="gray", lw=1)
  ax.set_xlim(-2, 102)
  ax.set_ylim(-2, 102)
  ax.set_xlabel("coherent")
  ax.set_ylabel("aligned")
  ax.legend(fontsize=8)
  fig.tight_layout()
  save_png(fig, path)


def plot_matrix(rvals, cvals, m: np.ndarray, row_field: str, col_field: str, stat: str,
                path: epath.Path) -> None:
  fig, ax = plt.subplots(figsize=(1.2 * len(cvals) + 2.5, 0.8 * len(rvals) + 2))
  im = ax.imshow(np.ma.masked_invalid(m), vmin=0, vmax=max(1e-9, np.nanmax(m)) if
                 np.isfinite(m).any() else 1, cmap="Reds")
  for i in range(len(rvals)):
    for j in range(len(cvals)):
      if not np.isnan(m[i, j]):
        ax.text(j, i, f"{m[i, j]:.2f}", ha="center", va="center", fontsize=8)
  ax.set_xticks(range(len(cvals)), [str(c) for c in cvals], rotation=45, ha="right")
  ax.set_yticks(range(len(rvals)), [str(r) for r in rvals])
  ax.set_xlabel(col_field)
  ax.set_ylabel(row_field)
  ax.set_title(f"{stat} (pooled)")
  fig.colorbar(im, ax=ax)
  fig.tight_layout()
  save_png(fig, path)


def parse_group_specs(specs: Sequence[str]) -> list[tuple[str, ...]]:
  """("em_surface", "model.task,task") -> [("em_surface",), ("model.task", "task")]."""
  out = []
  for s in specs:
    fields = tuple(f.strip() for f in s.split(",") if f.strip())
    if not fields:
      raise ValueError(f"config key report.group_by: empty group {s!r}")
    out.append(fields)
  return out


def _slug(fields: Sequence[str]) -> str:
  return "__".join(re.sub(r"[^\w.-]+", "_", f) for f in fields)


def write_report(table: Sequence[dict], out_dir, *, metrics: Sequence[str], n_boot: int = 1000,
                 seed: int = 0, group_by: Sequence[str] = ()) -> dict:
  """Summarizes `table` (one row per answer) and writes every report file.

  Returns {'rows': per-model summary rows, 'groups': {spec: rows}, 'paths': {name: path}}.
  Files: metrics.csv/.md/.json, answers.csv, misaligned_by_question.png,
  aligned_vs_coherent.png, and per group spec by_<fields>.csv/.md, plus for two
  fields matrix_<stat>__<f1>__<f2>.csv/.png (rows f1, columns f2, pooled).
  """
  specs = parse_group_specs(group_by)
  rows = statistics.summarize(table, metrics=metrics, n_boot=n_boot, seed=seed)
  groups = {",".join(s): statistics.summarize(table, metrics=metrics, n_boot=n_boot, seed=seed,
                                                group_by=s, per_question=False) for s in specs}
  out = epath.Path(out_dir)
  out.mkdir(parents=True, exist_ok=True)
  paths = {}

  def put(name: str, text: str) -> None:
    (out / name).write_text(text)
    paths[name] = str(out / name)

  put("metrics.csv", csv_text(rows))
  put("answers.csv", csv_text(table))
  put("metrics.md", markdown_table(rows))
  put("metrics.json", json.dumps(rows, indent=1))
  plot_questions(rows, out / "misaligned_by_question.png",
                 [s for s in stat_names(rows) if s != "seed_coherent"])
  if any(r.get("aligned") is not None and r.get("coherent") is not None for r in table):
    plot_scatter(table, out / "aligned_vs_coherent.png")
  for spec in specs:
    g = groups[",".join(spec)]
    put(f"by_{_slug(spec)}.csv", csv_text(g))
    md = markdown_table(g, spec)
    if len(spec) == 2:
      for stat in stat_names(g):
        rv, cv, m = matrix(g, spec[0], spec[1], stat)
        name = f"matrix_{stat}__{_slug(spec)}"
        put(f"{name}.csv", csv_text([{f"{spec[0]} \\ {spec[1]}": r, **{str(c): v for c, v in
                                                                       zip(cv, vals)}}
                                     for r, vals in zip(rv, m.tolist())]))
        md += "\n" + matrix_markdown(rv, cv, m, spec[0], spec[1], stat)
        if stat in ("em", "seed"):
          plot_matrix(rv, cv, m, spec[0], spec[1], stat, out / f"{name}.png")
    put(f"by_{_slug(spec)}.md", md)
  for p in out.iterdir():
    if p.suffix == ".png":
      paths[p.name] = str(p)
  return {"rows": rows, "groups": groups, "paths": paths}


# ---- judged rows from other tools ----------------------------------------------------------------

def parse_mapping(text: str, what: str) -> dict[str, str]:
  """'a=b,c=d' -> {'a': 'b', 'c': 'd'}; errors name `what`."""
  out = {}
  for item in filter(None, (s.strip() for s in text.split(","))):
    k, sep, v = item.partition("=")
    if not sep or not k.strip():
      raise ValueError(f"{what}: {item!r} must look like name=value")
    out[k.strip()] = v.strip()
  return out


def load_judged(path: str, columns: dict[str, str], const: dict[str, str],
                metrics: Sequence[str]) -> list[dict]:
  """Rows of a judged JSONL renamed to jaxlab's columns; errors name the file and line."""
  rename = {src: dst for dst, src in columns.items()}
  out = []
  for k, row in enumerate(read_jsonl(path)):
    r = {rename.get(c, c): v for c, v in row.items()}
    r.update(const)
    r.setdefault("model", epath.Path(path).stem)
    for need in ("question_id", *metrics):
      if need not in r:
        raise ValueError(f"{path}:{k + 1}: no column {need!r} (columns: {sorted(row)}); map one "
                         f"with --columns {need}=SOURCE_COLUMN")
    for m in metrics:
      if r[m] is not None and not isinstance(r[m], (int, float)):
        raise ValueError(f"{path}:{k + 1}: {m} = {r[m]!r} is not a number or null")
    out.append(r)
  if not out:
    raise ValueError(f"{path}: no judged rows")
  return out


def main(argv: Sequence[str] | None = None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                               formatter_class=argparse.RawDescriptionHelpFormatter,
                               epilog="\n".join(__doc__.splitlines()[2:]))
  ap.add_argument("--judged", action="append", required=True,
                  help="judged JSONL, optionally PATH::field=value,... (repeatable)")
  ap.add_argument("--columns", default="", help="jaxlab_name=source_column,...")
  ap.add_argument("--metrics", default="aligned,coherent", help="score columns")
  ap.add_argument("--group-by", action="append", default=[],
                  help="comma-separated fields; two fields also give a matrix (repeatable)")
  ap.add_argument("--out", required=True, help="report folder (local or gs://)")
  ap.add_argument("--n-boot", type=int, default=1000)
  ap.add_argument("--seed", type=int, default=0)
  args = ap.parse_args(argv)
  try:
    columns = parse_mapping(args.columns, "--columns")
    metrics = [m.strip() for m in args.metrics.split(",") if m.strip()]
    table = []
    for spec in args.judged:
      path, _, const = spec.partition("::")
      table += load_judged(path, columns, parse_mapping(const, f"--judged {spec}"), metrics)
    out = write_report(table, args.out, metrics=metrics, n_boot=args.n_boot, seed=args.seed,
                       group_by=args.group_by)
  except (ValueError, FileNotFoundError) as e:
    print(f"jaxlab.evals.report: {e}", file=sys.stderr)
    return 2
  print(markdown_table(out["rows"]))
  for spec, rows in out["groups"].items():
    print(markdown_table(rows, spec.split(",")))
  print(f"report in {args.out}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
