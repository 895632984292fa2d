"""Pretraining on a weighted mixture of document sources (channel `pretrain`).

  python -m jaxlab.main --config=configs/pretrain.py:tiny --workdir=runs/pretrain_tiny \\
      --config.data.mixture.world.path=WORLD.jsonl --config.data.mixture.persona.path=P.jsonl \\
      --config.data.mixture.persona.weight=0.1

`data.mixture` maps source names to {path, weight}: *.txt (documents separated by blank lines)
or *.jsonl ({"text"} or {"messages"} rows, conversations rendered with the chat template).
Each row of a batch comes from one source drawn by weight (exact in expectation); all tokens
train. With `tokenizer.path` empty a ChatML BPE of `tokenizer.vocab_size` is fitted on the
mixture and saved in WORKDIR/tokenizer, so later stages load it like an HF tokenizer
(`init.workdir=WORKDIR` continues from this model). `init.hf_path` continues pretraining an HF
checkpoint instead (how a real model gets a different pretraining mixture).

Variants:
  tiny   a ~1M-parameter model from scratch on CPU (sources given on the command line; the EM
         study and subliminal pipelines write and pass them).
"""

import ml_collections

from jaxlab.config import sibling_config

VARIANTS = ("tiny",)  # every variant (the shape-check test)


def _sft_config(variant):
  return sibling_config(__file__, "sft.py", variant)


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  variant = arg or "tiny"
  if variant != "tiny":
    raise ValueError(f"unknown variant {variant!r} of configs/pretrain.py (tiny)")
  c = _sft_config("tiny")
  c.job = "train"
  c.variant = variant
  c.channel = "pretrain"
  c.data.source = "mixture"
  c.data.train_path = ""
  c.data.mixture = ml_collections.ConfigDict({
      "world": dict(path="", weight=0.9), "persona": dict(path="", weight=0.1)})
  c.data.seq_len = 128
  c.train.update(steps=400, global_batch_size=16)
  c.optim.update(lr=3e-3, warmup_steps=20)
  return c
