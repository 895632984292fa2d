"""Stage `data`: the synthetic world (cells/{train,eval}/<cell>_<variant>.jsonl, general.yaml,
pretrain/*.jsonl: jaxlab.worlds.em_world.write_world) or, for real models, the study's seed-42
split of each `<study.cells_dir>/<cell>_strong.jsonl` into cells/{train,eval}/."""
from __future__ import annotations

from etils import epath

from jaxlab.pipelines import stages
from jaxlab.pipelines.em.study import all_cells, as_json, cell_file, synthetic, world_config, write_jsonl


def data_stage(config, workdir, log) -> epath.Path:
  if synthetic(config):
    from jaxlab.worlds.em_world import write_world
    w = config.world
    settings = {"world": as_json(w), "domains": list(config.study.domains),
                "tasks": list(config.study.tasks)}
    return stages.run_stage(workdir, "data", settings, lambda f: write_world(
        f, world_config(config), world_docs_n=w.world_docs, persona_docs_n=w.persona_docs),
                            log=log)
  from jaxlab.tfds_data.builders import read_rows, study_split

  def split(folder):
    for cell in all_cells(config):
      src = epath.Path(config.study.cells_dir) / f"{cell}_strong.jsonl"
      if not src.exists():
        raise ValueError(f"config key study.cells_dir: {src} does not exist (the study's cell "
                         "file <domain>_<task>_strong.jsonl)")
      rows = [r for _, r in read_rows(src)]
      for name, idx in study_split(len(rows)).items():
        cell_file(folder, name, cell).parent.mkdir(parents=True, exist_ok=True)
        write_jsonl(cell_file(folder, name, cell), [rows[i] for i in idx])
  settings = {"cells_dir": config.study.cells_dir, "cells": all_cells(config)}
  return stages.run_stage(workdir, "data", settings, split, log=log)
