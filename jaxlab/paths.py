"""Workdir paths through etils.epath, so `gs://bucket/run` is a bucket on every worker, never
a local `./gs:/bucket/run` folder, and one process writes each shared file.

Local paths behave as before (made absolute, since Orbax wants absolute paths).
"""
from __future__ import annotations

import os

import jax
from etils import epath


def is_uri(p) -> bool:
  """Whether `p` names a remote filesystem (gs://, s3://, ...), not a local path."""
  return "://" in os.fspath(p)


def path(p, *parts: str) -> epath.Path:
  """epath.Path of `p` (joined with `parts`); local paths are made absolute."""
  p = os.fspath(p)
  base = epath.Path(p) if is_uri(p) else epath.Path(os.path.abspath(p))
  return base.joinpath(*parts) if parts else base


def is_writer() -> bool:
  """Only process 0 writes files shared by the run (metrics, configs, tokenizer, exports)."""
  return jax.process_index() == 0


def write_text(p, text: str) -> None:
  """Writes `text` to `p` (process 0 only), through a temporary name, so a kill never leaves
  half a file where a whole one was."""
  if not is_writer():
    return
  p = path(p)
  p.parent.mkdir(parents=True, exist_ok=True)
  tmp = p.parent / (p.name + ".tmp")
  tmp.write_text(text)
  tmp.replace(p)


def read_text(p) -> str | None:
  """Contents of `p`, or None when it does not exist."""
  p = path(p)
  return p.read_text() if p.exists() else None
