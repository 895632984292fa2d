"""What an sft_eval config asks for: a training run (the config itself, any channel the runner
trains), its base, and the evaluation config that measures the trained model beside it (no
files are read or written here)."""
from __future__ import annotations

import ml_collections
from etils import epath

from jaxlab.pipelines.kit import configs as kit_configs

PIPELINE_KEYS = ("evaluation", "eval", "eval_base")
TRAINED = "tuned"  # the trained model's name in the evaluation


def training_config(config) -> ml_collections.ConfigDict:
  """The runner's config: the pipeline's keys left out, job "train"."""
  return kit_configs.training_config(config, PIPELINE_KEYS)


def base_path(config) -> str:
  return config.init.hf_path or config.init.get("workdir", "")


def eval_config(config, workdir) -> ml_collections.ConfigDict:
  """The evaluation config: `evaluation` with the `eval` overrides, naming the base (with
  eval_base) and the trained model (the train stage's folder), sampled from config.seed."""
  models = [("base", base_path(config))] if config.eval_base and base_path(config) else []
  models.append((TRAINED, str(epath.Path(workdir) / "train")))
  c = kit_configs.eval_config(config.evaluation, models, config.seed, key="evaluation")
  kit_configs.override(c, config.eval.to_dict(), key="eval", source=config.evaluation)
  if not c.tokenizer.path:  # the evaluated models read the training run's tokenizer
    c.tokenizer.path = config.tokenizer.path or config.init.hf_path
  return c


def validate(config, workdir) -> None:
  """The pipeline's keys, checked before anything runs (errors name the key)."""
  if not config.get("evaluation"):
    raise ValueError("config key evaluation is empty: name the eval config that measures the "
                     "trained model (e.g. configs/eval_em.py:first_plot)")
  if config.eval_base and not base_path(config):
    raise ValueError("config key eval_base=True: the run starts from no model "
                     "(init.hf_path / init.workdir are empty); set eval_base=False")
  from jaxlab.evals import run as evals_run
  evals_run.model_list(eval_config(config, workdir))  # names, overrides and the spec load
