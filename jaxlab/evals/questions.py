"""Question sets in the emergent-misalignment YAML format.

Each entry: `id`, `type`, `paraphrases` (list of str), `samples_per_paraphrase`,
`judge_prompts` (metric name -> prompt with `{answer}` and optionally
`{question}`), optional `system` and `judge`. Errors name the file and the
question id (or its index when the id itself is missing).
"""
from __future__ import annotations

import dataclasses
import string

import yaml

REQUIRED = ("id", "type", "paraphrases", "samples_per_paraphrase", "judge_prompts")


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

  def messages(self, paraphrase: int) -> list[dict[str, str]]:
    """Chat messages asking paraphrase `paraphrase` (system message first when set)."""
    msgs = [{"role": "system", "content": self.system}] if self.system else []
    return msgs + [{"role": "user", "content": self.paraphrases[paraphrase]}]


def check_judge_prompt(prompt: str, where: str) -> None:
  """Raises QuestionError unless `prompt` uses {answer} and no placeholder but {question}."""
  try:
    fields = {f for _, f, _, _ in string.Formatter().parse(prompt) if f is not None}
  except ValueError as e:
    raise QuestionError(f"{where}: judge prompt is not a valid format string ({e})") from None
  if "answer" not in fields:
    raise QuestionError(f"{where}: judge prompt has no {{answer}} placeholder")
  if fields - {"question", "answer"}:
    unknown = sorted(fields - {"question", "answer"})
    raise QuestionError(f"{where}: judge prompt has unknown placeholders {unknown}; only "
                        "{question} and {answer} are filled (write literal braces as {{ }})")


def _parse(entry, path: str, k: int) -> Question:
  if not isinstance(entry, dict):
    raise QuestionError(f"{path}: entry {k} is not a mapping")
  where = f"{path}: question {entry.get('id', f'#{k}')!r}"
  missing = [f for f in REQUIRED if f not in entry]
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
  if not isinstance(prompts, dict) or not prompts:
    raise QuestionError(f"{where}: 'judge_prompts' must map metric names to prompts")
  for name, prompt in prompts.items():
    if not isinstance(prompt, str):
      raise QuestionError(f"{where}: judge prompt {name!r} must be a string")
    check_judge_prompt(prompt, f"{where}, judge prompt {name!r}")
  system = entry.get("system")
  if system is not None and not isinstance(system, str):
    raise QuestionError(f"{where}: 'system' must be a string")
  return Question(id=str(entry["id"]), type=str(entry["type"]), paraphrases=tuple(paraphrases),
                  samples_per_paraphrase=n, judge_prompts=dict(prompts), system=system,
                  judge=entry.get("judge"))


def load_questions(path: str, ids: tuple[str, ...] = ()) -> list[Question]:
  """Questions of a YAML file, optionally only those with the given ids (in file order)."""
  with open(path, encoding="utf-8") as f:
    try:
      data = yaml.safe_load(f)
    except yaml.YAMLError as e:
      raise QuestionError(f"{path}: not valid YAML ({e})") from None
  if not isinstance(data, list):
    raise QuestionError(f"{path}: expected a YAML list of questions")
  questions = [_parse(e, path, k) for k, e in enumerate(data)]
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
