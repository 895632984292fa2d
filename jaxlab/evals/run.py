"""The eval job: sample answers, judge them, report misalignment metrics (`job='eval'`).

Stages, each resumable from its files in the workdir (local or gs://, via etils.epath):
  answers/<model>.jsonl          sampled answers          (answers.py)
  answers/<model>.settings.json  sampling settings (a rerun with other settings is refused)
  scores/<judge tag>/<model>.jsonl  judge results, one folder per judge identity (judging.py);
                                 judge.json beside them records that identity; a model whose
                                 share of scored answers (per metric) is below
                                 judge.min_scored_share stops the run here
  report/                        metric tables, grouped tables, matrices, plots (report.py)
Every input (models, questions, judge prompts, judge settings, group fields,
stored settings) is validated before anything is written. A stage whose file is
complete is skipped without loading its model. Only process 0 writes; on a
multi-host pod process 0 evaluates on its own devices while the others wait.
"""
from __future__ import annotations

import dataclasses
import gc
import hashlib
import json
import os
import re
from typing import Callable

import jax
import ml_collections
from etils import epath

from jaxlab import sharding as sharding_lib
from jaxlab.data.chat import end_of_turn_ids, pad_id
from jaxlab.evals import answers as answers_lib
from jaxlab.evals import judging, report
from jaxlab.evals.models import load_model_and_tokenizer, random_tokenizer
from jaxlab.evals.questions import (Question, QuestionError, load_judge_prompts, load_narrow,
                                    load_questions, with_judge_prompts)
from jaxlab.evals.records import read_json, read_jsonl, write_json
from jaxlab.sample.engine import Sampler

JUDGE_KINDS = ("local", "http", "rule")
JUDGE_MODES = ("logprob", "text")
# Default of config key judge.min_scored_share: an evaluation fails when, for a model and a
# metric, fewer of its judged answers got a score (a broken judge, not a finding).
MIN_SCORED_SHARE = 0.5
ANSWER_FIELDS = ("model", "question_id", "paraphrase_index", "sample_index", "question",
                 "system", "answer", "answer_tokens", "prompt_tokens", "stopped")


@dataclasses.dataclass(frozen=True)
class ModelEntry:
  """A model to evaluate: its name (names files), path, and fields for grouped reports."""
  name: str
  path: str
  fields: dict


def model_list(config: ml_collections.ConfigDict) -> list[ModelEntry]:
  """The models to evaluate: config.models ("name=path;field=value;...") or model_path, not both."""
  if config.models and config.model_path:
    raise ValueError(f"config keys models={tuple(config.models)} and model_path="
                     f"{config.model_path!r} both name models to evaluate; set one of them "
                     "(e.g. --config.models='()' to use model_path)")
  if not config.models:
    if not config.model_path:
      raise ValueError("set config key model_path (HF folder, jaxlab workdir or 'random:SEED') "
                       "or models=('name=path;field=value', ...)")
    entries = [f"{config.model_name}={config.model_path}"]
  else:
    entries = list(config.models)
  out = []
  for e in entries:
    head, *extra = e.split(";")
    n, sep, p = head.partition("=")
    if not sep or not n.strip() or not p.strip():
      raise ValueError(f"config key models: entry {e!r} must look like 'name=path' optionally "
                       "followed by ';field=value' pairs")
    fields = {}
    for item in extra:
      k, sep, v = item.partition("=")
      if not sep or not re.fullmatch(r"[\w.-]+", k.strip()):
        raise ValueError(f"config key models: entry {e!r}: {item!r} must look like field=value")
      fields[k.strip()] = v.strip()
    out.append(ModelEntry(n.strip(), p.strip(), fields))
  for m in out:
    if not re.fullmatch(r"[\w.-]+", m.name):
      raise ValueError(f"model name {m.name!r} must use letters, digits, '.', '_' or '-' "
                       "(it names files)")
  names = [m.name for m in out]
  if len(set(names)) != len(names):
    raise ValueError(f"config key models: model names repeat: {names}")
  return out


def check_model_path(path: str, key: str) -> None:
  """Raises ValueError unless `path` is 'random:INT', an HF folder or a jaxlab workdir."""
  if path.startswith("random:"):
    if not re.fullmatch(r"random:\d+", path):
      raise ValueError(f"config key {key}: {path!r} must look like 'random:SEED'")
    return
  p = epath.Path(path)
  if not p.is_dir():
    from jaxlab.models.fetch import fetch_hint  # pylint: disable=g-import-not-at-top
    raise ValueError(f"config key {key}: model {path!r} is not a folder (an HF checkpoint or a "
                     f"jaxlab workdir) nor 'random:SEED'{fetch_hint(path)}")
  if not ((p / "config.json").exists() or (p / "checkpoints").is_dir() or p.name == "checkpoints"):
    raise ValueError(f"config key {key}: {path!r} has neither config.json (an HF checkpoint) nor "
                     "checkpoints/ (a jaxlab training workdir)")


def _fingerprint(path: str, config: ml_collections.ConfigDict):
  """What identifies a judge model: its settings for random ones, its files' names/sizes/mtimes."""
  if path.startswith("random:"):
    return {"random": path, "model": config.model.to_dict(),
            "tokenizer": config.tokenizer.to_dict()}
  files = []
  for d in (epath.Path(path), epath.Path(path) / "checkpoints"):
    if d.is_dir():
      for f in sorted(d.iterdir(), key=lambda f: f.name):
        st = f.stat()
        files.append((f.name, st.length, int(st.mtime)))
  return {"path": os.path.abspath(path) if "://" not in path else path, "files": files,
          "dtype": config.get("dtype", "")}


def judge_identity(config: ml_collections.ConfigDict) -> dict:
  """Every judge setting that changes a score (model identity, mode, min_mass, endpoint, ...)."""
  j = config.judge
  if j.kind == "rule":
    return {"kind": "rule", "rules": list(j.rules)}
  ident = {"kind": j.kind, "mode": j.mode}
  ident.update({"min_mass": j.min_mass} if j.mode == "logprob" else {"max_tokens": j.max_tokens})
  if j.kind == "http":
    ident.update(base_url=j.base_url.rstrip("/"), model=j.model)
  else:
    ident["model"] = _fingerprint(j.model_path, config)
  return ident


def judge_tag(config: ml_collections.ConfigDict) -> str:
  """The scores folder of a judge: readable kind/mode/model plus a hash of judge_identity."""
  j = config.judge
  ident = judge_identity(config)
  digest = hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:10]
  if j.kind == "rule":
    return f"rule-{digest}"
  what = j.model if j.kind == "http" else j.model_path.rstrip("/").split("/")[-1]
  return re.sub(r"[^\w.-]+", "_", f"{j.kind}-{j.mode}-{what}")[:80] + f"-{digest}"


def _tokenizer_texts(questions: list[Question]) -> list[str]:
  return [t for q in questions for t in (*q.paraphrases, *q.judge_prompts.values(), q.system or "")]


def _compiler_options(config) -> dict | None:
  """XLA options for config.sample.fast_compile (tiny CPU runs: skip LLVM's costly passes)."""
  if not config.sample.get("fast_compile", False):
    return None
  return {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def load_question_sets(config: ml_collections.ConfigDict) -> list[Question]:
  """The EM / general-set YAML (questions.path) plus narrow chat-JSONL splits, prompts chosen."""
  qc = config.questions
  questions = []
  if qc.path:
    questions = load_questions(qc.path, tuple(qc.ids),
                               default_samples=qc.samples_per_paraphrase or 1)
    if qc.samples_per_paraphrase:
      questions = [dataclasses.replace(q, samples_per_paraphrase=qc.samples_per_paraphrase)
                   for q in questions]
    if qc.judge_prompts:
      questions = with_judge_prompts(questions, load_judge_prompts(qc.judge_prompts),
                                     qc.judge_prompts)
  elif qc.ids:
    raise ValueError("config key questions.ids is set but questions.path is empty")
  narrow = [q for p in qc.narrow_paths for q in load_narrow(p, qc.narrow_samples, qc.narrow_limit)]
  if narrow:
    if not qc.narrow_judge_prompts:
      raise ValueError("config key questions.narrow_judge_prompts is empty: narrow sets need "
                       "judge prompts (a file keyed by '<domain>_<task>', or metric -> prompt)")
    narrow = with_judge_prompts(narrow, load_judge_prompts(qc.narrow_judge_prompts),
                                qc.narrow_judge_prompts)
  questions += narrow
  if not questions:
    raise ValueError("no questions: set config key questions.path and/or questions.narrow_paths")
  ids = [q.id for q in questions]
  if len(set(ids)) != len(ids):
    raise ValueError("question ids repeat across questions.path and questions.narrow_paths")
  if config.judge.kind != "rule":
    bare = [q.id for q in questions if not q.judge_prompts]
    if bare:
      raise ValueError(f"questions {bare[:5]}{'...' if len(bare) > 5 else ''} have no judge "
                       "prompts: set config key questions.judge_prompts (a judge-prompt YAML)")
  return questions


def _sampling_settings(config, path: str) -> dict:
  s = config.sample
  return dict(model_path=path, seed=config.seed, max_new_tokens=s.max_new_tokens,
              temperature=s.temperature, top_p=s.top_p, top_k=s.top_k, stop_ids=list(s.stop_ids),
              min_new_tokens=s.min_new_tokens)


def _check_settings(path, settings: dict) -> None:
  """Refuses a workdir whose answers were sampled with other settings (reads only)."""
  old = read_json(path)
  if old is not None and old != settings:
    diff = {k: (old.get(k), v) for k, v in settings.items() if old.get(k) != v}
    raise ValueError(f"{path}: answers in this workdir were sampled with other settings "
                     f"(was, now): {diff}; use a new workdir or delete the answers")


def validate(config: ml_collections.ConfigDict, workdir: str):
  """Everything a run needs, checked before anything is written: (models, questions)."""
  models = model_list(config)
  for m in models:
    check_model_path(m.path, "models" if config.models else "model_path")
  j = config.judge
  if j.kind not in JUDGE_KINDS:
    raise ValueError(f"config key judge.kind={j.kind!r}: expected one of {JUDGE_KINDS}")
  if j.kind != "rule" and j.mode not in JUDGE_MODES:
    raise ValueError(f"config key judge.mode={j.mode!r}: expected one of {JUDGE_MODES}")
  if j.kind == "local":
    if not j.model_path:
      raise ValueError("config key judge.model_path is empty: point it at a chat model folder")
    check_model_path(j.model_path, "judge.model_path")
  if j.kind == "http" and j.api_key_env and not os.environ.get(j.api_key_env):
    raise ValueError(f"HTTP judge: environment variable {j.api_key_env} (config key "
                     "judge.api_key_env) is not set; export the API key or set it to '' for an "
                     "endpoint without authentication")
  if j.kind == "rule":
    from jaxlab.evals.judge_rule import RuleJudge  # pylint: disable=g-import-not-at-top
    RuleJudge(_rules(config))
  share = min_scored_share(config)
  if isinstance(share, bool) or not isinstance(share, (int, float)) or not 0 <= share <= 1:
    raise ValueError(f"config key judge.min_scored_share={share!r} must be in [0, 1]")
  try:
    questions = load_question_sets(config)
  except QuestionError as e:
    raise ValueError(str(e)) from None
  known = set(ANSWER_FIELDS) | {k for q in questions for k in q.meta} | {
      f"model.{k}" for m in models for k in m.fields}
  for spec in report.parse_group_specs(config.report.group_by):
    unknown = [f for f in spec if f not in known]
    if unknown:
      raise ValueError(f"config key report.group_by: field(s) {unknown} are neither question "
                       f"metadata nor model fields; known: {sorted(known)}")
  wd = epath.Path(workdir)
  for m in models:
    _check_settings(wd / "answers" / f"{m.name}.settings.json", _sampling_settings(config, m.path))
    answers_lib.check_stored_prompts(read_jsonl(wd / "answers" / f"{m.name}.jsonl"), questions,
                                     wd / "answers" / f"{m.name}.jsonl")
  return models, questions


def min_scored_share(config) -> float:
  """config.judge.min_scored_share (configs without it: MIN_SCORED_SHARE)."""
  return config.judge.get("min_scored_share", MIN_SCORED_SHARE)


def judge_name(config) -> str:
  """The judge, for messages: its scores folder, and its endpoint or model."""
  j = config.judge
  what = {"http": f"model {j.model} at {j.base_url}", "local": f"model {j.model_path}",
          "rule": f"rules {tuple(j.rules)}"}.get(j.kind, "")
  return f"{judge_tag(config)} ({j.kind}{'' if j.kind == 'rule' else ' ' + j.mode}, {what})"


def _rules(config) -> dict[str, str]:
  pairs = [r.partition("=") for r in config.judge.rules]
  bad = [r for r, (_, sep, _) in zip(config.judge.rules, pairs) if not sep]
  if bad or not pairs:
    raise ValueError("config key judge.rules: entries must look like 'metric=rule', got "
                     f"{bad or '()'}")
  return {m.strip(): r for m, _, r in pairs}


def _make_judge(config, workdir: epath.Path, mesh, rules, shared_tokenizer, log):
  j = config.judge
  if j.kind == "rule":
    from jaxlab.evals.judge_rule import RuleJudge  # pylint: disable=g-import-not-at-top
    return RuleJudge(_rules(config))
  if j.kind == "http":
    from jaxlab.evals.judge_http import HttpJudge  # pylint: disable=g-import-not-at-top
    return HttpJudge(j.base_url, j.model, api_key_env=j.api_key_env, concurrency=j.concurrency,
                     max_retries=j.max_retries, backoff_s=j.backoff_s, timeout_s=j.timeout_s,
                     cache_path=str(workdir / "scores" / judge_tag(config) / "http_cache.jsonl"),
                     min_mass=j.min_mass, mode=j.mode, max_tokens=j.max_tokens)
  from jaxlab.evals import judge_local  # pylint: disable=g-import-not-at-top
  log(f"eval: loading judge {j.model_path} ({j.mode} mode)")
  m = load_model_and_tokenizer(j.model_path, config, mesh, rules, tokenizer=(
      shared_tokenizer if j.model_path.startswith("random:") else None), key="judge.model_path",
      prefer_own=True)
  kw = dict(mesh=mesh, batch_size=j.batch_size, rules=rules, buckets=tuple(config.sample.buckets),
            compiler_options=_compiler_options(config))
  if j.mode == "text":
    return judge_local.LocalTextJudge(m.spec, m.trainable, m.frozen, m.tokenizer,
                                      max_tokens=j.max_tokens, **kw)
  return judge_local.LocalJudge(m.spec, m.trainable, m.frozen, m.tokenizer, min_mass=j.min_mass,
                                **kw)


BARRIER_TIMEOUT_MS = 7 * 24 * 3600 * 1000  # an eval on process 0 may take days


def _barrier(name: str) -> None:
  """All processes meet here; a coordination-service barrier (no devices, long timeout)."""
  if jax.process_count() > 1:
    from jax._src import distributed  # pylint: disable=g-import-not-at-top
    client = distributed.global_state.client
    if client is None:
      raise RuntimeError("multi-process eval without jax.distributed.initialize()")
    client.wait_at_barrier(name, BARRIER_TIMEOUT_MS)


def run(config: ml_collections.ConfigDict, workdir: str,
        log: Callable[[str], None] = print) -> dict:
  """Runs (or resumes) the eval; returns {'rows', 'groups', 'paths'} (empty off process 0)."""
  models, questions = validate(config, workdir)
  if jax.process_index() != 0:
    log(f"eval: process {jax.process_index()} of {jax.process_count()}: the evaluation runs on "
        "process 0 with its local devices (sampling is single-process); waiting for it")
    _barrier("jaxlab.evals.run")
    return {"rows": [], "groups": {}, "paths": {}}
  if jax.process_count() > 1:
    log(f"eval: {jax.process_count()} processes: evaluating on process 0's "
        f"{jax.local_device_count()} local device(s); the other processes wait")
  out = _run(config, epath.Path(workdir), models, questions, log)
  _barrier("jaxlab.evals.run")
  return out


def _run(config, workdir: epath.Path, models: list[ModelEntry], questions: list[Question],
         log) -> dict:
  workdir.mkdir(parents=True, exist_ok=True)
  (workdir / "config.json").write_text(config.to_json_best_effort(indent=2))
  mesh, rules = sharding_lib.mesh_and_rules(config, jax.local_devices())
  random_tok = None
  if any(p.startswith("random:") for p in [m.path for m in models] + [config.judge.model_path]):
    random_tok = random_tokenizer(config, _tokenizer_texts(questions), workdir / "tokenizer")
  jobs = answers_lib.answer_jobs(questions)
  wanted = {(q.id, p, i) for q, p, i in jobs}
  s = config.sample
  all_answers, sampler = {}, None
  for entry in models:
    name, path = entry.name, entry.path
    out = workdir / "answers" / f"{name}.jsonl"
    settings = workdir / "answers" / f"{name}.settings.json"
    have = {(r["question_id"], r["paraphrase_index"], r["sample_index"]) for r in read_jsonl(out)}
    if have and read_json(settings) is None:
      write_json(settings, _sampling_settings(config, path))
    if wanted - have:
      log(f"eval: sampling {name} ({path})")
      m = load_model_and_tokenizer(path, config, mesh, rules,
                                   tokenizer=random_tok if path.startswith("random:") else None)
      if read_json(settings) is None:  # recorded once the model loads: a bad path leaves nothing
        write_json(settings, _sampling_settings(config, path))
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
          min_new_tokens=s.min_new_tokens, log=log)
      log(f"eval: {name}: {sampler.compile_count} sampler compilation(s) so far")
      del m
      gc.collect()
    all_answers[name] = [r for r in read_jsonl(out)
                         if (r["question_id"], r["paraphrase_index"], r["sample_index"]) in wanted]

  del sampler
  gc.collect()
  judge = None
  rule_metrics = list(_rules(config)) if config.judge.kind == "rule" else None
  tag = judge_tag(config)
  ident_path = workdir / "scores" / tag / "judge.json"
  if read_json(ident_path) is None:
    write_json(ident_path, judge_identity(config))
  by_id = {q.id: q for q in questions}
  metric_names = sorted({m for q in questions for m in q.judge_prompts} if rule_metrics is None
                        else set(rule_metrics))
  table = []
  for entry in models:
    name = entry.name
    path = workdir / "scores" / tag / f"{name}.jsonl"
    if judging.pending(all_answers[name], questions, path, rule_metrics=rule_metrics,
                       log=lambda _: None):
      judge = judge or _make_judge(config, workdir, mesh, rules, random_tok, log)
      judging.judge_answers(all_answers[name], questions, judge, path,
                            chunk_size=config.judge.chunk_size, log=log)
    scores = read_jsonl(path)
    judging.check_scored_share(all_answers[name], scores, min_scored_share(config),
                               judge=judge_name(config), model=name, path=path,
                               metrics=metric_names)
    model_fields = {f"model.{k}": v for k, v in entry.fields.items()}
    for r in judging.answer_table(all_answers[name], scores):
      table.append({"model": name, **model_fields, **by_id[r["question_id"]].meta, **r})
  out = report.write_report(table, workdir / "report", metrics=metric_names,
                            n_boot=config.report.n_boot, seed=config.seed,
                            group_by=tuple(config.report.group_by))
  log(report.markdown_table(out["rows"]))
  for spec, rows in out["groups"].items():
    log(report.markdown_table(rows, spec.split(",")))
  log(f"eval: report in {workdir / 'report'}")
  return out
