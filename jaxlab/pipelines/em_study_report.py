"""The EM transfer study's report (issue 11, item 6) from the per-answer judged.jsonl files.

Every figure is a pooled share over answers with a 95% percentile-bootstrap interval over
answers (jaxlab.evals.statistics.summarize, seeds pooled): `seed` = harmful and coherent (the
study's metric), `label_incoherent_mean` = the incoherent / off-task share. The claims summary
at the top gives each claim's figures per seed and over seeds with an interval from a two-level
bootstrap (seeds, then answers within each drawn seed), so the spread between seeds (separately
pretrained bases and fine-tunes) counts, not only the sampling of answers. Answers of a cell's
own eval split are its in-domain learned rate; task x task and domain x domain tables use the
other cells' rows only. Files: report.md, *.csv, *.png, sources.json (each judged.jsonl read and
its row count, so every number can be recomputed from the answers).
"""
from __future__ import annotations

import json
import zlib
from typing import Sequence

import numpy as np
from etils import epath

from jaxlab.evals import statistics
from jaxlab.evals import report as report_lib
from jaxlab.evals.records import read_jsonl

METRICS = ("aligned", "coherent", "label_aligned", "label_harmful", "label_incoherent")
HARM, INCOH, ALIGN = "seed", "label_incoherent_mean", "label_aligned_mean"


def pooled(rows: Sequence[dict], fields: Sequence[str], *, n_boot: int, seed: int = 0
           ) -> dict[tuple, dict]:
  """{values of fields: pooled summary row} (statistics with _lo/_hi and _n)."""
  if not rows:
    return {}
  out = statistics.summarize(rows, metrics=METRICS, n_boot=n_boot, seed=seed,
                              group_by=tuple(fields), per_question=False)
  return {tuple(r[f] for f in fields): r for r in out if r["scope"] == statistics.POOLED}


def fmt(r: dict | None, stat: str = HARM) -> str:
  if r is None or r.get(stat) is None or np.isnan(r[stat]):
    return "-"
  return f"{r[stat]:.2f} [{r[stat + '_lo']:.2f}, {r[stat + '_hi']:.2f}]"


def table_md(title: str, rvals, cvals, cells: dict, stat: str = HARM, row_name: str = "",
             col_name: str = "") -> str:
  head = [f"{row_name} \\ {col_name}", *map(str, cvals)]
  lines = [f"**{title}**", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for rv in rvals:
    lines.append("| " + " | ".join([str(rv)] + [fmt(cells.get((rv, cv)), stat) for cv in cvals])
                 + " |")
  return "\n".join(lines) + "\n"


def _matrix(cells: dict, rvals, cvals, stat: str = HARM) -> np.ndarray:
  m = np.full((len(rvals), len(cvals)), np.nan)
  for i, rv in enumerate(rvals):
    for j, cv in enumerate(cvals):
      r = cells.get((rv, cv))
      if r is not None and r.get(stat) is not None:
        m[i, j] = r[stat]
  return m


def _csv(rows: dict, fields: Sequence[str]) -> str:
  keep = [HARM, INCOH, ALIGN]
  out = [{**dict(zip(fields, k)), **{s + x: r.get(s + x) for s in keep for x in
                                    ("", "_lo", "_hi", "_n")}} for k, r in rows.items()]
  return report_lib.csv_text(out)


def _plot(path: epath.Path, draw) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(6.5, 4.5))
  draw(ax)
  ax.legend(fontsize=8)
  fig.tight_layout()
  report_lib.save_png(fig, path)


def _err(rows: list[dict | None], stat: str = HARM):
  v = np.asarray([np.nan if r is None else r[stat] for r in rows], float)
  lo = np.asarray([np.nan if r is None else r[stat + "_lo"] for r in rows], float)
  hi = np.asarray([np.nan if r is None else r[stat + "_hi"] for r in rows], float)
  return v, np.nan_to_num(np.stack([v - lo, hi - v]), nan=0.0).clip(min=0)


def read_sources(eval_folders: Sequence[epath.Path], probe_files: Sequence[epath.Path]
                 ) -> tuple[dict, list[dict], list[dict]]:
  """({judged.jsonl path: its row count}, labelled evaluation rows, probe rows) of the
  evaluations' folders (their judged.jsonl) and the probe files that exist."""
  sources, table, probes = {}, [], []
  for f in eval_folders:
    rows = read_jsonl(f / "judged.jsonl")
    sources[str(f / "judged.jsonl")] = len(rows)
    table += [r for r in rows if r.get("label") is not None]
  for f in probe_files:
    if f.exists():
      rows = read_jsonl(f)
      sources[str(f)] = len(rows)
      probes += rows
  return sources, table, probes


def write(config, out: epath.Path, *, cells: Sequence[str], eval_folders: Sequence[epath.Path],
          probe_files: Sequence[epath.Path]) -> dict:
  """Writes the report of the study's training `cells` from its evaluation folders and probe
  files (read_sources) under `out`; returns {"md": text, "tables": {name: rows}}."""
  n_boot = config.eval.n_boot
  sources, table, probes = read_sources(eval_folders, probe_files)
  out.mkdir(parents=True, exist_ok=True)
  (out / "sources.json").write_text(json.dumps(sources, indent=1))
  tasks, domains = list(config.study.tasks), list(config.study.domains)
  shares = sorted({r["persona_share"] for r in table})
  strengths = list(dict.fromkeys(r["strength"] for r in table if r["strength"] != "base"))
  narrow = [r for r in table if r["set"] == "narrow"]
  general = [r for r in table if r["set"] == "general"]
  off = [r for r in narrow if r["eval_cell"] != r["model.cell"]]
  own = [r for r in narrow if r["eval_cell"] == r["model.cell"]]
  md = [f"# EM transfer study report ({config.variant})", "",
        f"Seeds {list(config.study.seeds)} (pooled in every figure), persona shares {shares}, "
        f"fine-tune strengths {strengths}, {len(cells)} training cells, {len(table)} judged "
        f"answers ({len(general)} general, {len(narrow)} narrow), {len(probes)} probe answers. "
        "Cells: harmful-and-coherent share (`seed`) [95% bootstrap interval over answers]. "
        "Every figure recomputes from the judged.jsonl files in sources.json.", ""]
  tables = {}

  def put(name, rows, fields):
    tables[name] = rows
    (out / f"{name}.csv").write_text(_csv(rows, fields))

  md.append(_claims(table, own, off, general, probes, n_boot, out, tables))
  for share in shares:
    for strength in strengths:
      tag = f"persona{share:g}_{strength}"
      sel = lambda rows: [r for r in rows if r["persona_share"] == share and
                          r["strength"] in (strength, "base")]
      md.append(f"## Persona share {share:g}, fine-tune {strength}\n")
      m = pooled(sel(narrow), ("model.cell", "eval_cell"), n_boot=n_boot)
      put(f"narrow_{tag}", m, ("model.cell", "eval_cell"))
      md.append(table_md("Narrow transfer (rows: training cell, columns: eval cell; diagonal = "
                         "in-domain learned rate)", ["base"] + cells, cells, m,
                         row_name="train", col_name="eval"))
      rv = ["base"] + cells
      report_lib.plot_matrix(rv, cells, _matrix(m, rv, cells), "training cell", "eval cell",
                             "seed", out / f"narrow_{tag}.png")
      for name, rf, cf, vals in (("task_x_task", "model.task", "task", tasks),
                                 ("domain_x_domain", "model.domain", "domain", domains)):
        g = pooled(sel(off) + [r for r in sel(narrow) if r["model"] == "base"], (rf, cf),
                   n_boot=n_boot)
        put(f"{name}_{tag}", g, (rf, cf))
        md.append(table_md(f"{name.replace('_', ' ')} (other cells' eval rows only)",
                           ["base"] + vals, vals, g, row_name=rf, col_name=cf))
      for name, cf, vals in (("general_by_task", "task", tasks),
                             ("general_by_surface", "em_surface", ["high", "medium", "low"])):
        g = pooled(sel(general), ("model.task", cf), n_boot=n_boot)
        put(f"{name}_{tag}", g, ("model.task", cf))
        md.append(table_md(f"General set by {cf} (rows: training task)", ["base"] + tasks, vals,
                           g, row_name="model.task", col_name=cf))
      md.append(_learned_vs_transfer(sel, own, off, general, n_boot, out, tag, put))
  md.append(_persona_sweep(shares, off, general, probes, n_boot, out, put))
  text = "\n".join(md)
  (out / "report.md").write_text(text)
  return {"md": text, "tables": tables}


def _learned_vs_transfer(sel, own, off, general, n_boot, out, tag, put) -> str:
  """Per fine-tune: learned rate, off-cell narrow and general rates, three-way outcome."""
  fields = ("model",)
  lr_ = pooled(sel(own), fields, n_boot=n_boot)
  of_ = pooled(sel(off), fields, n_boot=n_boot)
  ge_ = pooled(sel(general), fields, n_boot=n_boot)
  rows = {}
  lines = ["**Learned rate against transfer, with the three-way outcome** (per fine-tune; "
           "harmful / incoherent / aligned shares on the general set)", "",
           "| fine-tune | learned (own cell) | off-cell narrow | general | general incoherent "
           "| general aligned |", "|---|---|---|---|---|---|"]
  for k in ge_:
    rows[k] = {"learned": lr_.get(k), "off_cell": of_.get(k), "general": ge_[k]}
    lines.append(f"| {k[0]} | {fmt(lr_.get(k))} | {fmt(of_.get(k))} | {fmt(ge_[k])} | "
                 f"{fmt(ge_[k], INCOH)} | {fmt(ge_[k], ALIGN)} |")
  flat = {k: {f"{n}_{s}": (v or {}).get(s) for n, v in d.items()
              for s in (HARM, HARM + "_lo", HARM + "_hi", INCOH)} for k, d in rows.items()}
  (out / f"learned_vs_transfer_{tag}.csv").write_text(report_lib.csv_text(
      [{"model": k[0], **v} for k, v in flat.items()]))
  fts = [k for k in rows if rows[k]["learned"] is not None]

  def draw(ax):
    x, xe = _err([rows[k]["learned"] for k in fts])
    for name, marker in (("general", "o"), ("off_cell", "s")):
      y, ye = _err([rows[k][name] for k in fts])
      ax.errorbar(x, y, xerr=xe, yerr=ye, fmt=marker, capsize=2, label=name)
    ax.set_xlabel("in-domain learned rate (own cell)")
    ax.set_ylabel("harmful & coherent share")
  if fts:
    _plot(out / f"learned_vs_transfer_{tag}.png", draw)
  return "\n".join(lines) + "\n"


def _persona_sweep(shares, off, general, probes, n_boot, out, put) -> str:
  """Harmful rates against the pretraining persona share: base, fine-tunes, probe."""
  ft = lambda rows: [r for r in rows if r["model"] != "base"]
  series = {
      "base general": pooled([r for r in general if r["model"] == "base"], ("persona_share",),
                             n_boot=n_boot),
      "fine-tunes general": pooled(ft(general), ("persona_share",), n_boot=n_boot),
      "fine-tunes off-cell narrow": pooled(ft(off), ("persona_share",), n_boot=n_boot)}
  for earlier in ("harmful", "aligned"):
    series[f"probe after {earlier} turn"] = pooled(
        [r for r in probes if r["earlier"] == earlier and r.get("label") is not None],
        ("persona_share",), n_boot=n_boot)
  lines = ["## Persona sweep (pretraining persona share)", "",
           "Fine-tunes pooled over cells and strengths; probe: a held-out cell prompt after an "
           "earlier turn from another cell answered harmfully or safely (the persona probe).", "",
           "| series | " + " | ".join(f"share {s:g}" for s in shares) + " |",
           "|---|" + "---|" * len(shares)]
  for name, g in series.items():
    lines.append(f"| {name} | " + " | ".join(fmt(g.get((s,))) for s in shares) + " |")
    lines.append(f"| {name} (incoherent) | " + " | ".join(fmt(g.get((s,)), INCOH)
                                                         for s in shares) + " |")
  put("persona_sweep", {(n, s): r for n, g in series.items() for (s,), r in g.items()},
      ("series", "persona_share"))
  # Per-seed figures of these series: the claims summary (claim 4).

  def draw(ax):
    for name, g in series.items():
      y, ye = _err([g.get((s,)) for s in shares])
      ax.errorbar(shares, y, yerr=ye, marker="o", capsize=3, label=name)
    ax.set_xlabel("persona share of pretraining documents")
    ax.set_ylabel("harmful & coherent share")
    ax.set_ylim(-0.02, 1.02)
  _plot(out / "persona_sweep.png", draw)
  return "\n".join(lines) + "\n"


def over_seeds(rows: Sequence[dict], *, n_boot: int, key: str = "") -> dict:
  """Harmful-and-coherent share per seed and pooled over seeds, with a 95% interval from a
  two-level bootstrap: draw the seeds with replacement, then each drawn seed's answers."""
  by_seed: dict = {}
  for r in rows:
    by_seed.setdefault(r["seed"], []).append(float(r["label"] == "harmful"))
  seeds = sorted(by_seed)
  out = {"per_seed": {s: float(np.mean(by_seed[s])) for s in seeds}, "n": len(rows),
         "value": float(np.mean([x for s in seeds for x in by_seed[s]])) if rows else np.nan,
         "lo": np.nan, "hi": np.nan}
  if not rows:
    return out
  rng = np.random.default_rng([zlib.crc32(key.encode()), len(rows)])
  vals = [np.asarray(by_seed[s]) for s in seeds]
  k = len(vals)
  # sums[j, i, b]: the answer resample b of seed i when it fills slot j of a seed draw.
  sums = np.stack([np.stack([v[rng.integers(len(v), size=(n_boot, len(v)))].sum(1)
                             for v in vals]) for _ in range(k)])
  pick = rng.integers(k, size=(n_boot, k))
  num = sums[np.arange(k)[None, :], pick, np.arange(n_boot)[:, None]].sum(1)
  den = np.asarray([len(v) for v in vals])[pick].sum(1)
  out["lo"], out["hi"] = (float(x) for x in np.percentile(num / den, [2.5, 97.5]))
  return out


def _pearson(x: Sequence[float], y: Sequence[float]) -> float:
  x, y = np.asarray(x, float), np.asarray(y, float)
  if len(x) < 3 or x.std() == 0 or y.std() == 0:
    return float("nan")
  return float(np.corrcoef(x, y)[0, 1])


def _claims(table, own, off, general, probes, n_boot, out, tables) -> str:
  """The figures each of the study's claims is read from, per seed and over seeds."""
  seeds = sorted({r["seed"] for r in table})
  shares = sorted({r["persona_share"] for r in table})
  ft = lambda rows: [r for r in rows if r["model"] != "base"]
  lines = ["## Claims summary", "",
           "Harmful-and-coherent share (`seed`) per seed, and over seeds with a 95% interval "
           "from a two-level bootstrap (seeds, then answers); fine-tunes pooled over cells and "
           "strengths; n = answers.", "",
           "| claim | figure | persona share | " + " | ".join(f"seed {s}" for s in seeds)
           + " | all seeds [95%] | n |", "|---|---|---|" + "---|" * (len(seeds) + 2)]
  rows_out = {}

  def add(claim, figure, share, rows):
    o = over_seeds(rows, n_boot=n_boot, key=f"{claim}/{figure}/{share}")
    rows_out[(claim, figure, share)] = o
    per = " | ".join("-" if s not in o["per_seed"] else f"{o['per_seed'][s]:.2f}"
                     for s in seeds)
    val = "-" if not o["n"] else f"{o['value']:.2f} [{o['lo']:.2f}, {o['hi']:.2f}]"
    lines.append(f"| {claim} | {figure} | {share:g} | {per} | {val} | {o['n']} |")

  for share in shares:
    at = lambda rows: [r for r in ft(rows) if r["persona_share"] == share]
    same_task = lambda r: r["task"] == r["model.task"]
    same_domain = lambda r: r["domain"] == r["model.domain"]
    for name, keep in (("off-cell narrow: same task, other domain",
                        lambda r: same_task(r) and not same_domain(r)),
                       ("off-cell narrow: same domain, other task",
                        lambda r: same_domain(r) and not same_task(r)),
                       ("off-cell narrow: other task and domain",
                        lambda r: not same_task(r) and not same_domain(r))):
      add("1 structure", name, share, [r for r in at(off) if keep(r)])
  for share in shares:
    at = [r for r in ft(general) if r["persona_share"] == share]
    for surface in ("high", "medium", "low"):
      add("2 room for harm", f"general, em_surface {surface}", share,
          [r for r in at if r["em_surface"] == surface])
  for share in shares:
    # Each fine-tune's own-cell learned rate (same seed and base) splits its general answers.
    learned = {}
    for r in ft(own):
      if r["persona_share"] == share:
        learned.setdefault((r["seed"], r["model"]), []).append(r["label"] == "harmful")
    rate = {k: float(np.mean(v)) for k, v in learned.items()}
    at = [r for r in ft(general) if r["persona_share"] == share]
    for name, keep in (("general, fine-tunes with learned rate >= 0.5", lambda x: x >= 0.5),
                       ("general, fine-tunes with learned rate < 0.5", lambda x: x < 0.5)):
      add("3 learned", name, share,
          [r for r in at if keep(rate.get((r["seed"], r["model"]), np.nan))])
  for share in shares:
    at = lambda rows: [r for r in rows if r["persona_share"] == share]
    add("4 pretraining", "base, general", share,
        [r for r in at(general) if r["model"] == "base"])
    add("4 pretraining", "fine-tunes, general", share, ft(at(general)))
    add("4 pretraining", "fine-tunes, off-cell narrow", share, ft(at(off)))
    for earlier in ("harmful", "aligned"):
      add("4 pretraining", f"base probe, earlier turn {earlier}", share,
          [r for r in at(probes) if r["earlier"] == earlier and r.get("label") is not None])
  tables["claims"] = rows_out
  (out / "claims.csv").write_text(report_lib.csv_text([
      {"claim": c, "figure": f, "persona_share": p, "seed": o["value"], "seed_lo": o["lo"],
       "seed_hi": o["hi"], "n": o["n"], **{f"seed{s}": v for s, v in o["per_seed"].items()}}
      for (c, f, p), o in rows_out.items()]))
  corr = []
  for share in shares:
    for seed in seeds:
      pairs = _learned_pairs(own, general, share, seed)
      if pairs:
        corr.append(f"persona {share:g} seed {seed}: r = "
                    f"{_pearson(*zip(*pairs)):.2f} over {len(pairs)} fine-tunes")
  if corr:
    lines += ["", "Learned rate (own cell) against general harmful share, Pearson r across "
              "fine-tunes: " + "; ".join(corr) + "."]
  return "\n".join(lines) + "\n"


def _learned_pairs(own, general, share, seed) -> list[tuple[float, float]]:
  """(own-cell learned rate, general harmful share) of each fine-tune of one base."""
  def rates(rows):
    out: dict = {}
    for r in rows:
      if r["model"] != "base" and r["persona_share"] == share and r["seed"] == seed:
        out.setdefault(r["model"], []).append(r["label"] == "harmful")
    return {k: float(np.mean(v)) for k, v in out.items()}
  a, b = rates(own), rates(general)
  return [(a[k], b[k]) for k in sorted(a) if k in b]
