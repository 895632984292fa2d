"""Prompt/completion batches for the distillation channels: a student prompt, a teacher prompt
and one shared completion per row.

The teacher may see a different context than the student (subliminal learning: the teacher is
the base model under a trait system prompt, the student sees only the user turn). Each row
therefore carries both prompts, each left-padded to its own length, and one completion,
right-padded, so that completion token t sits at index t of `completion` for both models: the
student scores it after `prompt`, the teacher after `teacher_prompt`.

Encoding reuses `chat.encode_chat`, so the prompt tokens are exactly what the sampler feeds at
inference and the completion is the last assistant turn up to and including its end-of-turn
token. A row whose last message is a user turn is a prompt only (on-policy channels sample the
completion). The teacher's system prompt, when given, replaces the row's system message.

Order: an endless stream of examples, reshuffled every epoch (a permutation of the example ids
from numpy's Philox generator keyed by (seed, epoch)); a batch is the next `global_batch_size`
examples of the stream, crossing epoch boundaries, so no row is ever empty and the iterator state
is just (epoch, position).
"""
from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

from jaxlab.data import chat
from jaxlab.data.errors import DataError, where


@dataclasses.dataclass(frozen=True)
class PCExample:
  prompt: np.ndarray          # int32 [p] student prompt (ends with the generation prompt)
  teacher_prompt: np.ndarray  # int32 [q] teacher prompt
  completion: np.ndarray      # int32 [c] (c = 0: prompt only)
  source: tuple[str, int] | None = None


def _encode_prompt(tokenizer, messages, source) -> np.ndarray:
  text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
  ids = tokenizer(text, add_special_tokens=False)["input_ids"]
  if not ids:
    raise DataError(f"{where(source)}: the prompt encodes to no tokens")
  return np.asarray(ids, np.int32)


def _split_last_turn(tokenizer, messages, source) -> tuple[np.ndarray, np.ndarray]:
  """(prompt ids, completion ids) where the completion is the last assistant turn."""
  if messages[-1]["role"] != "assistant":
    return _encode_prompt(tokenizer, messages, source), np.zeros((0,), np.int32)
  ids, mask = chat.encode_chat(tokenizer, messages, source=source)
  end = int(np.nonzero(mask)[0][-1]) + 1
  start = end
  while start > 0 and mask[start - 1]:
    start -= 1
  return ids[:start], ids[start:end]


def with_system(messages: list[dict], system_prompt: str | None) -> list[dict]:
  """`messages` with its system message replaced by `system_prompt` (None: unchanged)."""
  if system_prompt is None:
    return messages
  rest = [m for m in messages if m["role"] != "system"]
  return ([{"role": "system", "content": system_prompt}] if system_prompt else []) + rest


def encode_example(tokenizer, messages, *, teacher_system: str | None = None,
                   source=None) -> PCExample:
  """Student prompt, teacher prompt (under `teacher_system`) and the shared completion."""
  prompt, completion = _split_last_turn(tokenizer, messages, source)
  if teacher_system is None:
    return PCExample(prompt, prompt, completion, source)
  t_prompt, t_completion = _split_last_turn(tokenizer, with_system(messages, teacher_system),
                                            source)
  if not np.array_equal(t_completion, completion):
    raise DataError(f"{where(source)}: the completion encodes differently under the teacher's "
                    "system prompt (config key teacher.system_prompt); cannot align positions")
  return PCExample(prompt, t_prompt, completion, source)


def load_examples(path: str, tokenizer, *, teacher_system: str | None = None,
                  max_examples: int | None = None) -> list[PCExample]:
  """Encodes a chat JSONL file (rows ending with an assistant turn, or prompts only)."""
  chat.check_chat_template(tokenizer)
  convs = chat.read_chat_jsonl(path)[:max_examples or None]
  if not convs:
    raise DataError(f"{path}: no conversations")
  return [encode_example(tokenizer, c.messages, teacher_system=teacher_system, source=c.source)
          for c in convs]


def fit_examples(examples: Sequence[PCExample], *, prompt_len: int, teacher_prompt_len: int,
                 completion_len: int, need_completion: bool) -> tuple[list[int], dict]:
  """Ids of the examples that fit (prompts within their lengths; a completion when needed);
  completions longer than completion_len are truncated (counted)."""
  kept, dropped_prompt, dropped_empty, truncated = [], 0, 0, 0
  for i, ex in enumerate(examples):
    if len(ex.prompt) > prompt_len or len(ex.teacher_prompt) > teacher_prompt_len:
      dropped_prompt += 1
    elif need_completion and len(ex.completion) == 0:
      dropped_empty += 1
    else:
      truncated += len(ex.completion) > completion_len
      kept.append(i)
  return kept, {"examples_total": len(examples), "examples_kept": len(kept),
                "dropped_long_prompt": dropped_prompt, "dropped_no_completion": dropped_empty,
                "truncated": truncated}


def make_batch(examples: Sequence[PCExample], *, prompt_len: int, teacher_prompt_len: int,
               completion_len: int, pad_id: int) -> dict[str, np.ndarray]:
  """prompt/teacher_prompt int32 [B, P] left-padded with their lengths [B]; completion int32
  [B, C] right-padded; loss_mask float32 [B, C] (1 on completion tokens)."""
  b = len(examples)
  out = {"prompt": np.full((b, prompt_len), pad_id, np.int32),
         "prompt_len": np.zeros((b,), np.int32),
         "teacher_prompt": np.full((b, teacher_prompt_len), pad_id, np.int32),
         "teacher_prompt_len": np.zeros((b,), np.int32),
         "completion": np.full((b, completion_len), pad_id, np.int32),
         "loss_mask": np.zeros((b, completion_len), np.float32)}
  for r, ex in enumerate(examples):
    for key, ids, length in (("prompt", ex.prompt, prompt_len),
                             ("teacher_prompt", ex.teacher_prompt, teacher_prompt_len)):
      out[key][r, length - len(ids):] = ids
      out[key + "_len"][r] = len(ids)
    c = ex.completion[:completion_len]
    out["completion"][r, :len(c)] = c
    out["loss_mask"][r, :len(c)] = 1.0
  return out


class PromptCompletionBatches:
  """Endless, epoch-shuffled, resumable stream of this host's prompt/completion rows.

  `extras` holds per-example arrays (e.g. cached teacher top-k log-probs, [N, C, k]) that are
  gathered into each batch under their own keys.
  """

  def __init__(self, examples: Sequence[PCExample], ids: Sequence[int], *,
               global_batch_size: int, prompt_len: int, teacher_prompt_len: int,
               completion_len: int, seed: int, pad_id: int, process_index: int = 0,
               process_count: int = 1, extras: dict[str, np.ndarray] | None = None):
    if not ids:
      raise ValueError("no examples left to train on (see the data stats)")
    if global_batch_size % process_count:
      raise ValueError(f"global_batch_size={global_batch_size} is not divisible by "
                       f"process_count={process_count}")
    self.examples, self.ids = examples, np.asarray(ids, np.int64)
    self.global_batch_size, self.seed, self.pad_id = global_batch_size, seed, pad_id
    self.lengths = dict(prompt_len=prompt_len, teacher_prompt_len=teacher_prompt_len,
                        completion_len=completion_len)
    self.per_host = global_batch_size // process_count
    self.process_index = process_index
    self.extras = extras or {}
    self.epoch, self.position = 0, 0

  @property
  def num_examples(self) -> int:
    return len(self.ids)

  def _order(self, epoch: int) -> np.ndarray:
    rng = np.random.Generator(np.random.Philox(key=[self.seed & 0xFFFFFFFF, epoch]))
    return self.ids[rng.permutation(len(self.ids))]

  def next_ids(self) -> np.ndarray:
    """Example ids of the next global batch (advances the stream)."""
    out = []
    while len(out) < self.global_batch_size:
      order = self._order(self.epoch)
      take = order[self.position:self.position + self.global_batch_size - len(out)]
      out.extend(take.tolist())
      self.position += len(take)
      if self.position == len(order):
        self.epoch, self.position = self.epoch + 1, 0
    return np.asarray(out, np.int64)

  def batch_for(self, ids: np.ndarray) -> dict[str, np.ndarray]:
    batch = make_batch([self.examples[i] for i in ids], pad_id=self.pad_id, **self.lengths)
    for key, arr in self.extras.items():
      batch[key] = arr[ids]
    return batch

  def __iter__(self):
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    ids = self.next_ids()
    return self.batch_for(ids[self.process_index * self.per_host:
                              (self.process_index + 1) * self.per_host])

  def get_state(self) -> dict:
    return {"epoch": self.epoch, "position": self.position, "seed": self.seed,
            "num_examples": self.num_examples, "global_batch_size": self.global_batch_size}

  def set_state(self, state: dict) -> None:
    for key in ("seed", "num_examples", "global_batch_size"):
      if key in state and state[key] != getattr(self, key):
        raise ValueError(f"iterator state has {key}={state[key]!r}, this iterator has "
                         f"{getattr(self, key)!r}")
    self.epoch, self.position = int(state["epoch"]), int(state["position"])

  @property
  def stats(self) -> dict:
    return {"epoch": self.epoch, "position": self.position}
