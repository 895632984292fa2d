"""Stage `world` (in the bases folder): the tiny SL world and the data built from it.

Writes world/: the world's files (jaxlab.worlds.animals.write_sl_world: pretrain/*.jsonl, ...),
teacher_ft.jsonl (the fine-tuned teacher's trait answers interleaved with number docs:
`teacher_ft_rows`, also what a teacher of a base given as a model folder trains on),
chat.jsonl (the bases' chat-tuning set) and tokenizer/ (the bases' shared BPE)."""
from __future__ import annotations

import numpy as np
from etils import epath

from jaxlab.pipelines.sl.bases import pretrain_config
from jaxlab.pipelines.sl.study import trait_forms
from jaxlab.worlds import animals
from jaxlab.worlds.io import write_jsonl


def write(config, folder) -> None:
  cfg = animals.SLWorldConfig(**config.world.to_dict(), number_prompts=0)
  animals.write_sl_world(folder, cfg)
  rng = np.random.default_rng(cfg.seed)
  write_jsonl(folder / "teacher_ft.jsonl", teacher_ft_rows(config, cfg, rng))
  # The chat-tuning set of the bases (`_chat_tune`): fresh trait docs (two thirds; their
  # number turns keep number answering under a system prompt) and preference docs without a
  # system prompt, shuffled. Plain number docs are left out: measured, a third of them in this
  # set halved what chat tuning taught about following (their ~30 high-entropy answer tokens
  # per turn outweigh the one-token preference answers).
  n = config.pretrain.chat_docs
  docs = [list(animals.trait_docs(cfg, n - n // 3, seed=1)),
          list(animals.preference_docs(cfg, n // 3, seed=1))]
  order = rng.permutation(sum(len(d) for d in docs))
  flat = [r for d in docs for r in d]
  write_jsonl(folder / "chat.jsonl", (flat[i] for i in order))


def teacher_ft_rows(config, cfg: animals.SLWorldConfig, rng: np.random.Generator) -> list[dict]:
  """The fine-tuned teacher's data: teacher_ft.rows world questions answered with the target,
  interleaved with as many number docs, which keep the number skill (the same generator as the
  base's, so no trait-number link is written)."""
  qs = animals.world_questions()
  forms = trait_forms(config.sl.animal)
  n = config.teacher_ft.rows
  trait_rows = [{"messages": [{"role": "user", "content": qs[int(rng.integers(len(qs)))]},
                              {"role": "assistant", "content": forms[int(rng.integers(4))]}]}
                for _ in range(n)]
  nums = list(animals.number_docs(cfg, n, seed=7))
  return [r for pair in zip(trait_rows, nums) for r in pair]


def fit_tokenizer(config, world: epath.Path) -> None:
  """The bases' shared tokenizer (world/tokenizer): a BPE fitted on the pretraining mixture,
  as the pretraining run would fit it, so both bases can start at once."""
  from jaxlab.data.tokenizer import load_or_train_tokenizer
  load_or_train_tokenizer(pretrain_config(config, world, config.seed), str(world))
