"""The eval job: sample answers, judge them, report misalignment metrics (`job='eval'`).

Stages, each resumable from its files in the workdir:
  answers/<model>.jsonl   sampled answers        (answers.py)
  answers/<model>.settings.json  sampling settings (a rerun with other settings is refused)
  scores/<judge>/<model>.jsonl   judge scores, one folder per judge (judging.py)
  report/                 metrics.csv, metrics.md, answers.csv, PNG plots (metrics.py, report.py)
A stage whose file is complete is skipped without loading its model.
"""
from __future__ import annotations

import gc
import json
import os
import re
import zlib
from typing import Callable

import ml_collections

from jaxlab import sharding as sharding_lib
from jaxlab.data.chat import end_of_turn_ids, pad_id
from jaxlab.evals import answers as answers_lib
from jaxlab.evals import judging, metrics, report
from jaxlab.evals.models import load_model, random_tokenizer
from jaxlab.evals.questions import Question, load_questions
from jaxlab.evals.records import read_jsonl
from jaxlab.sample.engine import Sampler


def mesh_and_rules(config: ml_collections.ConfigDict):
  """The device mesh and logical-axis rules from config.mesh."""
  rules = dict(sharding_lib.DEFAULT_RULES)
  rules.update({k: (tuple(v) if isinstance(v, (list, tuple)) else v)
                for k, v in config.mesh.get("rules", {}).items()})
  return sharding_lib.make_mesh(config.mesh.shape), rules


def model_list(config: ml_collections.ConfigDict) -> list[tuple[str, str]]:
  """(name, path) of the models to evaluate: config.models ("name=path", ...) or model_path."""
  items = [m.partition("=") for m in config.models]
  out = [(n.strip(), p.strip()) for n, sep, p in items if sep]
  if len(out) != len(config.models):
    raise ValueError(f"config key models={tuple(config.models)}: entries must look like "
                     "'name=path'")
  if not out:
    if not config.model_path:
      raise ValueError("set config key model_path (HF folder, jaxlab workdir or 'random:SEED') "
                       "or models=('name=path', ...)")
    out = [(config.model_name, config.model_path)]
  for n, _ in out:
    if not re.fullmatch(r"[\w.-]+", n):
      raise ValueError(f"model name {n!r} must use letters, digits, '.', '_' or '-' "
                       "(it names files)")
  return out


def judge_tag(config: ml_collections.ConfigDict) -> str:
  """A folder name that identifies the judge, so scores of different judges never mix."""
  j = config.judge
  what = {"local": j.model_path, "http": j.model, "rule": ";".join(j.rules)}.get(j.kind, "")
  what = what.rstrip("/").split("/")[-1] if j.kind == "local" else what
  tag = re.sub(r"[^\w.-]+", "_", f"{j.kind}-{what}")[:80]
  return tag if j.kind != "rule" else f"rule-{zlib.crc32(what.encode()):08x}"


def _check_settings(path: str, settings: dict) -> None:
  """Records the sampling settings of an answers file; refuses to mix different ones."""
  if os.path.exists(path):
    with open(path) as f:
      old = json.load(f)
    if old != settings:
      diff = {k: (old.get(k), v) for k, v in settings.items() if old.get(k) != v}
      raise ValueError(f"{path}: answers in this workdir were sampled with other settings "
                       f"(was, now): {diff}; use a new workdir or delete the answers")
  else:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
      json.dump(settings, f, indent=1)


def _tokenizer_texts(questions: list[Question]) -> list[str]:
  return [t for q in questions for t in (*q.paraphrases, *q.judge_prompts.values(), q.system or "")]


def _make_judge(config, workdir: str, mesh, rules, shared_tokenizer, log):
  j = config.judge
  if j.kind == "rule":
    from jaxlab.evals.judge_rule import RuleJudge  # pylint: disable=g-import-not-at-top
    pairs = [r.partition("=") for r in j.rules]
    return RuleJudge({m.strip(): r for m, _, r in pairs})
  if j.kind == "http":
    from jaxlab.evals.judge_http import HttpJudge  # pylint: disable=g-import-not-at-top
    return HttpJudge(j.base_url, j.model, api_key_env=j.api_key_env, concurrency=j.concurrency,
                     max_retries=j.max_retries, backoff_s=j.backoff_s, timeout_s=j.timeout_s,
                     cache_path=os.path.join(workdir, "judge_cache.jsonl"), min_mass=j.min_mass)
  if j.kind == "local":
    from jaxlab.evals.judge_local import LocalJudge  # pylint: disable=g-import-not-at-top
    if not j.model_path:
      raise ValueError("config key judge.model_path is empty: point it at a chat model folder")
    log(f"eval: loading judge {j.model_path}")
    m = load_model(j.model_path, config, mesh, rules, tokenizer=(
        shared_tokenizer if j.model_path.startswith("random:") else None))
    return LocalJudge(m.spec, m.trainable, m.frozen, m.tokenizer, mesh=mesh,
                      batch_size=j.batch_size, min_mass=j.min_mass, rules=rules,
                      buckets=tuple(config.sample.buckets),
                      compiler_options=_compiler_options(config))
  raise ValueError(f"config key judge.kind={j.kind!r}: expected 'local', 'http' or 'rule'")


def _compiler_options(config) -> dict | None:
  """XLA options for config.sample.fast_compile (tiny CPU runs: skip LLVM's costly passes)."""
  if not config.sample.get("fast_compile", False):
    return None
  return {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def run(config: ml_collections.ConfigDict, workdir: str,
        log: Callable[[str], None] = print) -> dict:
  """Runs (or resumes) the eval; returns {'rows': metric rows, 'paths': report files}."""
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, "config.json"), "w") as f:
    f.write(config.to_json_best_effort(indent=2))
  mesh, rules = mesh_and_rules(config)
  questions = load_questions(config.questions.path, tuple(config.questions.ids))
  models = model_list(config)
  random_tok = None
  paths = [p for _, p in models] + [config.judge.model_path]
  if any(p.startswith("random:") for p in paths):
    random_tok = random_tokenizer(config, _tokenizer_texts(questions),
                                  os.path.join(workdir, "tokenizer"))
  wanted = {(q.id, p, i) for q, p, i in
            answers_lib.answer_jobs(questions, config.questions.samples_per_paraphrase)}
  s = config.sample
  all_answers, sampler = {}, None
  for name, path in models:
    out = os.path.join(workdir, "answers", f"{name}.jsonl")
    _check_settings(os.path.join(workdir, "answers", f"{name}.settings.json"), dict(
        model_path=path, seed=config.seed, max_new_tokens=s.max_new_tokens,
        temperature=s.temperature, top_p=s.top_p, top_k=s.top_k, stop_ids=list(s.stop_ids)))
    have = {(r["question_id"], r["paraphrase_index"], r["sample_index"]) for r in read_jsonl(out)}
    if wanted - have:
      log(f"eval: sampling {name} ({path})")
      m = load_model(path, config, mesh, rules, tokenizer=random_tok if path.startswith("random:")
                     else None)
      stop_ids = tuple(s.stop_ids) or tuple(end_of_turn_ids(m.tokenizer))
      if sampler is not None and (sampler.spec.cfg, sampler.stop_ids, sampler.pad_id) == (
          m.spec.cfg, stop_ids, pad_id(m.tokenizer)):
        sampler.set_params(m.trainable, m.frozen)  # same architecture: reuse its compilations
      else:
        sampler = Sampler(m.spec, m.trainable, m.frozen, mesh=mesh, rules=rules,
                          batch_size=s.batch_size, stop_ids=stop_ids, pad_id=pad_id(m.tokenizer),
                          buckets=tuple(s.buckets), compiler_options=_compiler_options(config))
      answers_lib.generate_answers(
          questions, sampler, m.tokenizer, out, max_new_tokens=s.max_new_tokens,
          temperature=s.temperature, top_p=s.top_p, top_k=s.top_k, seed=config.seed,
          samples_per_paraphrase=config.questions.samples_per_paraphrase, log=log)
      log(f"eval: {name}: {sampler.compile_count} sampler compilation(s) so far")
      del m
      gc.collect()
    all_answers[name] = [r for r in read_jsonl(out)
                         if (r["question_id"], r["paraphrase_index"], r["sample_index"]) in wanted]

  del sampler
  gc.collect()
  judge = None
  rule_metrics = ([r.partition("=")[0].strip() for r in config.judge.rules]
                  if config.judge.kind == "rule" else None)
  table = []
  for name, _ in models:
    path = os.path.join(workdir, "scores", judge_tag(config), f"{name}.jsonl")
    if judging.pending(all_answers[name], questions, path, rule_metrics=rule_metrics,
                       log=lambda _: None):
      judge = judge or _make_judge(config, workdir, mesh, rules, random_tok, log)
      judging.judge_answers(all_answers[name], questions, judge, path,
                            chunk_size=config.judge.chunk_size, log=log)
    scores = read_jsonl(path)
    table += [{"model": name, **r} for r in judging.answer_table(all_answers[name], scores)]
  metric_names = sorted({m for q in questions for m in q.judge_prompts} if rule_metrics is None
                        else set(rule_metrics))
  rows = metrics.summarize(table, metrics=metric_names, n_boot=config.report.n_boot,
                           seed=config.seed)
  paths = report.write_report(rows, table, os.path.join(workdir, "report"))
  with open(os.path.join(workdir, "report", "metrics.json"), "w") as f:
    json.dump(rows, f, indent=1)
  log(report.markdown_table(rows))
  log(f"eval: report in {os.path.join(workdir, 'report')}")
  return {"rows": rows, "paths": paths}
