"""Where a packed-batch channel's rows come from (config.data): the one place a new source plugs in.

Here in train/, above both jaxlab.data (chat JSONL, mixtures) and jaxlab.tfds_data (TFDS + grain,
built on jaxlab.data), so neither package imports the other back.

`make_batches(config, tokenizer)` returns (batches, stats): an iterator of this host's batch
rows with `get_state()` / `set_state(dict)` (saved in checkpoints), and a JSON-serialisable dict
of what loading did (counts of examples kept / truncated / dropped), written to data_stats.json.
"""
from __future__ import annotations

import jax

from jaxlab.data.batching import SFTBatches, load_sft_examples
from jaxlab.data.chat import pad_id


def make_batches(config, tokenizer):
  """Chat JSONL (`data.train_path`) -> packed or padded SFT batches (assistant-token loss)."""
  if config.data.get("source", "jsonl") == "mixture":  # pretraining (jaxlab.data.mixture)
    from jaxlab.data.mixture import MixtureBatches
    batches = MixtureBatches(config.data.mixture.to_dict(), tokenizer,
                             global_batch_size=config.train.global_batch_size,
                             seq_len=config.data.seq_len, seed=config.seed,
                             process_index=jax.process_index(),
                             process_count=jax.process_count(),
                             document_masking=config.data.get("document_masking", True))
    return batches, batches.stats
  if config.data.get("source", "jsonl") == "tfds":  # streamed TFDS + grain (jaxlab.tfds_data)
    from jaxlab.tfds_data.loader import batches_from_config
    return batches_from_config(config, tokenizer)
  examples, stats = load_sft_examples(config.data.train_path, tokenizer,
                                      seq_len=config.data.seq_len, overlong=config.data.overlong,
                                      max_examples=config.data.max_examples or None)
  return SFTBatches(examples, global_batch_size=config.train.global_batch_size,
                    seq_len=config.data.seq_len, pack=config.data.pack, seed=config.seed,
                    overlong=config.data.overlong, pad_id=pad_id(tokenizer),
                    process_index=jax.process_index(),
                    process_count=jax.process_count()), stats
