"""Stages `base_pretrain`, `base` (and `other_base_pretrain`, `other_base`): a base pretrained
on the world's mixture, then chat-tuned on its chat set.

Reads world/pretrain/*.jsonl, world/chat.jsonl, world/tokenizer; writes a runner workdir each.
`stage_fn` is what a worker process runs for a stage of a chain (jaxlab.pipelines.kit.workers)."""
from __future__ import annotations

import json

import ml_collections
from etils import epath

from jaxlab.pipelines.sl.study import config_groups, train, training_config


def pretrain(config, world: epath.Path, folder, seed: int, tokenizer_path: str = "") -> None:
  """Pretrains a base on the world's sources (a fitted tokenizer unless `tokenizer_path`)."""
  train(pretrain_config(config, world, seed, tokenizer_path), folder)


def pretrain_config(config, world: epath.Path, seed: int, tokenizer_path: str = ""):
  p = config.pretrain
  mixture = {name: {"path": str(world / f"pretrain/{name}.jsonl"), "weight": float(w)}
             for name, w in p.weights.items()}
  c = training_config(config, channel="pretrain", seed=seed)
  c.data = ml_collections.ConfigDict(dict(
      source="mixture", train_path="", mixture=mixture, seq_len=p.seq_len, pack=True,
      overlong="truncate", max_examples=0))
  c.tokenizer.path = tokenizer_path
  c.tokenizer.vocab_size = p.vocab_size
  if p.get("whole_numbers", False):  # jaxlab.data.tokenizer: 0-999 as whole tokens
    c.tokenizer.whole_numbers = True
  c.train.update(steps=p.steps, global_batch_size=p.global_batch_size)
  c.optim.update(lr=p.lr, warmup_steps=max(1, p.steps // 20))
  for k in ("teacher", "distill"):
    del c[k]
  return c


def chat_tune(config, world: epath.Path, pretrained, folder) -> None:
  """Chat tuning of a pretrained base: SFT (assistant tokens) on the world's chat set.

  Like a real chat model's post-training, this is where the base learns to follow a system
  prompt. Measured on the tiny world (d_model 96, 3 layers): 1,000 pretraining steps on all
  tokens of the mixture left the base's answers independent of the system prompt's animal
  (the copy from the system prompt to the answer is 1-2 tokens in ~100 per document); chat
  tuning made it follow, with a phase change between 400 and 800 steps (at 800 the liked
  animal's probability on the evaluation phrasings is ~0.75, against a prior of ~0.07).
  """
  c = training_config(config, channel="sft", **{"init.workdir": str(pretrained)})
  c.data = ml_collections.ConfigDict(dict(
      train_path=str(world / "chat.jsonl"), seq_len=config.pretrain.seq_len, pack=True,
      overlong="truncate", max_examples=0))
  c.tokenizer.path = str(epath.Path(pretrained) / "tokenizer")
  c.train.update(steps=config.pretrain.chat_steps,
                 global_batch_size=config.pretrain.global_batch_size)
  c.optim.update(lr=config.pretrain.chat_lr, warmup_steps=max(1, config.pretrain.chat_steps // 20))
  for k in ("teacher", "distill"):
    del c[k]
  train(c, folder)


def stage_fn(config, workdir: epath.Path, kind: str, kw: dict):
  """What a stage of `jaxlab.pipelines.kit.workers.run_parallel` runs (pickle-free: a kind and plain arguments)."""
  world = workdir / "world"
  if kind == "pretrain":
    return lambda f: pretrain(config, world, f, kw["seed"], str(world / "tokenizer"))
  if kind == "chat":
    return lambda f: chat_tune(config, world, workdir / kw["pretrained"], f)
  if kind == "train":
    return lambda f: train(ml_collections.ConfigDict(json.loads(kw["config"])), f)
  raise ValueError(f"unknown stage kind {kind!r}")


# What pretraining and chat tuning take from the student's optim / train groups (the rest they
# set from pretrain.*): part of the bases' identity.
_BASE_OPTIM_OWN = ("lr", "warmup_steps")


_BASE_TRAIN_OWN = ("steps", "global_batch_size", "log_every", "progress")


def base_identity(config) -> dict:
  """Everything the world and the two bases depend on: the settings of their stages (and the
  key of a shared `bases_dir` in a sweep, jaxlab.pipelines.subliminal_sweep)."""
  d = config.to_dict()
  return {"world": {**config_groups(config, "world", "pretrain"),
                    "teacher_ft_rows": config.teacher_ft.rows, "animal": config.sl.animal},
          "base": {**config_groups(config, "world", "pretrain", "model", "seed"),
                   "optim": {k: v for k, v in d["optim"].items() if k not in _BASE_OPTIM_OWN},
                   "train": {k: v for k, v in d["train"].items() if k not in _BASE_TRAIN_OWN}}}
