"""Stages `bases/<base>` (pretraining on world + persona documents, synthetic only) and
`finetunes/<base>/<ft>` (one runner workdir per training cell, steps and lr scale; reads the
cell's data/cells/train/<cell>_strong.jsonl and the base)."""
from __future__ import annotations

import ml_collections
from etils import epath

from jaxlab.pipelines import stages
from jaxlab.pipelines.em.study import (Base, FineTune, as_json, cell_file, reads, synthetic,
                                       training_config)


def pretrain_config(config, base: Base, data: epath.Path) -> ml_collections.ConfigDict:
  p = config.pretrain
  c = training_config(config)
  with c.unlocked():
    c.channel = "pretrain"
    c.data.update(source="mixture", train_path="", seq_len=p.seq_len)
    c.data.mixture = ml_collections.ConfigDict({
        "world": dict(path=str(data / "pretrain/world.jsonl"), weight=1.0 - base.share),
        "persona": dict(path=str(data / "pretrain/persona.jsonl"), weight=base.share)})
  c.seed = base.seed
  c.train.update(steps=p.steps, global_batch_size=p.global_batch_size)
  c.optim.update(lr=p.lr, warmup_steps=p.warmup_steps, decay="cosine", end_ratio=0.1)
  c.model.lora.enabled = False
  return c


def finetune_config(config, ft: FineTune, data: epath.Path, base_dir) -> ml_collections.ConfigDict:
  c = training_config(config)
  c.seed = ft.base.seed
  c.data.train_path = str(cell_file(data, "train", ft.cell))
  if synthetic(config):
    c.init.workdir = str(base_dir)
  c.model.lora.enabled = config.study.finetune == "lora"
  c.train.steps = ft.steps
  c.optim.lr = ft.lr
  return c


def base_stage(config, workdir, base: Base, data: epath.Path, log) -> str:
  """The base model's path: a pretrained runner workdir (synthetic) or init.hf_path."""
  if not synthetic(config):
    return config.init.hf_path
  from jaxlab.train import runner
  c = pretrain_config(config, base, data)
  return str(stages.run_stage(workdir, f"bases/{base.name}", as_json(c),
                              lambda f: runner.run(c, str(f)), log=log))


def finetune_stage(config, workdir, ft: FineTune, data, base_path: str, log) -> str:
  from jaxlab.train import runner
  c = finetune_config(config, ft, data, base_path)
  # A base recomputed in place with other weights is another base: a changed setting.
  settings = {**as_json(c), **reads("base_outputs", base_path)}
  return str(stages.run_stage(workdir, f"finetunes/{ft.base.name}/{ft.name}", settings,
                              lambda f: runner.run(c, str(f)), log=log))
