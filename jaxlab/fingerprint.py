"""Content fingerprints: what a result depends on, compared by contents rather than by path.

A run that reads a teacher, a tokenizer or a data file records their fingerprints; a resume
or a cached artefact made from other contents is then a changed setting, never a silent reuse.
  file_digest        sha256 of a file's bytes (local or gs://)
  tokenizer_digest   vocabulary, merges, normalisation, special tokens and chat template
  params_digest      every weight's raw bits (the checkpoints' own per-array checksums)
"""
from __future__ import annotations

import hashlib
import json

import jax

from jaxlab import paths


def file_digest(path) -> dict:
  """{"path", "bytes", "sha256"} of a file, read in 1 MiB blocks through etils.epath."""
  h, size = hashlib.sha256(), 0
  with paths.path(path).open("rb") as f:
    while chunk := f.read(1 << 20):
      h.update(chunk)
      size += len(chunk)
  return {"path": str(paths.path(path)), "bytes": size, "sha256": h.hexdigest()}


def tokenizer_digest(tokenizer) -> str:
  """16 hex digits of everything that maps text to ids: the backend's full serialisation (vocab,
  merges, normaliser, pre-tokeniser, added tokens), the special-token roles and the chat
  template. Two tokenizers of the same size fitted on other data differ here."""
  backend = getattr(tokenizer, "backend_tokenizer", None)
  if backend is not None:
    # Truncation and padding are call-time state of the backend, not its mapping.
    spec = {k: v for k, v in json.loads(backend.to_str()).items()
            if k not in ("truncation", "padding")}
  else:
    spec = sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1])
  what = {
      "backend": spec,
      "special": {k: str(v) for k, v in sorted(tokenizer.special_tokens_map.items())},
      "chat_template": getattr(tokenizer, "chat_template", None) or "",
  }
  return hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()[:16]


def params_digest(tree) -> str:
  """16 hex digits over every array's raw bits and key path (computed where the arrays live:
  a sharded model is fingerprinted without gathering it on one host)."""
  from jaxlab.checkpoint import fingerprint, flatten  # pylint: disable=g-import-not-at-top
  flat, _ = flatten(tree)
  sums, _ = fingerprint(flat)
  meta = {k: [list(x.shape), str(x.dtype)] for k, x in flat.items() if isinstance(x, jax.Array)}
  return hashlib.sha256(json.dumps([sums, meta], sort_keys=True).encode()).hexdigest()[:16]
