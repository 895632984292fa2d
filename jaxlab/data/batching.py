"""Fixed-shape causal-LM batches from encoded chat examples: shift, pad or pack, shuffle, resume.

Each example (ids[n], mask[n]) becomes n-1 next-token pairs (inputs=ids[:-1], targets=ids[1:],
loss=mask[1:]) before any packing, so no pair ever spans two examples. A batch row holds one
example (padding mode) or several whole examples placed greedily first-fit (packing mode), with
`segment_ids` 1, 2, ... per example (0 = padding) and `positions` restarting at 0 in each segment.

Order: grain's `MapDataset.range(n).shuffle(seed).repeat()` is a random-access index stream
reshuffled every epoch (a fixed Feistel index shuffle, so orders do not depend on numpy's RNG
version); we read one epoch's order into an array when the epoch starts. Everything else is plain
numpy with explicit state: a batch is a pure function of (epoch, position) -- position being the
number of examples of the epoch's order already consumed -- so `get_state`/`set_state` resume
exactly, and every host computes the same global plan and keeps only its own rows. grain's
iterators, checkpointing and packers were not used: they add worker/prefetch state and split or
reorder examples, which makes exact multi-host resumption harder to verify. Batches never cross
epochs: the last batch of an epoch has empty rows (all-zero loss mask) if it runs out.
"""

from collections.abc import Iterable, Sequence

import grain
import numpy as np

from jaxlab.data import chat
from jaxlab.data.errors import DataError

Example = tuple[np.ndarray, np.ndarray]  # (ids int32[n], loss_mask bool[n])
OVERLONG_POLICIES = ("truncate", "drop")


def apply_overlong(
    examples: Sequence[Example], seq_len: int, policy: str
) -> tuple[list[Example], dict]:
  """Truncates or drops examples with more than seq_len pairs; drops ones with no trained target."""
  if policy not in OVERLONG_POLICIES:
    raise ValueError(f"overlong policy must be one of {OVERLONG_POLICIES}, got {policy!r}")
  kept, truncated, dropped = [], 0, 0
  for ids, mask in examples:
    cut = len(ids) - 1 > seq_len
    if cut and policy == "drop":
      dropped += 1
      continue
    if cut:
      ids, mask = ids[:seq_len + 1], mask[:seq_len + 1]
    if len(ids) < 2 or not mask[1:].any():
      dropped += 1
      continue
    truncated += cut
    kept.append((ids, mask))
  stats = {"examples_total": len(examples), "examples_kept": len(kept),
           "truncated": truncated, "dropped": dropped}
  return kept, stats


def load_sft_examples(
    path: str, tokenizer, *, seq_len: int, overlong: str, max_examples: int | None = None
) -> tuple[list[Example], dict]:
  """Reads chat JSONL (its first `max_examples` rows if set), encodes it, applies `overlong`."""
  if overlong not in OVERLONG_POLICIES:
    raise ValueError(f"overlong policy must be one of {OVERLONG_POLICIES}, got {overlong!r}")
  chat.check_chat_template(tokenizer)
  convs = chat.read_chat_jsonl(path)[:max_examples or None]
  encoded = [chat.encode_chat(tokenizer, c.messages, source=c.source) for c in convs]
  kept, stats = apply_overlong(encoded, seq_len, overlong)
  if not kept:
    n_long = sum(len(ids) - 1 > seq_len for ids, _ in encoded)
    raise DataError(
        f"{path}: no trainable examples: all {stats['examples_total']} rows dropped "
        f"({n_long} longer than data.seq_len={seq_len} with data.overlong={overlong!r}, "
        f"{stats['dropped'] - (n_long if overlong == 'drop' else 0)} with no trained token); "
        "raise data.seq_len or use data.overlong='truncate'")
  return kept, stats


def first_fit(lengths: Iterable[int], num_rows: int, seq_len: int) -> tuple[list[list[int]], int]:
  """Places items in order into the first row with room; stops at the first item that fits nowhere.

  Returns (rows of item indices, number of items placed). `lengths` is read lazily.
  """
  free = np.full(num_rows, seq_len)
  rows = [[] for _ in range(num_rows)]
  placed = 0
  for k, length in enumerate(lengths):
    (fits,) = np.nonzero(free >= length)
    if not len(fits):
      break
    rows[fits[0]].append(k)
    free[fits[0]] -= length
    placed = k + 1
  return rows, placed


def make_batch(
    rows: Sequence[Sequence[Example]], seq_len: int, pad_id: int = 0
) -> dict[str, np.ndarray]:
  """Lays whole examples out in rows: inputs/targets/positions/segment_ids int32, loss_mask f32."""
  shape = (len(rows), seq_len)
  batch = {"inputs": np.full(shape, pad_id, np.int32), "targets": np.full(shape, pad_id, np.int32),
           "positions": np.zeros(shape, np.int32), "segment_ids": np.zeros(shape, np.int32),
           "loss_mask": np.zeros(shape, np.float32)}
  for r, row in enumerate(rows):
    start = 0
    for seg, (ids, mask) in enumerate(row, start=1):
      n = len(ids) - 1
      if start + n > seq_len:
        raise ValueError(f"row {r} needs {start + n} > seq_len={seq_len} positions")
      span = slice(start, start + n)
      batch["inputs"][r, span] = ids[:-1]
      batch["targets"][r, span] = ids[1:]
      batch["loss_mask"][r, span] = mask[1:]
      batch["positions"][r, span] = np.arange(n)
      batch["segment_ids"][r, span] = seg
      start += n
  return batch


class SFTBatches:
  """Infinite, epoch-shuffled, deterministic and resumable stream of this host's batch rows."""

  def __init__(
      self, examples: Sequence[Example], *, global_batch_size: int, seq_len: int, pack: bool,
      seed: int, overlong: str = "drop", process_index: int = 0, process_count: int = 1,
      pad_id: int = 0):
    if global_batch_size % process_count:
      raise ValueError(f"global_batch_size={global_batch_size} is not divisible by "
                       f"process_count={process_count}")
    if not 0 <= process_index < process_count:
      raise ValueError(f"process_index={process_index} not in [0, {process_count})")
    self.examples, self.overlong_stats = apply_overlong(examples, seq_len, overlong)
    if not self.examples:
      raise ValueError(f"no trainable examples left (overlong={overlong!r}, seq_len={seq_len}): "
                       f"{self.overlong_stats}")
    self.global_batch_size, self.seq_len = global_batch_size, seq_len
    self.pack, self.seed = pack, seed
    self.per_host = global_batch_size // process_count
    self.process_index, self.pad_id = process_index, pad_id
    self._lengths = np.array([len(ids) - 1 for ids, _ in self.examples])
    # Mix the seed so that seeds s and s+1 do not share epoch orders (grain uses seed + epoch).
    grain_seed = int(np.random.SeedSequence(seed).generate_state(1)[0])
    self._order = grain.MapDataset.range(len(self.examples)).shuffle(seed=grain_seed).repeat()
    self._cache = (-1, None)
    self.epoch, self.position = 0, 0

  @property
  def num_examples(self) -> int:
    return len(self.examples)

  def _epoch_order(self, epoch: int) -> np.ndarray:
    """Example ids in epoch `epoch`'s shuffled order (cached for the latest epoch asked)."""
    if self._cache[0] != epoch:
      n = self.num_examples
      self._cache = (epoch, np.array([self._order[epoch * n + k] for k in range(n)], np.int64))
    return self._cache[1]

  def _plan(self, epoch: int, position: int) -> tuple[list[list[int]], int]:
    """Global rows (example ids) of the batch starting at (epoch, position), and examples used."""
    rows_n = self.global_batch_size
    most = rows_n * (self.seq_len if self.pack else 1)  # every example has >= 1 pair
    order = self._epoch_order(epoch)[position:position + most]
    if not self.pack:
      return [[i] for i in order], len(order)
    rows, used = first_fit(self._lengths[order], rows_n, self.seq_len)
    return [[order[k] for k in row] for row in rows], used

  def __iter__(self):
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    rows, used = self._plan(self.epoch, self.position)
    rows = rows + [[]] * (self.global_batch_size - len(rows))
    mine = rows[self.process_index * self.per_host:(self.process_index + 1) * self.per_host]
    batch = make_batch([[self.examples[i] for i in row] for row in mine], self.seq_len, self.pad_id)
    self.position += used
    if self.position == self.num_examples:
      self.epoch, self.position = self.epoch + 1, 0
    return batch

  def batches_per_epoch(self, epoch: int = 0) -> int:
    """Number of batches epoch `epoch` yields (packing makes it depend on the epoch's order)."""
    if not self.pack:
      return -(-self.num_examples // self.global_batch_size)
    count, position = 0, 0
    while position < self.num_examples:
      position += self._plan(epoch, position)[1]
      count += 1
    return count

  def get_state(self) -> dict:
    """JSON-serialisable iterator state."""
    return {"epoch": self.epoch, "position": self.position, "seed": self.seed,
            "num_examples": self.num_examples, "global_batch_size": self.global_batch_size,
            "seq_len": self.seq_len, "pack": self.pack}

  def set_state(self, state: dict) -> None:
    """Restores a `get_state` dict; the data and batch settings must match."""
    for key in ("seed", "num_examples", "global_batch_size", "seq_len", "pack"):
      if key in state and state[key] != getattr(self, key):
        raise ValueError(f"iterator state has {key}={state[key]!r}, this iterator has "
                         f"{getattr(self, key)!r}")
    if not 0 <= state["position"] < self.num_examples or state["epoch"] < 0:
      raise ValueError(f"invalid iterator state {state}")
    self.epoch, self.position = int(state["epoch"]), int(state["position"])

  @property
  def stats(self) -> dict:
    """Example counts (total, kept, truncated, dropped) and the current epoch/position."""
    return {**self.overlong_stats, "epoch": self.epoch, "position": self.position}
