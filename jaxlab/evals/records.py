"""Append-only JSONL files that let every eval stage resume where a killed run stopped.

Paths go through etils.epath, so a workdir may be local or on a cloud store
(gs://...). Object stores cannot append: there a write replaces the whole
object with its old text plus the new rows (eval files are small); locally rows
are appended and synced.
"""
from __future__ import annotations

import json
import os
from typing import Iterable

from etils import epath


def is_local(path) -> bool:
  return "://" not in os.fspath(path)


def read_jsonl(path) -> list[dict]:
  """Rows of a JSONL file ([] if absent); a last line cut by a kill is ignored."""
  p = epath.Path(path)
  if not p.exists():
    return []
  lines = p.read_text(encoding="utf-8").split("\n")
  rows = []
  for k, line in enumerate(lines):
    if not line.strip():
      continue
    try:
      rows.append(json.loads(line))
    except json.JSONDecodeError:
      if k < len(lines) - 1 and any(l.strip() for l in lines[k + 1:]):
        raise ValueError(f"{path}:{k + 1}: malformed JSON line in the middle of the file") from None
  return rows


def _lines(rows: Iterable[dict]) -> str:
  return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)


def append_jsonl(path, rows: Iterable[dict]) -> None:
  """Appends rows durably, dropping a last line cut by an earlier kill."""
  if not is_local(path):
    p = epath.Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    old = p.read_text(encoding="utf-8") if p.exists() else ""
    if old and not old.endswith("\n"):
      old = old.rsplit("\n", 1)[0] + "\n" if "\n" in old else ""
    p.write_text(old + _lines(rows), encoding="utf-8")
    return
  path = os.fspath(path)
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  if os.path.exists(path) and os.path.getsize(path):
    with open(path, "rb") as f:
      f.seek(-1, os.SEEK_END)
      cut = f.read(1) != b"\n"
    if cut:
      with open(path, encoding="utf-8") as f:
        keep = f.read().rsplit("\n", 1)[0]
      with open(path, "w", encoding="utf-8") as f:
        f.write(keep + "\n" if keep else "")
  with open(path, "a", encoding="utf-8") as f:
    f.write(_lines(rows))
    f.flush()
    os.fsync(f.fileno())


def read_json(path):
  """The JSON object in `path`, None when absent."""
  p = epath.Path(path)
  return json.loads(p.read_text(encoding="utf-8")) if p.exists() else None


def write_json(path, obj) -> None:
  p = epath.Path(path)
  p.parent.mkdir(parents=True, exist_ok=True)
  p.write_text(json.dumps(obj, indent=1), encoding="utf-8")
