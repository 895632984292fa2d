"""Pretraining batches from a weighted mixture of document sources (config.data.source="mixture").

`config.data.mixture` names the sources: {name: {"path": ..., "weight": w}}. A source file is
  *.txt    documents separated by blank lines;
  *.jsonl  rows with "text" (a document) or "messages" (a conversation, rendered with the
           tokenizer's chat template, so pretraining sees the same turn format as later chat
           fine-tuning and evaluation).
Each document is tokenized and followed by the end-of-document token; a source is the endless
concatenation of its documents, reshuffled every epoch (numpy Philox keyed by (seed, source,
epoch)).

Every batch row is seq_len + 1 consecutive tokens of ONE source: row k (counting rows over the
whole run) draws its source with probability weight / sum(weights) from a Philox stream keyed by
(seed, k), so the mixture weights hold exactly in expectation, independently of document
lengths, and the plan is a pure function of k. All tokens are trained (loss mask 1). With
`data.document_masking` (default) every document inside a row is its own segment: it attends
only to itself and its positions start at 0, so a conversation is seen exactly as at inference
(its own system prompt first, no earlier conversation in view), as packed pretraining with
segment ids does (MaxText, T5X). Without it, documents attend causally across the
end-of-document token (GPT-2 style). The state (rows emitted, and per source its epoch, document and
token offset) is saved in checkpoints, so a resumed run continues the same stream; every host
computes the whole plan and keeps its own rows.
"""
from __future__ import annotations

import json
import os

import numpy as np

from jaxlab.data.errors import DataError


def read_documents(path: str, tokenizer) -> list[str]:
  """The documents of one source file (see the module docstring)."""
  from etils import epath
  p = epath.Path(path)
  if not p.exists():
    raise DataError(f"{path}: mixture source file does not exist")
  try:
    text = p.read_text(encoding="utf-8")
  except UnicodeDecodeError as e:
    line = p.read_bytes()[:e.start].count(b"\n") + 1
    raise DataError(f"{path}:{line}: not valid UTF-8 ({e.reason})") from None
  if path.endswith(".jsonl"):
    docs = []
    for lineno, line in enumerate(text.splitlines(), start=1):
      if not line.strip():
        continue
      try:
        row = json.loads(line)
      except json.JSONDecodeError as e:
        raise DataError(f"{path}:{lineno}: malformed JSON ({e.msg})") from None
      if isinstance(row, dict) and isinstance(row.get("text"), str):
        docs.append(row["text"])
      elif isinstance(row, dict) and isinstance(row.get("messages"), list):
        docs.append(tokenizer.apply_chat_template(row["messages"], tokenize=False))
      else:
        raise DataError(f"{path}:{lineno}: expected an object with 'text' or 'messages'")
  else:
    docs = [d.strip() for d in text.split("\n\n") if d.strip()]
  if not docs:
    raise DataError(f"{path}: no documents")
  return docs


def _rng(*parts: int) -> np.random.Generator:
  return np.random.Generator(np.random.Philox(np.random.SeedSequence([p & 0xFFFFFFFF for p in parts])))


def _doc_end_id(tokenizer) -> int:
  from jaxlab.data.chat import end_of_turn_ids
  for t in ("<|endoftext|>", "<|end_of_text|>"):
    i = tokenizer.convert_tokens_to_ids(t)
    if i is not None and i != tokenizer.unk_token_id:
      return int(i)
  return int(tokenizer.eos_token_id if tokenizer.eos_token_id is not None
             else end_of_turn_ids(tokenizer)[-1])


def document_segments(inputs_BxL: np.ndarray, end_id: int) -> tuple[np.ndarray, np.ndarray]:
  """(segment_ids, positions) [B, L] of packed rows: a new segment (positions from 0) starts
  after every end-of-document token, which closes its own document."""
  ends = (inputs_BxL == end_id).astype(np.int32)
  seg = 1 + np.cumsum(ends, axis=1) - ends  # the end token belongs to the document it closes
  start = np.concatenate([np.ones_like(seg[:, :1], bool), seg[:, 1:] != seg[:, :-1]], axis=1)
  idx = np.arange(seg.shape[1], dtype=np.int32)[None, :]
  first = np.maximum.accumulate(np.where(start, idx, 0), axis=1)
  return seg.astype(np.int32), (idx - first).astype(np.int32)


class MixtureBatches:
  """Endless, resumable stream of this host's pretraining rows drawn from weighted sources."""

  def __init__(self, sources: dict[str, dict], tokenizer, *, global_batch_size: int,
               seq_len: int, seed: int, process_index: int = 0, process_count: int = 1,
               document_masking: bool = True):
    if not sources:
      raise ValueError("config key data.mixture is empty: name at least one source")
    if global_batch_size % process_count:
      raise ValueError(f"global_batch_size={global_batch_size} is not divisible by "
                       f"process_count={process_count}")
    self.names = sorted(sources)
    weights = np.array([float(sources[n]["weight"]) for n in self.names])
    for n, w in zip(self.names, weights):
      if not w >= 0:
        raise ValueError(f"config key data.mixture.{n}.weight={w}: must be >= 0")
    if weights.sum() <= 0:
      raise ValueError("config key data.mixture: the weights sum to 0")
    self.probs = weights / weights.sum()
    self.end_id = end = _doc_end_id(tokenizer)
    self.document_masking = document_masking
    self.docs = []
    for n in self.names:
      texts = read_documents(sources[n]["path"], tokenizer)
      ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
      self.docs.append([np.asarray(list(d) + [end], np.int32) for d in ids])
    self.global_batch_size, self.seq_len, self.seed = global_batch_size, seq_len, seed
    self.per_host, self.process_index = global_batch_size // process_count, process_index
    self.rows = 0
    self.cursor = [[0, 0, 0] for _ in self.names]  # per source: epoch, document, token offset
    self._orders = {}

  def _order(self, s: int, epoch: int) -> np.ndarray:
    key = (s, epoch)
    if key not in self._orders:
      rng = _rng(self.seed, s, epoch)
      self._orders = {key: rng.permutation(len(self.docs[s]))}
    return self._orders[key]

  def source_of_row(self, k: int) -> int:
    u = _rng(self.seed, 0xB17, k).random()
    return int(min(np.searchsorted(np.cumsum(self.probs), u, side="right"), len(self.probs) - 1))

  def _take(self, s: int, n: int) -> np.ndarray:
    out, cur = [], self.cursor[s]
    while n > 0:
      doc = self.docs[s][self._order(s, cur[0])[cur[1]]]
      piece = doc[cur[2]:cur[2] + n]
      out.append(piece)
      n -= len(piece)
      cur[2] += len(piece)
      if cur[2] == len(doc):
        cur[1], cur[2] = cur[1] + 1, 0
        if cur[1] == len(self.docs[s]):
          cur[0], cur[1] = cur[0] + 1, 0
    return np.concatenate(out)

  def __iter__(self):
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    rows = []
    for _ in range(self.global_batch_size):
      rows.append(self._take(self.source_of_row(self.rows), self.seq_len + 1))
      self.rows += 1
    lo = self.process_index * self.per_host
    mine = np.stack(rows[lo:lo + self.per_host])
    b = len(mine)
    inputs = mine[:, :-1]
    if self.document_masking:
      segments, positions = document_segments(inputs, self.end_id)
    else:
      segments = np.ones((b, self.seq_len), np.int32)
      positions = np.tile(np.arange(self.seq_len, dtype=np.int32), (b, 1))
    return {"inputs": inputs, "targets": mine[:, 1:], "positions": positions,
            "segment_ids": segments, "loss_mask": np.ones((b, self.seq_len), np.float32)}

  def get_state(self) -> dict:
    return {"rows": self.rows, "cursor": [list(c) for c in self.cursor], "seed": self.seed,
            "sources": self.names, "seq_len": self.seq_len}

  def set_state(self, state: dict) -> None:
    for key in ("seed", "seq_len"):
      if state.get(key) != getattr(self, key):
        raise ValueError(f"mixture iterator state has {key}={state.get(key)!r}, this run "
                         f"{getattr(self, key)!r}")
    if state.get("sources") != self.names:
      raise ValueError(f"mixture iterator state has sources {state.get('sources')}, this run "
                       f"{self.names} (config key data.mixture)")
    self.rows = int(state["rows"])
    self.cursor = [list(c) for c in state["cursor"]]

  @property
  def stats(self) -> dict:
    return {"sources": {n: {"weight": float(p), "documents": len(d),
                            "tokens": int(sum(len(x) for x in d))}
                        for n, p, d in zip(self.names, self.probs, self.docs)},
            "rows": self.rows, "truncated": 0, "dropped": 0}


def mixture_texts(sources: dict[str, dict], tokenizer=None, limit: int = 20000) -> list[str]:
  """Up to `limit` documents of every source, raw (for fitting a tokenizer on the mixture);
  conversations contribute their message texts."""
  texts = []
  for n in sorted(sources):
    path = sources[n]["path"]
    if path.endswith(".jsonl"):
      with open(path, encoding="utf-8") as f:
        for line in list(f)[:limit]:
          row = json.loads(line) if line.strip() else {}
          texts += [row["text"]] if "text" in row else [m["content"] for m in row.get("messages", [])]
    else:
      texts += read_documents(path, tokenizer)[:limit]
  return texts
