"""Stage `train`: the training runner's workdir (checkpoints, metrics.jsonl, config.json),
trained from the base (init.hf_path / init.workdir) on data.train_path."""
from __future__ import annotations

from etils import epath

from jaxlab.pipelines import stages
from jaxlab.pipelines.sft.study import base_path, training_config


def settings(train) -> dict:
  """What changes the trained model: the runner config but its logging and checkpointing."""
  d = train.to_dict()
  d.pop("checkpoint", None)
  d["train"] = {k: v for k, v in d["train"].items() if k not in ("log_every", "progress")}
  return d


def train_stage(config, workdir, log) -> epath.Path:
  from jaxlab.train import runner
  c = training_config(config)
  return stages.run_stage(workdir, "train", {"training": settings(c),
                                             **stages.reads(init=base_path(config))},
                          lambda f: runner.run(c, str(f)), log=log)
