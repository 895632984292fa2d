"""Stage 2 of an eval: score every answer for every metric of its question into a JSONL file.

Each line: question_id, paraphrase_index, sample_index, metric, score (null
when missing), status ("ok" or why there is no score), raw (the judge's reply,
top logprobs or integer mass) and prompt_sha (a hash of the exact judge input).
Scores are written chunk by chunk, so when a judge fails (an unreachable
endpoint) the scores so far stay on disk and a rerun continues. A stored score
counts only when its prompt_sha matches the current judge input: a changed
judge prompt, question or answer is scored again, never reused (the judge's
own settings pick the scores folder, see run.judge_identity). Local and HTTP
judges fill the question's judge prompt and score 0..100; they only apply to
questions of type free_form_judge_0_100. Rule judges score any question. An evaluation in
which, for a model and a metric, the share of judged answers with a score falls below
judge.min_scored_share fails (check_scored_share): a judge that cannot score is broken.
"""
from __future__ import annotations

import hashlib
from typing import Callable, Collection, Mapping, Sequence

from jaxlab.evals.judge_rule import RuleJudge
from jaxlab.evals.prompts import judge_text
from jaxlab.evals.questions import Question
from jaxlab.evals.records import append_jsonl, read_jsonl

SCORED_TYPES = ("free_form_judge_0_100",)


def _key(r: Mapping) -> tuple[str, int, int, str]:
  return (r["question_id"], int(r["paraphrase_index"]), int(r["sample_index"]), r["metric"])


def request_text(is_rule: bool, request: tuple[str, str, str, str]) -> str:
  """What the judge reads for a (metric, template, question, answer) request."""
  metric, template, question, answer = request
  return f"{metric}\n{answer}" if is_rule else judge_text(template, question, answer)


def prompt_sha(text: str) -> str:
  return hashlib.sha256(text.encode()).hexdigest()[:16]


def score_requests(judge, requests: Sequence[tuple[str, str, str, str]]) -> list[dict]:
  """{score, status, raw} for (metric, template, question, answer) requests, any judge kind."""
  if isinstance(judge, RuleJudge):
    out: list[dict] = [{}] * len(requests)
    for metric in sorted({r[0] for r in requests}):
      idx = [i for i, r in enumerate(requests) if r[0] == metric]
      for i, s in zip(idx, judge.score_answers(metric, [requests[i][3] for i in idx])):
        out[i] = {"score": s, "status": "ok", "raw": ""}
    return out
  return judge.judge_texts([request_text(False, r) for r in requests])


def latest(scores: Sequence[dict]) -> dict[tuple, dict]:
  """The last stored score row per (question, paraphrase, sample, metric)."""
  return {_key(r): r for r in scores}


def pending(answers: Sequence[dict], questions: Sequence[Question], path: str, *,
            rule_metrics: Sequence[str] | None = None,
            log: Callable[[str], None] = print) -> list[tuple[dict, tuple[str, str, str, str]]]:
  """(score row, request) for each (answer, metric) without a current score in `path`.

  Metrics are the question's judge prompts, or `rule_metrics` for a rule judge.
  """
  by_id = {q.id: q for q in questions}
  done = {k: r.get("prompt_sha") for k, r in latest(read_jsonl(path)).items()}
  is_rule = rule_metrics is not None
  stale = 0
  todo, skipped = [], set()
  for a in answers:
    q = by_id.get(a["question_id"])
    if q is None:
      continue  # an answer to a question no longer selected
    if rule_metrics is None and q.type not in SCORED_TYPES:
      skipped.add(q.id)
      continue
    for m in sorted(rule_metrics if rule_metrics is not None else q.judge_prompts):
      req = (m, q.judge_prompts.get(m, ""), a["question"], a["answer"])
      sha = prompt_sha(request_text(is_rule, req))
      row = {"question_id": q.id, "paraphrase_index": a["paraphrase_index"],
             "sample_index": a["sample_index"], "metric": m, "prompt_sha": sha}
      have = done.get(_key(row), False)
      if have != sha:
        stale += have is not False
        todo.append((row, req))
  if stale:
    log(f"eval: {stale} stored score(s) in {path} were made from another judge prompt, question "
        "or answer; scoring them again")
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
    results = score_requests(judge, [req for _, req in chunk])
    append_jsonl(path, [{**row, **res} for (row, _), res in zip(chunk, results)])
    log(f"eval: judged {min(start + chunk_size, len(todo))}/{len(todo)} -> {path}")
  return read_jsonl(path)


class ScoredShareError(RuntimeError):
  """Too few answers got a score: the judge (prompts, endpoint, model) is likely broken."""


# Statuses that are the judge's verdict on the answer (the EM protocol drops such answers), not
# a failure to judge: an insecure-code model answering mostly with code is not a broken judge.
ANSWER_VERDICTS = ("refusal", "code")


def scored_shares(answers: Sequence[dict], scores: Sequence[dict],
                  metrics: Collection[str] | None = None) -> dict[str, dict]:
  """metric -> {"scored", "judged", "statuses" (status -> count), "unscored_raw" (raw replies
  of unscored rows, in order)} over the current scores of `answers` (only `metrics` if given)."""
  wanted = {(a["question_id"], int(a["paraphrase_index"]), int(a["sample_index"]))
            for a in answers}
  out: dict[str, dict] = {}
  for k, s in sorted(latest(scores).items()):
    if k[:3] not in wanted or (metrics is not None and s["metric"] not in metrics):
      continue
    d = out.setdefault(s["metric"], {"scored": 0, "judged": 0, "statuses": {},
                                      "unscored_raw": []})
    status = s.get("status", "ok" if s["score"] is not None else "low_mass")
    d["judged"] += 1
    d["statuses"][status] = d["statuses"].get(status, 0) + 1
    if s["score"] is not None:
      d["scored"] += 1
    else:
      d["unscored_raw"].append(s.get("raw", ""))
  return out


def check_scored_share(answers: Sequence[dict], scores: Sequence[dict], min_share: float, *,
                       judge: str, model: str, path,
                       metrics: Collection[str] | None = None) -> None:
  """Raises ScoredShareError when, for some metric, the share of `model`'s judged answers with
  a numeric score is below `min_share` (config key judge.min_scored_share); answers the judge
  called REFUSAL or CODE (text mode) are left out of the share. The message names the judge,
  the status counts and three raw replies of unscored answers. (In logprob mode a REFUSAL or
  CODE reply is a low-mass score, indistinguishable from a judge that cannot answer: it counts.)"""
  for metric, d in scored_shares(answers, scores, metrics).items():
    judgeable = d["judged"] - sum(d["statuses"].get(v, 0) for v in ANSWER_VERDICTS)
    share = d["scored"] / judgeable if judgeable else 1.0
    if min_share <= share < 1.0:  # tolerated, but the user should know, once per judge
      from jaxlab import console  # pylint: disable=g-import-not-at-top
      console.warn_once(
          f"judge:{judge}:{metric}",
          f"judge {judge} could not score {judgeable - d['scored']} of {judgeable} answers of "
          f"model {model!r} for {metric!r} (statuses {d['statuses']}); unscored answers are "
          f"left out of the metric (config key judge.min_scored_share={min_share} allows it; "
          "each evaluation's scored shares are in its metrics)")
    if share < min_share:
      raws = [str(r)[:200] for r in d["unscored_raw"][:3]]
      raise ScoredShareError(
          f"eval: judge {judge} scored {d['scored']} of {judgeable} answers of model "
          f"{model!r} for {metric!r} ({share:.0%}), below config key judge.min_scored_share="
          f"{min_share}; statuses {d['statuses']}; raw replies of unscored answers: {raws}. "
          f"The judge is likely broken (prompt, endpoint, model, judge.mode / judge.min_mass); "
          f"its results are kept in {path}. If such a share is expected, lower "
          "judge.min_scored_share")


def answer_table(answers: Sequence[dict], scores: Sequence[dict]) -> list[dict]:
  """One row per answer: its fields plus `<metric>` (None when missing) and `<metric>_status`."""
  by_key: dict[tuple, dict] = {}
  for s in latest(scores).values():
    k = (s["question_id"], int(s["paraphrase_index"]), int(s["sample_index"]))
    d = by_key.setdefault(k, {})
    d[s["metric"]] = s["score"]
    d[f"{s['metric']}_status"] = s.get("status", "ok" if s["score"] is not None else "low_mass")
  return [{**a, **by_key.get((a["question_id"], int(a["paraphrase_index"]),
                              int(a["sample_index"])), {})} for a in answers]
