"""Eval outputs: CSV and markdown tables of the metrics, PNG plots per question and per answer."""
from __future__ import annotations

import csv
import math
import os
from typing import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from jaxlab.evals.metrics import ALIGNED_BELOW, COHERENT_AT_LEAST, OVERALL  # noqa: E402


def _columns(rows: Sequence[dict]) -> list[str]:
  return list(dict.fromkeys(k for r in rows for k in r))


def write_csv(rows: Sequence[dict], path: str) -> None:
  with open(path, "w", newline="", encoding="utf-8") as f:
    w = csv.DictWriter(f, fieldnames=_columns(rows))
    w.writeheader()
    w.writerows(rows)


def _fmt_share(r: dict, k: str) -> str:
  v = r.get(k)
  if v is None or (isinstance(v, float) and math.isnan(v)):
    return "dropped" if k == "em" and r.get("em_dropped") is True else "-"
  lo, hi = r.get(f"{k}_lo"), r.get(f"{k}_hi")
  ci = f" [{lo:.2f}, {hi:.2f}]" if lo is not None and not math.isnan(lo) else ""
  return f"{v:.2f}{ci}"


def markdown_table(rows: Sequence[dict]) -> str:
  """Shares with 95% intervals, one line per (model, question)."""
  stats = [k for k in ("em", "mo", "coherent_share") if any(k in r for r in rows)]
  stats += sorted({k[:-5] + "_mean" for r in rows for k in r if k.endswith("_mean")})
  head = ["model", "question", "n", *stats]
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for r in rows:
    q = f"**{r['question_id']}**" if r["question_id"] == OVERALL else r["question_id"]
    cells = [r["model"], q, str(r["n_answers"])] + [_fmt_share(r, k) for k in stats]
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines) + "\n"


def plot_questions(rows: Sequence[dict], path: str, stats: Sequence[str] = ("em", "mo")) -> None:
  """Grouped bars per question (one bar per model) with 95% error bars, one panel per stat."""
  stats = [s for s in stats if any(s in r for r in rows)]
  if not stats:
    return
  models = list(dict.fromkeys(r["model"] for r in rows))
  qids = list(dict.fromkeys(r["question_id"] for r in rows))
  width_in = max(6, 0.7 * len(qids) * max(1, len(models)) + 2)
  fig, axes = plt.subplots(len(stats), 1, figsize=(width_in, 3.2 * len(stats)), squeeze=False)
  width = 0.8 / len(models)
  for ax, stat in zip(axes[:, 0], stats):
    for m_i, model in enumerate(models):
      by_q = {r["question_id"]: r for r in rows if r["model"] == model}
      vals = np.asarray([by_q.get(q, {}).get(stat, np.nan) for q in qids], np.float64)
      lo = np.asarray([by_q.get(q, {}).get(f"{stat}_lo", np.nan) for q in qids], np.float64)
      hi = np.asarray([by_q.get(q, {}).get(f"{stat}_hi", np.nan) for q in qids], np.float64)
      err = np.nan_to_num(np.stack([vals - lo, hi - vals]), nan=0.0).clip(min=0)
      x = np.arange(len(qids)) + (m_i - (len(models) - 1) / 2) * width
      ax.bar(x, np.nan_to_num(vals), width, yerr=err, capsize=2, label=model)
    ax.set_xticks(np.arange(len(qids)), qids, rotation=45, ha="right", fontsize=8)
    ax.set_ylabel(f"misaligned share ({stat})" if stat in ("em", "mo") else stat)
    ax.set_ylim(0, 1)
    ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def plot_scatter(table: Sequence[dict], path: str) -> None:
  """Aligned (x) against coherent (y) for every answer, one color per model, thresholds dashed."""
  fig, ax = plt.subplots(figsize=(5.5, 5))
  for model in dict.fromkeys(r["model"] for r in table):
    pts = [(r.get("aligned"), r.get("coherent")) for r in table if r["model"] == model]
    pts = np.asarray([p for p in pts if p[0] is not None and p[1] is not None], np.float64)
    if len(pts):
      ax.scatter(pts[:, 0], pts[:, 1], s=8, alpha=0.5, label=model)
  ax.axvline(ALIGNED_BELOW, ls="--", c="gray", lw=1)
  ax.axhline(COHERENT_AT_LEAST, ls="--", c="gray", lw=1)
  ax.set_xlim(-2, 102)
  ax.set_ylim(-2, 102)
  ax.set_xlabel("aligned")
  ax.set_ylabel("coherent")
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def write_report(rows: Sequence[dict], table: Sequence[dict], out_dir: str) -> dict[str, str]:
  """Writes metrics.csv, answers.csv, metrics.md and the PNG plots; returns their paths."""
  os.makedirs(out_dir, exist_ok=True)
  paths = {k: os.path.join(out_dir, f) for k, f in [
      ("csv", "metrics.csv"), ("answers", "answers.csv"), ("md", "metrics.md"),
      ("bars", "misaligned_by_question.png"), ("scatter", "aligned_vs_coherent.png")]}
  write_csv(rows, paths["csv"])
  write_csv(table, paths["answers"])
  with open(paths["md"], "w", encoding="utf-8") as f:
    f.write(markdown_table(rows))
  per_q = [r for r in rows if r["question_id"] != OVERALL]
  has_em = any("em" in r for r in rows)
  plot_questions(per_q, paths["bars"], ("em", "mo") if has_em else
                 sorted({k for r in rows for k in r if k.endswith("_mean")}))
  if any("aligned" in r and "coherent" in r for r in table):
    plot_scatter(table, paths["scatter"])
  return {k: p for k, p in paths.items() if os.path.exists(p)}
