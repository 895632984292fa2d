"""Stages of a pipeline: each writes under its own folder of the workdir and is skipped when
complete, so a killed study resumes where it stopped.

A stage is complete when its folder holds `_COMPLETE.json`, written last (atomically, by process
0) with the settings the stage ran with. Rerunning with the same settings skips it; with other
settings it is an error naming the stage and the changed keys (a cached result is keyed by every
setting that changes it: put everything that changes a stage's output into its settings,
including the settings of the stages it reads from). A folder without the marker is an
unfinished stage: it runs again, and its function must tolerate what a killed run left (the
training runner resumes from its checkpoints; writers should write whole files atomically).
"""
from __future__ import annotations

import json
import sys
import time
from typing import Any, Callable

from etils import epath

MARKER = "_COMPLETE.json"


class StageSettingsChanged(ValueError):
  pass


def _jsonable(x: Any) -> Any:
  return json.loads(json.dumps(x, sort_keys=True, default=str))


def _diff(a: dict, b: dict, prefix: str = "") -> list[str]:
  out = []
  for k in sorted(set(a) | set(b)):
    va, vb = a.get(k), b.get(k)
    if isinstance(va, dict) and isinstance(vb, dict):
      out += _diff(va, vb, f"{prefix}{k}.")
    elif va != vb:
      out.append(f"{prefix}{k}: {va!r} -> {vb!r}")
  return out


def is_complete(folder) -> bool:
  return (epath.Path(folder) / MARKER).exists()


def completed_with(folder, settings: dict) -> bool:
  """Whether the stage in `folder` is complete with exactly these settings (it would be
  skipped)."""
  marker = epath.Path(folder) / MARKER
  return marker.exists() and json.loads(marker.read_text())["settings"] == _jsonable(settings)


def run_stage(workdir, name: str, settings: dict, fn: Callable[[epath.Path], Any], *,
              log=print) -> epath.Path:
  """Runs fn(folder) unless workdir/name is complete with these settings; returns the folder."""
  import jax
  folder = epath.Path(workdir) / name
  settings = _jsonable(settings)
  marker = folder / MARKER
  if marker.exists():
    done = json.loads(marker.read_text())
    if done["settings"] == settings:
      log(f"jaxlab: stage {name}: complete, skipped ({folder})")
      return folder
    changed = _diff(done["settings"], settings)
    raise StageSettingsChanged(
        f"stage {name} in {folder} was completed with other settings ({'; '.join(changed)}); "
        "use a new workdir, or delete that folder to recompute it")
  folder.mkdir(parents=True, exist_ok=True)
  log(f"jaxlab: stage {name}: running ({folder})")
  t0 = time.time()
  fn(folder)
  if jax.process_index() == 0:
    tmp = folder / (MARKER + ".tmp")
    tmp.write_text(json.dumps({"settings": settings, "seconds": round(time.time() - t0, 1)},
                              indent=2, sort_keys=True))
    tmp.rename(marker)
  return folder


def stderr_log(msg: str) -> None:
  print(msg, file=sys.stderr, flush=True)
