"""Append-only JSONL files that let every eval stage resume where a killed run stopped."""
from __future__ import annotations

import json
import os
from typing import Iterable


def read_jsonl(path: str) -> list[dict]:
  """Rows of a JSONL file ([] if absent); a last line cut by a kill is ignored."""
  if not os.path.exists(path):
    return []
  rows = []
  with open(path, encoding="utf-8") as f:
    lines = f.read().split("\n")
  for k, line in enumerate(lines):
    if not line.strip():
      continue
    try:
      rows.append(json.loads(line))
    except json.JSONDecodeError:
      if k < len(lines) - 1 and any(l.strip() for l in lines[k + 1:]):
        raise ValueError(f"{path}:{k + 1}: malformed JSON line in the middle of the file") from None
  return rows


def append_jsonl(path: str, rows: Iterable[dict]) -> None:
  """Appends rows and syncs to disk, repairing a last line cut by an earlier kill."""
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
    for r in rows:
      f.write(json.dumps(r, ensure_ascii=False) + "\n")
    f.flush()
    os.fsync(f.fileno())
