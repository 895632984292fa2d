"""Streaming, per-host, checkpointable SFT batches from a prepared TFDS split, through grain.

The split is an array_record random-access source read on demand, so a dataset larger than
host memory works: host h of P keeps records h, h+P, h+2P, ... (disjoint shards that together
cover the split), shuffles its shard with grain's index shuffle (a new order every epoch, no
index array in memory), encodes each conversation with the chat template when it is reached,
and pads (one example per row) or packs (grain's first-fit packer, segment ids and positions
restarting per example) into its rows of the global batch. The iterator position is grain's
own state (`get_state`/`set_state`, JSON), so a restored run continues at the same example.
The interface is `jaxlab.data.batching.SFTBatches`'s: `next()` -> host-local batch dict,
`get_state()`, `set_state()`, `stats`.
"""
from __future__ import annotations

import os
import threading
from typing import Any, Sequence

import grain
import numpy as np

from jaxlab.data import chat
from jaxlab.data.batching import OVERLONG_POLICIES, apply_overlong, make_batch

_PACKED = ("inputs", "targets", "loss_mask")


def decode_chat(record: dict) -> dict[str, Any]:
  """A TFDS chat record as plain Python: messages [{role, content}], file, line, metadata."""
  text = lambda v: v.decode("utf-8") if isinstance(v, bytes) else v
  msgs = record["messages"]
  out = {k: text(v) if not isinstance(v, np.ndarray) else v.tolist()
         for k, v in record.items() if k != "messages"}
  out["messages"] = [{"role": text(r), "content": text(c)}
                     for r, c in zip(msgs["role"], msgs["content"])]
  out["line"] = int(record["line"])
  return out


class GrainBatches:
  """This host's rows of each global batch, streamed from `source` (any random-access source)."""

  def __init__(self, source: Sequence, tokenizer, *, global_batch_size: int, seq_len: int,
               pack: bool, seed: int, overlong: str = "truncate", process_index: int = 0,
               process_count: int = 1, pad_id: int = 0, num_epochs: int | None = None,
               max_examples: int = 0):
    if overlong not in OVERLONG_POLICIES:
      raise ValueError(f"config key data.overlong={overlong!r}: expected one of {OVERLONG_POLICIES}")
    if global_batch_size % process_count:
      raise ValueError(f"global_batch_size={global_batch_size} is not divisible by "
                       f"process_count={process_count}")
    if not 0 <= process_index < process_count:
      raise ValueError(f"process_index={process_index} not in [0, {process_count})")
    records = grain.MapDataset.source(source)[:max_examples or None]
    if len(records) < process_count:
      raise ValueError(f"{len(records)} records cannot be shared by {process_count} hosts")
    chat.check_chat_template(tokenizer)
    self.tokenizer, self.seq_len, self.pack, self.seed = tokenizer, seq_len, pack, seed
    self.overlong, self.pad_id = overlong, pad_id
    self.global_batch_size, self.per_host = global_batch_size, global_batch_size // process_count
    self.process_index, self.process_count = process_index, process_count
    shard = records[process_index::process_count]
    self.num_records = len(shard)
    # Live counts, updated in place by grain's reader threads (so under a lock) as examples are
    # encoded, prefetched ones included; not restored on resume.
    self.stats = {"examples_seen": 0, "truncated": 0, "dropped": 0, "num_records": self.num_records}
    self._lock = threading.Lock()
    # Mixed seed, as SFTBatches does: seeds s and s+1 share no epoch orders.
    grain_seed = int(np.random.SeedSequence(seed).generate_state(1)[0])
    ds = shard.shuffle(seed=grain_seed).repeat(num_epochs).map(self._encode)
    ds = ds.to_iter_dataset().filter(lambda ex: ex is not None)
    if pack:
      ds = ds.map(lambda ex: {"inputs": ex[0][:-1], "targets": ex[0][1:],
                              "loss_mask": ex[1][1:].astype(np.float32)})
      ds = grain.experimental.FirstFitPackIterDataset(
          ds, length_struct={k: seq_len for k in _PACKED}, num_packing_bins=self.per_host,
          seed=grain_seed, padding_struct={"inputs": pad_id, "targets": pad_id, "loss_mask": 0})
      ds = ds.batch(self.per_host, batch_fn=self._packed_batch)
    else:
      ds = ds.batch(self.per_host, batch_fn=lambda rows: make_batch(
          [[r] for r in rows] + [[]] * (self.per_host - len(rows)), seq_len, pad_id))
    self._iter = iter(ds)

  def _encode(self, record: dict):
    """(ids, loss_mask) of one record, or None when the overlong policy drops it."""
    row = decode_chat(record)
    source = (row.get("file", "<tfds>"), row["line"])
    example = chat.encode_chat(self.tokenizer, row["messages"], source=source)
    kept, stats = apply_overlong([example], self.seq_len, self.overlong)
    with self._lock:
      self.stats["examples_seen"] += 1
      self.stats["truncated"] += stats["truncated"]
      self.stats["dropped"] += stats["dropped"]
    return kept[0] if kept else None

  def _packed_batch(self, rows: Sequence[dict]) -> dict[str, np.ndarray]:
    batch = {k: np.stack([r[k] for r in rows]) for k in _PACKED}
    batch["positions"] = np.stack([r["inputs_positions"] for r in rows]).astype(np.int32)
    batch["segment_ids"] = np.stack([r["inputs_segment_ids"] for r in rows]).astype(np.int32)
    for k in ("inputs", "targets"):
      batch[k] = batch[k].astype(np.int32)
    batch["loss_mask"] = batch["loss_mask"].astype(np.float32)
    if len(rows) < self.per_host:  # the end of a finite stream: empty rows
      pad = self.per_host - len(rows)
      batch = {k: np.concatenate([v, np.full((pad, self.seq_len), self.pad_id if k in
                                             ("inputs", "targets") else 0, v.dtype)])
               for k, v in batch.items()}
    return batch

  def __iter__(self):
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    return next(self._iter)

  def _settings(self) -> dict:
    return {"seed": self.seed, "global_batch_size": self.global_batch_size,
            "seq_len": self.seq_len, "pack": self.pack, "process_index": self.process_index,
            "process_count": self.process_count, "num_records": self.num_records}

  def get_state(self) -> dict:
    """JSON-serialisable position (grain's iterator state) and the settings it belongs to."""
    return {"grain": self._iter.get_state(), **self._settings()}

  def set_state(self, state: dict) -> None:
    """Restores a `get_state` dict; data and batch settings must match."""
    for key, value in self._settings().items():
      if key in state and state[key] != value:
        raise ValueError(f"iterator state has {key}={state[key]!r}, this iterator has {value!r}")
    self._iter.set_state(state["grain"])


def batches_from_config(config, tokenizer) -> tuple[GrainBatches, dict]:
  """`jaxlab.train.sources.make_batches` for data.source="tfds": (batches, live stats).

  data.tfds.{name, split, data_dir, download} name the dataset; it is prepared from the file at
  data.train_path by process 0 (the others wait), then every host streams its shard.
  """
  import jax
  from jax.experimental import multihost_utils
  from jaxlab.tfds_data import builders
  t = config.data.tfds
  data_dir = os.path.expanduser(t.data_dir)
  if jax.process_index() == 0:
    builders.prepare(t.name, data_dir=data_dir, path=config.data.train_path or None,
                     download=t.get("download", False))
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices("jaxlab.tfds_data prepared")
  batches = GrainBatches(
      tfds_source(t.name, t.split, data_dir), tokenizer,
      global_batch_size=config.train.global_batch_size, seq_len=config.data.seq_len,
      pack=config.data.pack, seed=config.seed, overlong=config.data.overlong,
      process_index=jax.process_index(), process_count=jax.process_count(),
      pad_id=chat.pad_id(tokenizer), max_examples=config.data.get("max_examples", 0))
  return batches, batches.stats


def tfds_source(name: str, split: str, data_dir: str):
  """The random-access array_record source of a prepared TFDS split ("builder/config")."""
  import tensorflow_datasets as tfds
  from jaxlab.tfds_data import builders  # registers jaxlab's builders
  del builders
  return tfds.data_source(name, split=split, data_dir=data_dir)


def text_source(name: str, split: str, data_dir: str, feature: str = "text") -> grain.MapDataset:
  """A TFDS text dataset's `feature` as str, for pretraining mixtures."""
  return grain.MapDataset.source(tfds_source(name, split, data_dir)).map(
      lambda r: r[feature].decode("utf-8") if isinstance(r[feature], bytes) else r[feature])


def mix_text_sources(sources: Sequence[grain.MapDataset], weights: Sequence[float]) -> grain.MapDataset:
  """Interleaves sources in proportion to `weights` (grain's deterministic mixing)."""
  return grain.MapDataset.mix(list(sources), weights=list(weights))
