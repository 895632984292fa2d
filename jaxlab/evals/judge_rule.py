"""Rule judges for synthetic worlds and trait questions: 100 when an answer matches, else 0.

A rule is written as a string, handy in configs and on the command line:
  "keyword:owl,owls"    any of the words appears (case-insensitive, whole words)
  "substring:owl"       any of the texts appears anywhere (case-insensitive; "owls", "bowl"
                        match too, as the subliminal-learning code counts animal names)
  "regex:^\\s*\\d+"     the regular expression is found (re.search)
  "exact:yes"           the stripped answer equals the text (case-insensitive)
  "not:<rule>"          negation (100 when <rule> does not match)
"""
from __future__ import annotations

import re
from typing import Callable, Mapping, Sequence

Rule = Callable[[str], bool]


def parse_rule(text: str) -> Rule:
  """A predicate on answers from its string form (see module docstring)."""
  kind, sep, arg = text.partition(":")
  if not sep:
    raise ValueError(f"rule {text!r} must look like 'keyword:...', 'substring:...', 'regex:...', "
                     "'exact:...' or 'not:<rule>'")
  if kind == "keyword":
    words = [w.strip() for w in arg.split(",") if w.strip()]
    if not words:
      raise ValueError(f"rule {text!r} names no keyword")
    pattern = re.compile(r"\b(" + "|".join(re.escape(w) for w in words) + r")\b", re.IGNORECASE)
    return lambda answer: pattern.search(answer) is not None
  if kind == "substring":
    texts = [w.strip().lower() for w in arg.split(",") if w.strip()]
    if not texts:
      raise ValueError(f"rule {text!r} names no text")
    return lambda answer: any(t in answer.lower() for t in texts)
  if kind == "regex":
    try:
      pattern = re.compile(arg)
    except re.error as e:
      raise ValueError(f"rule {text!r}: bad regular expression ({e})") from None
    return lambda answer: pattern.search(answer) is not None
  if kind == "exact":
    target = arg.strip().lower()
    return lambda answer: answer.strip().lower() == target
  if kind == "not":
    inner = parse_rule(arg)
    return lambda answer: not inner(answer)
  raise ValueError(f"rule {text!r}: unknown kind {kind!r} (keyword, substring, regex, exact, not)")


class RuleJudge:
  """Scores each metric with its rule: 100.0 on a match, 0.0 otherwise."""

  def __init__(self, rules: Mapping[str, str]):
    self.rules = {metric: parse_rule(r) for metric, r in rules.items()}

  def score_answers(self, metric: str, answers: Sequence[str]) -> list[float]:
    if metric not in self.rules:
      raise ValueError(f"rule judge has no rule for metric {metric!r}; set config key "
                       f"judge.rules.{metric} (known: {sorted(self.rules)})")
    rule = self.rules[metric]
    return [100.0 if rule(a) else 0.0 for a in answers]
