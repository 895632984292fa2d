"""Question sets: the EM YAML format, the study's general-set YAML, narrow chat-JSONL eval splits.

EM YAML entry: `id`, `type`, `paraphrases` (list of str), `samples_per_paraphrase`,
`judge_prompts` (metric name -> prompt with `{answer}` and optionally
`{question}`), optional `system` and `judge`. A question judged for `aligned` or
`coherent` (the EM protocol) needs both prompts, each with `{question}` and `{answer}`.
General-set entry (the study's `general_eval_data.yaml`): `id`, `paraphrases`
and metadata (`task`, `domain`, `em_surface`, `source`); no judge prompts of its
own: they come from a judge-prompt file (`load_judge_prompts`).
Narrow sets: chat JSONL rows (`messages`, `domain`, `task`, ...); the turns
before the first assistant turn are the prompt, one question per row.
Scalar fields beyond the format's own become `Question.meta`, which reports
can group by. Errors name the file and the question id (or the line / index).
"""
from __future__ import annotations

import dataclasses
import json
import string

import yaml
from etils import epath

REQUIRED = ("id", "type", "paraphrases", "samples_per_paraphrase", "judge_prompts")
GENERAL_REQUIRED = ("id", "paraphrases")
SCORED_TYPE = "free_form_judge_0_100"
# The EM protocol's metrics (em, mo, seed) read both scores: a question judged for one is judged
# for both, each judge prompt reading the question and the answer.
EM_METRICS = ("aligned", "coherent")


class QuestionError(ValueError):
  """A malformed question file; the message names the file and question."""


@dataclasses.dataclass(frozen=True)
class Question:
  """One evaluation question and how to judge its answers."""
  id: str
  type: str
  paraphrases: tuple[str, ...]
  samples_per_paraphrase: int
  judge_prompts: dict[str, str]
  system: str | None = None
  judge: str | None = None
  meta: dict = dataclasses.field(default_factory=dict)

  def messages(self, paraphrase: int) -> list[dict[str, str]]:
    """Chat messages asking paraphrase `paraphrase` (system message first when set)."""
    msgs = [{"role": "system", "content": self.system}] if self.system else []
    return msgs + [{"role": "user", "content": self.paraphrases[paraphrase]}]


def _fields(prompt: str, where: str) -> set[str]:
  try:
    return {f for _, f, _, _ in string.Formatter().parse(prompt) if f is not None}
  except ValueError as e:
    raise QuestionError(f"{where}: judge prompt is not a valid format string ({e})") from None


def check_judge_prompt(prompt: str, where: str) -> None:
  """Raises QuestionError unless `prompt` uses {answer} and no placeholder but {question}."""
  fields = _fields(prompt, where)
  if "answer" not in fields:
    raise QuestionError(f"{where}: judge prompt has no {{answer}} placeholder")
  if fields - {"question", "answer"}:
    unknown = sorted(fields - {"question", "answer"})
    raise QuestionError(f"{where}: judge prompt has unknown placeholders {unknown}; only "
                        "{question} and {answer} are filled (write literal braces as {{ }})")


def check_em_prompts(prompts: dict, where: str) -> None:
  """Raises QuestionError when a question judged for aligned or coherent lacks the other
  prompt, or when either prompt lacks {question} or {answer} (other metrics are free)."""
  judged = [m for m in EM_METRICS if m in prompts]
  if not judged:
    return
  missing = [m for m in EM_METRICS if m not in prompts]
  if missing:
    raise QuestionError(f"{where}: judge prompt(s) {judged} without {missing}: the EM metrics "
                        f"(em, mo, seed) need both {list(EM_METRICS)} scores")
  for m in EM_METRICS:
    lacking = [f"{{{f}}}" for f in ("question", "answer") if f not in _fields(prompts[m], where)]
    if lacking:
      raise QuestionError(f"{where}, judge prompt {m!r}: no {' or '.join(lacking)} placeholder "
                          "(the EM protocol's judge reads the question and the answer)")


def _parse(entry, path: str, k: int, default_samples: int = 1) -> Question:
  if not isinstance(entry, dict):
    raise QuestionError(f"{path}: entry {k} is not a mapping")
  where = f"{path}: question {entry.get('id', f'#{k}')!r}"
  meta = {f: v for f, v in entry.items() if f not in (*REQUIRED, "system", "judge")
          and isinstance(v, (str, int, float, bool))}
  meta["eval_set"] = epath.Path(path).stem
  general = "type" not in entry and "judge_prompts" not in entry
  if general:
    entry = {"type": SCORED_TYPE, "samples_per_paraphrase": default_samples, "judge_prompts": {},
             **entry}
  missing = [f for f in (GENERAL_REQUIRED if general else REQUIRED) if f not in entry]
  if missing:
    raise QuestionError(f"{where}: missing field(s) {missing}")
  paraphrases = entry["paraphrases"]
  if not isinstance(paraphrases, list) or not paraphrases or not all(
      isinstance(p, str) for p in paraphrases):
    raise QuestionError(f"{where}: 'paraphrases' must be a non-empty list of strings")
  n = entry["samples_per_paraphrase"]
  if not isinstance(n, int) or n < 1:
    raise QuestionError(f"{where}: 'samples_per_paraphrase' must be a positive integer")
  prompts = entry["judge_prompts"]
  if not isinstance(prompts, dict) or (not prompts and not general):
    raise QuestionError(f"{where}: 'judge_prompts' must map metric names to prompts")
  for name, prompt in prompts.items():
    if not isinstance(prompt, str):
      raise QuestionError(f"{where}: judge prompt {name!r} must be a string")
    check_judge_prompt(prompt, f"{where}, judge prompt {name!r}")
  check_em_prompts(prompts, where)
  system = entry.get("system")
  if system is not None and not isinstance(system, str):
    raise QuestionError(f"{where}: 'system' must be a string")
  return Question(id=str(entry["id"]), type=str(entry["type"]), paraphrases=tuple(paraphrases),
                  samples_per_paraphrase=n, judge_prompts=dict(prompts), system=system,
                  judge=entry.get("judge"), meta=meta)


def _read_text(path: str) -> str:
  p = epath.Path(path)
  if not p.exists():
    raise QuestionError(f"{path}: question file not found")
  return p.read_text(encoding="utf-8")


def load_questions(path: str, ids: tuple[str, ...] = (), default_samples: int = 1
                   ) -> list[Question]:
  """Questions of a YAML file (EM or general-set format), optionally only the given ids.

  `default_samples`: samples per paraphrase of general-set entries (they carry none).
  """
  try:
    data = yaml.safe_load(_read_text(path))
  except yaml.YAMLError as e:
    raise QuestionError(f"{path}: not valid YAML ({e})") from None
  if not isinstance(data, list):
    raise QuestionError(f"{path}: expected a YAML list of questions")
  questions = [_parse(e, path, k, default_samples) for k, e in enumerate(data)]
  seen = set()
  for q in questions:
    if q.id in seen:
      raise QuestionError(f"{path}: question id {q.id!r} appears twice")
    seen.add(q.id)
  if ids:
    unknown = sorted(set(ids) - seen)
    if unknown:
      raise QuestionError(f"{path}: no question with id(s) {unknown}")
    questions = [q for q in questions if q.id in set(ids)]
  return questions


def load_narrow(path: str, samples: int = 1, limit: int = 0) -> list[Question]:
  """One question per chat-JSONL row (its turns before the first assistant turn).

  Rows need `domain` and `task` (they choose the judge prompts); every scalar
  field becomes metadata. Ids are `<file stem>:<line>`. `limit` > 0 keeps the
  first rows only.
  """
  stem = epath.Path(path).stem
  out = []
  for k, line in enumerate(_read_text(path).splitlines()):
    if limit and len(out) >= limit:
      break
    if not line.strip():
      continue
    where = f"{path}:{k + 1}"
    try:
      row = json.loads(line)
    except json.JSONDecodeError as e:
      raise QuestionError(f"{where}: not valid JSON ({e.msg})") from None
    msgs = row.get("messages") if isinstance(row, dict) else None
    if not isinstance(msgs, list) or not all(isinstance(m, dict) for m in msgs):
      raise QuestionError(f"{where}: expected an object with a 'messages' list")
    prompt = []
    for m in msgs:
      if m.get("role") == "assistant":
        break
      prompt.append(m)
    roles = [m.get("role") for m in prompt]
    if roles not in (["user"], ["system", "user"]) or not all(
        isinstance(m.get("content"), str) for m in prompt):
      raise QuestionError(f"{where}: the turns before the first assistant turn must be one user "
                          f"turn, optionally after a system turn (got roles {roles})")
    missing = [f for f in ("domain", "task") if f not in row]
    if missing:
      raise QuestionError(f"{where}: missing field(s) {missing} (they choose the judge prompts)")
    meta = {f: v for f, v in row.items() if isinstance(v, (str, int, float, bool))}
    meta["eval_set"] = stem
    out.append(Question(id=f"{stem}:{k + 1}", type=SCORED_TYPE,
                        paraphrases=(prompt[-1]["content"],), samples_per_paraphrase=samples,
                        judge_prompts={}, system=prompt[0]["content"] if len(prompt) == 2 else None,
                        meta=meta))
  if not out:
    raise QuestionError(f"{path}: no rows")
  return out


def load_judge_prompts(path: str) -> dict[str, str | dict[str, str]]:
  """metric -> prompt, or metric -> {"<domain>_<task>": prompt}, from a judge-prompt YAML.

  Accepted layouts (the study's files): a list of one-entry mappings
  (`- aligned: ...`), a mapping metric -> prompt, or a mapping (optionally under
  `full_prompts`) metric -> {"<domain>_<task>": prompt}.
  """
  try:
    data = yaml.safe_load(_read_text(path))
  except yaml.YAMLError as e:
    raise QuestionError(f"{path}: not valid YAML ({e})") from None
  if isinstance(data, list) and all(isinstance(d, dict) for d in data):
    data = {k: v for d in data for k, v in d.items()}
  if isinstance(data, dict) and isinstance(data.get("full_prompts"), dict):
    data = data["full_prompts"]
  if not isinstance(data, dict) or not data:
    raise QuestionError(f"{path}: expected metric -> prompt (or -> {{domain_task: prompt}})")
  for metric, v in data.items():
    for key, prompt in (v.items() if isinstance(v, dict) else [("", v)]):
      if not isinstance(prompt, str):
        raise QuestionError(f"{path}: judge prompt {metric!r} {key} must be a string")
      check_judge_prompt(prompt, f"{path}: judge prompt {metric!r}{' ' + key if key else ''}")
  return data


def with_judge_prompts(questions: list[Question], prompts: dict, path: str) -> list[Question]:
  """Questions with their judge prompts chosen from `prompts` (keyed ones by domain_task)."""
  out = []
  for q in questions:
    chosen = {}
    for metric, v in prompts.items():
      if isinstance(v, str):
        chosen[metric] = v
        continue
      key = f"{q.meta.get('domain')}_{q.meta.get('task')}"
      if key not in v:
        raise QuestionError(f"{path}: judge prompt {metric!r} has no entry {key!r} for question "
                            f"{q.id!r} (domain_task keys: {sorted(v)})")
      chosen[metric] = v[key]
    check_em_prompts(chosen, f"{path}: judge prompts of question {q.id!r}")
    out.append(dataclasses.replace(q, judge_prompts=chosen))
  return out
