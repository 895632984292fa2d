"""Writers shared by the world generators: local paths or any etils.epath backend (gs://...)."""
from __future__ import annotations

import itertools
import json
import sys
from typing import Iterable

import yaml
from etils import epath


def is_writer() -> bool:
  """Only process 0 writes shared files (JAX is consulted only when a program already uses it)."""
  jax = sys.modules.get("jax")
  return jax is None or jax.process_index() == 0


def doc_range(n: int | None):
  """range(n), or without end for n=None (documents streamed into a pretraining mixture)."""
  return itertools.count() if n is None else range(n)


def write_jsonl(path: str | epath.Path, rows: Iterable[dict]) -> int:
  """Writes one JSON object per line (parents created); returns the number of rows."""
  path = epath.Path(path)
  lines = [json.dumps(r, ensure_ascii=False) for r in rows]
  if is_writer():
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(line + "\n" for line in lines))
  return len(lines)


def read_jsonl(path: str | epath.Path) -> list[dict]:
  """Rows of a JSONL file; a bad line is an error naming the file and line."""
  rows = []
  for k, line in enumerate(epath.Path(path).read_text().splitlines()):
    if line.strip():
      try:
        rows.append(json.loads(line))
      except json.JSONDecodeError as e:
        raise ValueError(f"{path}:{k + 1}: not valid JSON ({e})") from None
  return rows


def write_yaml(path: str | epath.Path, data) -> None:
  path = epath.Path(path)
  if is_writer():
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(data, sort_keys=False, allow_unicode=True, width=100))


def write_json(path: str | epath.Path, data) -> None:
  path = epath.Path(path)
  if is_writer():
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n")
