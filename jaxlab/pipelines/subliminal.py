"""Subliminal learning across channels: does a teacher's trait travel through number sequences?

  python -m jaxlab.pipelines.subliminal --config=configs/subliminal.py:tiny --workdir=DIR [--plan]

`--plan` prints the stages (`plan`: complete and skipped, or to run, with their inputs) and
exits without running or writing anything; a run prints the same in a few lines first, then
each stage's [k/N] line, its progress and its time, and the time left.

Stages (each a folder of DIR, skipped when complete, so a killed pipeline resumes):
  world                        the tiny SL world (config.base = "")
  base_pretrain, base          a base pretrained on the world's mixture, then chat-tuned on its
                               chat set (system-prompt following is learned there)
  other_base_pretrain, other_base  the same from another seed (the different-base student)
  teacher_{NAME}                a fine-tuned teacher (the base fine-tuned on trait answers, +
                               as many number docs) or a steered one (steer.json + direction)
  seed{S}/data_{SOURCE}        number prompts answered at temperature 1 by a teacher, the base
                               or (base_b, the noise control's) the base on other prompts and
                               seed; strict filter with counted reasons, sl.n_keep rows kept,
                               the other accepted rows kept aside (spare_rows.jsonl)
  seed{S}/{NAME}_{CELL}        students from the base, one per cell (`CELLS`), equal steps
  seed{S}/eval/{MODEL}         trait rate and exact target probability of every model
  seed{S}/drift/{SOURCE}       number drift from the base (teachers, other base, control)
  seed{S}/absorbed/{STUDENT}   KL(teacher || student) on the teacher's held-out numbers
  report.md, report.json, trait.png (rewritten from the stages every run;
  jaxlab/pipelines/subliminal_report.py)

Each stage is a module of jaxlab.pipelines.sl naming the files it reads and writes; this module
composes them (`plan` lists the stages, `run` runs them in the same order).

Teachers see their own context (the trait system prompt), students never do.
"""
from __future__ import annotations

import json
import os
import sys
import time

import ml_collections
from etils import epath

from jaxlab import console
from jaxlab.pipelines import stages
from jaxlab.pipelines.kit import main as kit_main
from jaxlab.pipelines.kit import workers
from jaxlab.pipelines.kit.models import ModelPool
from jaxlab.pipelines.sl import bases as bases_lib
from jaxlab.pipelines.sl import drift, em_eval, number_data, teachers, trait, world
from jaxlab.pipelines.sl.students import student_config
from jaxlab.pipelines.sl.bases import base_identity
from jaxlab.pipelines.sl.study import (CELLS, NOISE_OFFSET, RESULT_FREE_KEYS, absorbed_students,
                                       cells, data_sources, drift_sources, eval_entries,
                                       config_groups, model_paths, student_names,
                                       target_answers, teacher_model_stage, teacher_source,
                                       teacher_spec, tokenizer_path, trait_prompt, validate)
from jaxlab.pipelines.stages import reads, run_stage, stderr_log
from jaxlab.worlds.io import write_json


def provenance(config) -> dict:
  """What made the report: commit, config hash, package versions and worker count."""
  import hashlib
  import importlib.metadata
  import subprocess
  here = os.path.dirname(os.path.abspath(__file__))
  def git(*args):
    try:
      return subprocess.run(["git", "-C", here, *args], capture_output=True, text=True,
                            timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
      return ""
  d = {k: v for k, v in config.to_dict().items() if k not in RESULT_FREE_KEYS}
  if not d.get("independent_seeds"):  # the key's default is left out of the hash: the hashes
    d.pop("independent_seeds", None)  # of reports from before the key existed stay the same
  versions = {}
  for pkg in ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "numpy", "transformers",
              "tokenizers"):
    try:
      versions[pkg] = importlib.metadata.version(pkg)
    except importlib.metadata.PackageNotFoundError:
      versions[pkg] = "absent"
  return {"commit": git("rev-parse", "--short=12", "HEAD") or "unknown",
          "dirty": bool(git("status", "--porcelain", "--untracked-files=no")),
          "config_hash": hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode())
          .hexdigest()[:16], "hash_leaves_out": list(RESULT_FREE_KEYS),
          "versions": versions, "workers": int(config.get("workers", 1))}


def build_report(config, workdir, paths: dict) -> dict:
  """report.json / report.md / trait.png from the completed stages of this config's models."""
  from jaxlab.pipelines import subliminal_report
  return subliminal_report.build(config, workdir, layout(config, {**paths, "workdir": workdir}),
                                 provenance(config))


def layout(config, paths: dict) -> dict:
  """What the report reads (jaxlab.pipelines.subliminal_report): models, students, sources."""
  students = {name: None for name, _, _ in student_names(config)}
  out = {"models": [n for n, _, _ in eval_entries(config, paths, students)],
         "students": student_names(config), "teachers": list(config.teachers),
         "data": data_sources(config), "drift": drift_sources(config, paths),
         "absorbed": absorbed_students(config), "targets": target_answers(config.sl.animal)}
  if config.em_eval:
    out["em_eval"] = {"spec": config.em_eval, "pooled": em_eval.pooled_rows(paths["workdir"], config.seeds)}
  return out


# The student config groups in a student stage's settings.
STUDENT_KEYS = ("model", "optim", "train", "data", "distill", "init", "tokenizer", "mesh")


# Independent seeds (config.independent_seeds): seed s is a pipeline of its own in
# WORKDIR/run{s}, its bases pretrained from seed SEED_STRIDE * s (its other base from that + 1),
# so no seed's base is another seed's other base.
SEED_STRIDE = 10


def independent(config) -> bool:
  return bool(config.get("independent_seeds", False))


def seed_run_config(config, seed: int) -> ml_collections.ConfigDict:
  """The config of independent seed `seed`'s own run: one seed, its bases from seed
  SEED_STRIDE * seed (jaxlab.pipelines.subliminal_sweep's independent groups use it too)."""
  c = ml_collections.ConfigDict(config.to_dict())
  with c.unlocked():
    c.seed, c.seeds = SEED_STRIDE * seed, (seed,)
    if "independent_seeds" in c:
      c.independent_seeds = False
    # Its bases in its own run folder: one bases_dir shared by all seeds would hold one seed's
    # bases and refuse the next's (a sweep sets a per-seed bases_dir after this).
    c.bases_dir = ""
  return c


def seed_dirs(config, workdir) -> dict:
  return {s: epath.Path(workdir) / f"run{s}" for s in config.seeds}


def _check_independent(config) -> None:
  if independent(config) and config.base:
    raise ValueError("config key independent_seeds=True trains every seed's own bases: it "
                     f"needs base = \"\" (got base={config.base!r})")


def _run_independent(config, workdir, log) -> dict:
  """Every seed's run in WORKDIR/run{s}, then one report over the seeds in WORKDIR."""
  from jaxlab.pipelines import subliminal_report  # pylint: disable=g-import-not-at-top
  t0, cpu0 = time.time(), console.cpu_seconds()
  dirs = seed_dirs(config, workdir)
  for s, d in dirs.items():
    log(f"jaxlab: independent seed {s}: its own bases, teachers, data and students in {d}")
    run(seed_run_config(config, s), str(d), log=log)
  paths = {**model_paths(config, workdir), "workdir": str(workdir)}
  out = subliminal_report.build(config, epath.Path(workdir), layout(config, paths),
                                provenance(config), seed_dirs=dirs)
  out["wall_seconds"] = round(time.time() - t0, 1)
  out["cpu_seconds"] = round(console.cpu_seconds() - cpu0, 1)
  return out


def run(config: ml_collections.ConfigDict, workdir: str, log=stderr_log) -> dict:
  """Runs (or resumes) every stage, then writes report.md; returns the report."""
  validate(config)
  _check_independent(config)
  if independent(config):
    return _run_independent(config, workdir, log)
  for key in ("base", "other_base"):
    if config[key] and not epath.Path(config[key]).exists():
      from jaxlab.models.fetch import fetch_hint
      raise ValueError(f"config key {key}={config[key]!r} is not a model folder"
                       f"{fetch_hint(config[key])}")
  workdir = epath.Path(workdir)
  # The world and the bases may live in a folder shared by several workdirs (`bases_dir`,
  # e.g. the settings of a sweep over teachers and students on one world): their stages are
  # keyed by the world, pretraining, model and seed settings only.
  bases = epath.Path(config.get("bases_dir") or workdir)
  paths = model_paths(config, workdir)
  return kit_main.run_planned(
      plan(config, workdir), lambda: _run(config, workdir, bases, paths, STUDENT_KEYS, log), log,
      name="subliminal pipeline", note=" (this process and its workers)")


def checked_plan(config, workdir) -> stages.Plan:
  """`plan`, with every complete stage's recorded settings compared with this config's
  (`--plan`: a stage the run would refuse is marked so); runs and writes nothing."""
  p = plan(config, workdir)
  workdir = epath.Path(workdir)
  bases = epath.Path(config.get("bases_dir") or workdir)
  return p.check(lambda: _run(config, workdir, bases, model_paths(config, workdir),
                              STUDENT_KEYS, lambda _: None))


def describe_plan(config, workdir) -> str:
  """What `--plan` prints: the checked stage graph (per seed's own run with independent
  seeds)."""
  if independent(config):
    _check_independent(config)
    return "\n".join(f"independent seed {s} ({d}):\n" + describe_plan(seed_run_config(config, s), d)
                     for s, d in seed_dirs(config, workdir).items())
  return checked_plan(config, workdir).describe()


def plan(config, workdir) -> stages.Plan:
  """The stages `run` executes, in its order, with the stages (or model folders) each reads."""
  validate(config)
  workdir = epath.Path(workdir)
  bases = epath.Path(config.get("bases_dir") or workdir)
  paths = model_paths(config, workdir)
  p = stages.Plan(workdir)
  model = {"base": paths["base"], "other_base": paths.get("other_base", "")}
  if not config.base:
    p.add("world", bases)
    p.add("base_pretrain", bases, ["world"])
    p.add("base", bases, ["base_pretrain"])
    model["base"] = "base"
    if "sft_otherbase" in cells(config) and not config.other_base:
      p.add("other_base_pretrain", bases, ["world"])
      p.add("other_base", bases, ["other_base_pretrain"])
      model["other_base"] = "other_base"
  for name in config.teachers:
    stage = teacher_model_stage(config, name)
    if stage is not None:
      p.add(stage, workdir, [model["base"]] + (["world"] if not config.base else []))
  def source(k):  # the stage (or folder) whose model answers as data source / teacher k
    if k in ("base", "base_b") or teacher_spec(config, k)["kind"] == "prompted":
      return model["base"]
    return teacher_model_stage(config, k) or config.teacher.path
  for seed in config.seeds:
    for kind in data_sources(config):
      p.add(f"seed{seed}/data_{kind}", workdir, [source(kind)])
    for name, kind, cell in student_names(config):
      sequences, signal = CELLS[cell]
      data = sequences if sequences in ("base", "base_b") else kind
      init = model["other_base"] if cell == "sft_otherbase" else model["base"]
      p.add(f"seed{seed}/{name}", workdir, [init, f"seed{seed}/data_{data}"]
            + ([source(kind)] if signal == "soft" else []))
    students = {n: f"seed{seed}/{n}" for n, _, _ in student_names(config)}
    for name, path, _ in eval_entries(config, paths, students):
      reads_ = students.get(name) or (source(name[len("teacher_"):])
                                      if name.startswith("teacher_") else model.get(name, path))
      p.add(f"seed{seed}/eval/{name}", workdir, [reads_])
    if config.em_eval:
      p.add(f"seed{seed}/em_eval", workdir, list(students.values()))
    for so in drift_sources(config, paths):
      read = students[so] if so == "control" else model.get(so) or source(so)
      p.add(f"seed{seed}/drift/{so}", workdir, [model["base"], read])
    for name, teacher in absorbed_students(config):
      p.add(f"seed{seed}/absorbed/{name}", workdir, [students[name], source(teacher)])
  return p


def _run(config, workdir: epath.Path, bases: epath.Path, paths: dict, student_keys, log) -> dict:
  """The stages of `run`, in the order `plan` lists them, then the report."""
  if not config.base:
    identity = base_identity(config)
    run_stage(bases, "world", identity["world"],
              lambda f: (world.write(config, f), world.fit_tokenizer(config, f)), log=log)
    base_settings = identity["base"]
    # Each base: pretraining on the mixture (its own stage), then chat tuning; the other base
    # (another seed) in a second process at the same time when config.workers > 1.
    chains = [[("base_pretrain", base_settings, "pretrain", {"seed": config.seed}),
               ("base", base_settings, "chat", {"pretrained": "base_pretrain"})]]
    if "sft_otherbase" in cells(config) and not config.other_base:
      chains.append([("other_base_pretrain", base_settings, "pretrain", {"seed": config.seed + 1}),
                     ("other_base", base_settings, "chat", {"pretrained": "other_base_pretrain"})])
    workers.run_parallel(config, bases, chains, bases_lib.stage_fn, log)
  if "sft_otherbase" in cells(config) and "other_base" not in paths:
    raise ValueError("cell sft_otherbase needs config key other_base (a different base model)")
  models = ModelPool(config, tokenizer_path=tokenizer_path(config, paths["base"]))
  for name in config.teachers:
    spec, stage = teacher_spec(config, name), teacher_model_stage(config, name)
    if stage is None:
      continue
    settings = {**config_groups(config, "world", "pretrain", "teacher_ft", "base"),
                "animal": config.sl.animal, "teacher": spec, **reads(base=paths["base"])}
    if spec["kind"] == "finetuned":
      c = teachers.finetune_config(config, bases / "world", paths["base"], spec)
      settings["training"] = config_groups(c, "optim", "train", "data", "model")
      # Its data by name, not by absolute path: the world's content is in the settings above,
      # so a workdir copied or moved (a sweep's shared bases, a test) keeps its teacher.
      settings["training"]["data"]["train_path"] = str(
          teachers.finetune_data(config, epath.Path("world"), spec))
      fn = lambda f, sp=spec: teachers.finetune(config, bases / "world", paths["base"], f, sp)
    else:
      settings.update(trait_prompt=trait_prompt(config), eval_batch=config.sl.eval_batch)
      fn = lambda f, sp=spec: teachers.steer(config, models, paths["base"], f, sp)
    run_stage(workdir, stage, settings, fn, log=log)
  # The models every stage may name; a teacher of teacher_variants or a steered one is only
  # in the settings of the stages that read it (`reads`), so adding one changes no other stage.
  shared = {k: v for k, v in paths.items() if k in ("base", "other_base", "teacher_finetuned")}
  model_settings = {"paths": shared, **config_groups(config, "world", "pretrain", "teacher_ft",
                                                      "base", "other_base", "teacher")}
  for seed in config.seeds:
    data = {}
    for kind in data_sources(config):
      folder = run_stage(workdir, f"seed{seed}/data_{kind}",
                         {**model_settings, "sl": config.sl.to_dict(), "seed": seed,
                          "data_seed": seed + NOISE_OFFSET if kind == "base_b" else seed,
                          **reads(model=teacher_source(config, kind, paths)[0])},
                         lambda f, k=kind, s=seed: number_data.write(config, models, k, s, paths, f), log=log)
      data[kind] = str(folder / "rows.jsonl")
    students, chains = {}, []
    for name, kind, cell in student_names(config):
      c = student_config(config, kind, cell, seed, paths, data)
      students[name] = workdir / f"seed{seed}/{name}"
      chains.append([(f"seed{seed}/{name}",
                      {**model_settings, "sl": config.sl.to_dict(),
                       "student": config_groups(c, *student_keys), "channel": c.channel,
                       "seed": seed,
                       "train_seed": c.seed,
                       **reads(init=c.init.workdir or c.init.hf_path, teacher=c.teacher.path,
                               data=str(epath.Path(c.data.train_path).parent))},
                      "train", {"config": c.to_json()})])
    workers.run_parallel(config, workdir, chains, bases_lib.stage_fn, log)
    settings = {**model_settings, "sl": config.sl.to_dict(), "seed": seed}
    for name, path, system in eval_entries(config, paths, students):
      r = trait.eval_seed(seed, name)
      run_stage(workdir, f"seed{seed}/eval/{name}", {**settings, "model": path, "system": system,
                                                     "sample_seed": r, **reads(model=path)},
                lambda f, p=path, sy=system, r=r: write_json(
                    f / "eval.json", {**trait.evaluate_trait(config, models, p, sy, r), "path": p,
                                      "system_prompt": sy}), log=log)
    if config.em_eval:
      run_stage(workdir, f"seed{seed}/em_eval", {**settings, "em_eval": config.em_eval,
                                                 "students": {k: str(v) for k, v in students.items()},
                                                 **reads(**paths, **students)},
                lambda f, s=seed, st=students: em_eval.write(config, paths, st, s, f), log=log)
    for source in drift_sources(config, paths):
      model = str(students[source]) if source == "control" else \
          paths.get(source) or teacher_source(config, source, paths)[0]
      run_stage(workdir, f"seed{seed}/drift/{source}",
                {**settings, **reads(base=paths["base"], model=model)},
                lambda f, so=source, d=data, st=students: drift.drift(config, models, so, paths, d, st,
                                                                 f), log=log)
    for name, teacher in absorbed_students(config):
      run_stage(workdir, f"seed{seed}/absorbed/{name}",
                {**settings, **reads(student=str(students[name]),
                                     teacher=teacher_source(config, teacher, paths)[0])},
                lambda f, n=name, k=teacher, d=data, st=students: drift.absorbed(
                    config, models, str(st[n]), k, paths, d, f), log=log)
  if stages.checking():  # --plan: every stage compared; the report is not written
    return {}
  return build_report(config, workdir, paths)


def main(argv: list[str]) -> int:
  return kit_main.main(argv, prog="jaxlab.pipelines.subliminal", describe_plan=describe_plan, run=run,
                       summary=summary, job=("subliminal", "configs/subliminal.py"))


def summary(workdir: str, report: dict | None = None) -> str:
  """The ending the main job prints: wall and CPU time (of the run that returned `report`),
  where the report is, its table and its one-line conclusions."""
  from jaxlab.pipelines import subliminal_report
  took = kit_main.took(report)
  report = json.loads(epath.Path(workdir, "report.json").read_text())
  lines = "\n".join(f"- {c}" for c in report["conclusions"])
  return (f"{took}\nreport: {os.path.join(workdir, 'report.md')}\n\n"
          f"{subliminal_report.table_markdown(report)}\n\n{lines}")


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
