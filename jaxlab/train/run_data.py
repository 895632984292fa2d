"""What a training run trains on (the runner's "build data" step).

Reads config.data (and, for a cached teacher, distill.topk_path or WORKDIR/teacher_topk.npz);
returns the run's batches, what loading did (`stats`, later written to data_stats.json) and
the held-out rows. Packed rows come from jaxlab.train.sources; prompt/completion rows (the
distillation channels, and every channel of a comparison) from jaxlab.data.prompt_completion.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any

import jax
import numpy as np

from jaxlab import config as config_lib
from jaxlab.data import prompt_completion as pc
from jaxlab.train import topk_cache

PACKED_KEYS = ("inputs", "targets", "positions", "segment_ids", "loss_mask")


@dataclasses.dataclass
class RunData:
  batches: Any            # iterator of host-local batches with get_state / set_state
  stats: dict             # data_stats.json
  metrics: dict           # data counts logged with every metrics row
  ndims: dict             # {batch key: ndim}: the batch's shardings
  held_ids: list = dataclasses.field(default_factory=list)
  held_batch: dict | None = None


def make_prompt_completion_data(config, tokenizer):
  """(examples, train ids, held-out ids, stats, lengths), the same whatever the channel: the
  teacher's prompt, the rows kept and the held-out rows depend only on the data and lengths.
  Rows without a completion are dropped unless no row has one (a prompts-only file, which only
  on-policy training can use)."""
  system = config.teacher.get("system_prompt", None) if "teacher" in config else None
  examples = pc.load_examples(config.data.train_path, tokenizer,
                              teacher_system=system if system else None,
                              max_examples=config.data.max_examples or None)
  need_completion = any(len(e.completion) for e in examples)
  lengths = dict(prompt_len=config.data.prompt_len, teacher_prompt_len=config.data.teacher_prompt_len,
                 completion_len=config.data.completion_len)
  ids, stats = pc.fit_examples(examples, need_completion=need_completion, **lengths)
  if not ids:
    raise config_lib.ConfigError(
        f"no row of {config.data.train_path} fits config keys data.prompt_len="
        f"{lengths['prompt_len']} / data.teacher_prompt_len={lengths['teacher_prompt_len']}"
        f"{' with a completion' if need_completion else ''} ({stats}); raise them")
  n_held = int(config.get("distill", {}).get("heldout_rows", 0) or 0)
  if n_held and n_held >= len(ids):
    raise config_lib.ConfigError(
        f"config key distill.heldout_rows={n_held}: only {len(ids)} rows of "
        f"{config.data.train_path} fit the lengths ({stats}); none would be left to train on")
  held = ids[len(ids) - n_held:] if n_held else []
  train = ids[:len(ids) - n_held] if n_held else ids
  stats["heldout_rows"] = len(held)
  return examples, train, held, stats, lengths


def warn_truncated(config, fmt: str, n: int) -> None:
  """Truncated training examples: a setting the user may want to change, said once per
  process (not once per student of a pipeline)."""
  if not n:
    return
  from jaxlab import console  # pylint: disable=g-import-not-at-top
  limit = (f"data.seq_len={config.data.seq_len} and were truncated (data.overlong="
           f"{config.data.get('overlong', 'truncate')!r}; 'drop' leaves them out)")
  if fmt != "packed":
    limit = (f"data.completion_len={config.data.completion_len} in their completions and "
             "were truncated")
  console.warn_once(f"data_truncated:{fmt}", f"{n} training example(s) of "
                    f"{config.data.train_path} were longer than config key {limit}")


def build(config, workdir, fmt: str, tokenizer, ctx, fingerprints: dict, teacher_spec, teacher,
          use_cache: bool) -> RunData:
  """The run's data in format `fmt` (channels.data_format); with `use_cache`, the teacher's
  top-k log-probs of every row (computed once, jaxlab.train.topk_cache) ride in the batches."""
  if fmt == "packed":
    from jaxlab.train.sources import make_batches
    batches, stats = make_batches(config, tokenizer)
    warn_truncated(config, fmt, stats.get("truncated", 0))
    return RunData(batches, stats, {"data_truncated": stats.get("truncated", 0),
                                    "data_dropped": stats.get("dropped", 0)},
                   dict.fromkeys(PACKED_KEYS, 2))
  examples, train_ids, held_ids, stats, lengths = make_prompt_completion_data(config, tokenizer)
  extras = None
  if use_cache:
    path = config.distill.get("topk_path", "") or os.path.join(workdir, "teacher_topk.npz")
    extras = topk_cache.load_or_compute(config, path, examples,
                                        list(train_ids) + list(held_ids), fingerprints,
                                        teacher_spec, teacher, ctx)
    stats["topk_path"] = path
  batches = pc.PromptCompletionBatches(
      examples, train_ids, global_batch_size=config.train.global_batch_size, seed=config.seed,
      pad_id=ctx.pad_id, process_index=jax.process_index(),
      process_count=jax.process_count(), extras=extras, **lengths)
  held_batch = batches.batch_for(np.asarray(held_ids)) if held_ids else None
  warn_truncated(config, fmt, stats["truncated"])
  ndims = {k: v.ndim for k, v in batches.batch_for(np.asarray(train_ids[:1])).items()}
  return RunData(batches, stats, {"data_truncated": stats["truncated"],
                                  "data_dropped": stats["examples_total"] - stats["examples_kept"]},
                 ndims, held_ids, held_batch)
