"""Stage 2 of an eval: score every answer for every metric of its question into a JSONL file.

Each line: question_id, paraphrase_index, sample_index, metric, score (null
when missing). Scores are written chunk by chunk, so when a judge fails (an
unreachable endpoint) the scores so far stay on disk and a rerun continues.
Local and HTTP judges fill the question's judge prompt and score 0..100; they
only apply to questions of type free_form_judge_0_100. Rule judges score any
question.
"""
from __future__ import annotations

from typing import Callable, Mapping, Sequence

from jaxlab.evals.judge_rule import RuleJudge
from jaxlab.evals.prompts import judge_text
from jaxlab.evals.questions import Question
from jaxlab.evals.records import append_jsonl, read_jsonl

SCORED_TYPES = ("free_form_judge_0_100",)


def _key(r: Mapping) -> tuple[str, int, int, str]:
  return (r["question_id"], int(r["paraphrase_index"]), int(r["sample_index"]), r["metric"])


def score_requests(judge, requests: Sequence[tuple[str, str, str, str]]) -> list[float | None]:
  """Scores (metric, template, question, answer) requests with any judge kind."""
  if isinstance(judge, RuleJudge):
    out: list[float | None] = [None] * len(requests)
    for metric in sorted({r[0] for r in requests}):
      idx = [i for i, r in enumerate(requests) if r[0] == metric]
      for i, s in zip(idx, judge.score_answers(metric, [requests[i][3] for i in idx])):
        out[i] = s
    return out
  return judge.score_texts([judge_text(t, q, a) for _, t, q, a in requests])


def pending(answers: Sequence[dict], questions: Sequence[Question], path: str, *,
            rule_metrics: Sequence[str] | None = None,
            log: Callable[[str], None] = print) -> list[tuple[dict, tuple[str, str, str, str]]]:
  """(score row, request) for each (answer, metric) not yet in `path`.

  Metrics are the question's judge prompts, or `rule_metrics` for a rule judge.
  """
  by_id = {q.id: q for q in questions}
  done = {_key(r) for r in read_jsonl(path)}
  todo, skipped = [], set()
  for a in answers:
    q = by_id.get(a["question_id"])
    if q is None:
      continue  # an answer to a question no longer selected
    if rule_metrics is None and q.type not in SCORED_TYPES:
      skipped.add(q.id)
      continue
    for m in sorted(rule_metrics if rule_metrics is not None else q.judge_prompts):
      row = {"question_id": q.id, "paraphrase_index": a["paraphrase_index"],
             "sample_index": a["sample_index"], "metric": m}
      if _key(row) not in done:
        todo.append((row, (m, q.judge_prompts.get(m, ""), a["question"], a["answer"])))
  if skipped:
    log(f"eval: not judged (type is not one of {SCORED_TYPES}; use a rule judge): "
        f"{sorted(skipped)}")
  return todo


def judge_answers(answers: Sequence[dict], questions: Sequence[Question], judge, path: str, *,
                  chunk_size: int = 256, log: Callable[[str], None] = print) -> list[dict]:
  """Scores the (answer, metric) pairs missing from `path`, appending them; returns all rows."""
  rule_metrics = sorted(judge.rules) if isinstance(judge, RuleJudge) else None
  todo = pending(answers, questions, path, rule_metrics=rule_metrics, log=log)
  for start in range(0, len(todo), chunk_size):
    chunk = todo[start:start + chunk_size]
    scores = score_requests(judge, [req for _, req in chunk])
    append_jsonl(path, [{**row, "score": s} for (row, _), s in zip(chunk, scores)])
    log(f"eval: judged {min(start + chunk_size, len(todo))}/{len(todo)} -> {path}")
  return read_jsonl(path)


def answer_table(answers: Sequence[dict], scores: Sequence[dict]) -> list[dict]:
  """One row per answer: its fields plus one column per metric (None when missing)."""
  by_key: dict[tuple, dict] = {}
  for s in scores:
    k = (s["question_id"], int(s["paraphrase_index"]), int(s["sample_index"]))
    by_key.setdefault(k, {})[s["metric"]] = s["score"]
  return [{**a, **by_key.get((a["question_id"], int(a["paraphrase_index"]),
                              int(a["sample_index"])), {})} for a in answers]
