"""Stages `seed{S}/drift/{SOURCE}` and `seed{S}/absorbed/{STUDENT}`: mean per-token KLs on a
source's held-out numbers (its data stage's spare_rows.jsonl: accepted, never trained on).

drift:    KL(source in its context || base), written to drift.json
absorbed: KL(teacher in its context || student), written to absorbed.json"""
from __future__ import annotations

import json

from etils import epath

from jaxlab.pipelines.sl.number_data import SPARE
from jaxlab.pipelines.sl.study import teacher_source
from jaxlab.worlds.io import write_json


def _read_rows(path, n: int) -> list[dict]:
  return [json.loads(line) for line in epath.Path(path).read_text().splitlines()[:n]]


def _held_out(config, rows_path) -> tuple[list[dict], str]:
  """The first sl.drift_rows accepted-but-not-kept rows of a data stage (no student saw them)."""
  path = epath.Path(rows_path).parent / SPARE
  rows = _read_rows(path, config.sl.drift_rows)
  if not rows:
    raise ValueError(f"{path}: no accepted answers beyond the sl.n_keep={config.sl.n_keep} "
                     "kept ones to score drift on; raise config key sl.n_prompts")
  return rows, str(path)


def drift(config, models, source: str, paths: dict, data: dict, students: dict,
           folder) -> None:
  """Mean per-token KL(source in its context || base) on the source's held-out numbers."""
  if source in ("other_base", "control"):
    path, system = (paths["other_base"] if source == "other_base" else str(students[source])), ""
    rows = data["base"]
  else:
    (path, system), rows = teacher_source(config, source, paths), data[source]
  held, rows = _held_out(config, rows)
  kl = models.kl(path, system, paths["base"], held, config.sl.eval_batch)
  write_json(folder / "drift.json", {"kl_per_token": kl, "teacher": path, "system_prompt": system,
                                     "rows": rows, "n_rows": len(held)})


def absorbed(config, models, student_path: str, teacher: str, paths: dict, data: dict,
              folder) -> None:
  """KL(teacher in its context || student) on the teacher's held-out numbers (the rows the
  drift stage scores, accepted but not kept: no student trained on them). 1 - this / the
  teacher's drift is the share of the teacher's number KL the student absorbed."""
  (path, system), rows = teacher_source(config, teacher, paths), data[teacher]
  held, rows = _held_out(config, rows)
  kl = models.kl(path, system, student_path, held, config.sl.eval_batch)
  write_json(folder / "absorbed.json", {"kl_teacher_student": kl, "teacher": path,
                                        "system_prompt": system, "rows": rows,
                                        "n_rows": len(held)})
