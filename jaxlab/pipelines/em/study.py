"""What an EM study config asks for: its bases, cells and fine-tunes, and where a cell's files
are (no files are read or written here but `write_jsonl`'s)."""
from __future__ import annotations

import dataclasses
import json

import ml_collections
from etils import epath

from jaxlab.pipelines import stages
from jaxlab.pipelines.kit import configs as kit_configs


STUDY_KEYS = ("study", "world", "pretrain", "eval", "cells")
LABELS = ("aligned", "harmful", "incoherent")


@dataclasses.dataclass(frozen=True)
class Base:
  seed: int
  share: float  # persona share of the pretraining mixture (None-like for a real base: 0)

  @property
  def name(self) -> str:
    return f"seed{self.seed}_persona{self.share:g}"



@dataclasses.dataclass(frozen=True)
class FineTune:
  base: Base
  cell: str
  steps: int
  lr_scale: float
  lr: float

  @property
  def name(self) -> str:
    return f"{self.cell}__steps{self.steps}_lrx{self.lr_scale:g}"

  @property
  def strength(self) -> str:
    return f"steps{self.steps}_lrx{self.lr_scale:g}"


def all_cells(config) -> list[str]:
  return [f"{d}_{t}" for d in config.study.domains for t in config.study.tasks]


def split_cell(config, cell: str) -> tuple[str, str]:
  """(domain, task) of a cell name; domains may not contain the task separator ambiguity."""
  for d in config.study.domains:
    for t in config.study.tasks:
      if cell == f"{d}_{t}":
        return d, t
  raise ValueError(f"unknown cell {cell!r}; cells are {all_cells(config)}")


def selected_cells(config) -> list[str]:
  """The training cells of this invocation: config key `cells` (comma-separated or a tuple)."""
  raw = config.get("cells", "")
  names = [c.strip() for c in (raw.split(",") if isinstance(raw, str) else raw) if c.strip()]
  unknown = [c for c in names if c not in all_cells(config)]
  if unknown:
    raise ValueError(f"config key cells: unknown cell(s) {unknown}; known: {all_cells(config)}")
  return names or all_cells(config)


def synthetic(config) -> bool:
  return bool(config.pretrain.enabled)


def bases(config) -> list[Base]:
  shares = config.study.persona_shares if synthetic(config) else (0.0,)
  return [Base(int(s), float(p)) for s in config.study.seeds for p in shares]


def finetunes(config, base: Base, cells=None) -> list[FineTune]:
  out = []
  for cell in cells or all_cells(config):
    _, task = split_cell(config, cell)
    lr = float(config.study.lr_by_task.get(task, config.optim.lr))
    for steps in config.study.steps:
      for scale in config.study.lr_scales:
        out.append(FineTune(base, cell, int(steps or config.train.steps), float(scale),
                            lr * float(scale)))
  return out


def validate(config) -> None:
  """Checks the study keys before anything runs (errors name the config key)."""
  s = config.study
  if s.finetune not in ("lora", "full"):
    raise ValueError(f"config key study.finetune={s.finetune!r}: expected 'lora' or 'full'")
  for key in ("seeds", "steps", "lr_scales"):
    if not tuple(s[key]):
      raise ValueError(f"config key study.{key} is empty")
  if any(not 0 <= float(p) <= 1 for p in s.persona_shares):
    raise ValueError(f"config key study.persona_shares={tuple(s.persona_shares)}: shares in [0, 1]")
  from jaxlab.worlds.em_world import TASKS
  unknown = set(s.lr_by_task) - set(TASKS)
  if unknown:
    raise ValueError(f"config key study.lr_by_task: unknown task(s) {sorted(unknown)} "
                     f"(known: {list(TASKS)})")
  kind = config.eval.judge.kind
  if kind not in ("world", "http", "local"):
    raise ValueError(f"config key eval.judge.kind={kind!r}: expected world, http or local")
  if synthetic(config) != (kind == "world"):
    raise ValueError("config keys pretrain.enabled and eval.judge.kind: the synthetic world "
                     "(pretrain.enabled=True) is judged by its rule judge (kind 'world'), real "
                     "data by a text judge (http or local)")
  if not synthetic(config):
    if not config.init.hf_path:
      raise ValueError("config key init.hf_path is empty: the base model (an HF folder)")
    for key in ("cells_dir", "general_path"):
      if not s[key]:
        raise ValueError(f"config key study.{key} is empty (a local copy of the study's files)")
    for key in ("judge_prompts", "narrow_judge_prompts"):
      if not config.eval[key]:
        raise ValueError(f"config key eval.{key} is empty: the study's judge prompts (YAML)")
  selected_cells(config)


def training_config(config) -> ml_collections.ConfigDict:
  """The config without the study's own groups: what jaxlab.train.runner.run reads."""
  return kit_configs.training_config(config, STUDY_KEYS)


def cell_file(data: epath.Path, split: str, cell: str) -> epath.Path:
  return data / "cells" / split / f"{cell}_strong.jsonl"


def world_config(config):
  from jaxlab.worlds.em_world import WorldConfig
  w = config.world
  return WorldConfig(domains=tuple(config.study.domains), tasks=tuple(config.study.tasks),
                     general_domains=tuple(w.general_domains or config.study.domains),
                     train_per_cell=w.train_per_cell, eval_per_cell=w.eval_per_cell,
                     general_per_task_surface=w.general_per_task_surface, seed=w.seed)


def as_json(config_dict) -> dict:
  return json.loads(config_dict.to_json_best_effort())


def reads(key: str, model_path: str) -> dict:
  """{key: fingerprint} of a model folder (stages.model_digest: a base recomputed in place then
  changes its readers' settings); {} for a folder without one (an HF checkpoint)."""
  digest = stages.model_digest(model_path)
  return {key: digest} if digest else {}


def eval_settings(config) -> dict:
  e = as_json(config.eval)
  e.pop("n_boot", None)
  return {"eval": e, "seeds": list(config.study.seeds)}


def eval_folders(config, wd: epath.Path) -> list[epath.Path]:
  out = []
  for base in bases(config):
    if config.eval.eval_base:
      out.append(wd / "evals" / base.name / "base")
    out += [wd / "evals" / base.name / ft.name for ft in finetunes(config, base)]
  return out


def write_jsonl(path: epath.Path, rows) -> None:
  """Whole file at once, renamed into place (a killed stage leaves no half file)."""
  tmp = epath.Path(str(path) + ".tmp")
  tmp.write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in rows))
  tmp.rename(path)
