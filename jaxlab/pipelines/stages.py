"""Stages of a pipeline: each writes under its own folder of the workdir and is skipped when
complete, so a killed study resumes where it stopped.

A stage is complete when its folder holds `_COMPLETE.json`, written last (atomically, by process
0) with the settings the stage ran with. Rerunning with the same settings skips it; with other
settings it is an error naming the stage and the changed keys (a cached result is keyed by every
setting that changes it: put everything that changes a stage's output into its settings,
including the settings of the stages it reads from). A folder without the marker is an
unfinished stage: it runs again, and its function must tolerate what a killed run left (the
training runner resumes from its checkpoints; writers should write whole files atomically).

The marker also records a content fingerprint of every file the stage wrote (`outputs`;
checkpoints by the per-array checksums each carries). A complete stage is verified each time
it would be skipped: a file edited, truncated or removed since is an error naming it, so a
later stage never reads damaged outputs beside results made from the intact ones. A stage
that reads another's outputs can put `output_digest(folder)` (or `model_digest(path)` for any
model folder) into its settings: a stage recomputed in place with other outputs (a teacher
retrained) is then a changed setting.
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


class StageOutputsChanged(ValueError):
  pass


def _is_recorded(rel: str) -> bool:
  """Whether a stage's output digests include this file: all files but checkpoint contents
  other than each checkpoint's per-array checksum record (which stands for its arrays)."""
  parts = rel.split("/")
  return "checkpoints" not in parts[:-1] or "fingerprint" in parts


def outputs(folder) -> dict[str, str]:
  """{relative path: sha256[:16]} of the files in a stage folder, but the marker, folders of
  other stages, and checkpoint arrays (their checksum records stand for them)."""
  from jaxlab.fingerprint import file_digest  # pylint: disable=g-import-not-at-top
  folder = epath.Path(folder)
  out = {}

  def walk(d: epath.Path, prefix: str) -> None:
    for p in sorted(d.iterdir(), key=lambda p: p.name):
      rel = prefix + p.name
      if p.is_dir():
        if not (p / MARKER).exists():
          walk(p, rel + "/")
      elif not p.name.startswith(MARKER) and _is_recorded(rel):
        out[rel] = file_digest(p)["sha256"][:16]
  walk(folder, "")
  return out


def output_digest(folder) -> str | None:
  """One fingerprint of a complete stage's recorded outputs (None: not complete, or completed
  by a jaxlab that recorded none)."""
  import hashlib  # pylint: disable=g-import-not-at-top
  marker = epath.Path(folder) / MARKER
  if not marker.exists():
    return None
  recorded = json.loads(marker.read_text()).get("outputs")
  if recorded is None:
    return None
  return hashlib.sha256(json.dumps(recorded, sort_keys=True).encode()).hexdigest()[:16]


def model_digest(path) -> str | None:
  """A model folder's content fingerprint when one is cheap: a steered model's (its steer.json,
  direction and its base's fingerprint or path: jaxlab.models.steering.digest), a stage's
  output digest, else a jaxlab workdir's newest checkpoint checksum record (every weight's
  bits); None for other folders (an HF checkpoint is identified by its path)."""
  import hashlib  # pylint: disable=g-import-not-at-top
  if (epath.Path(path) / "steer.json").exists():  # before a stage's digest: it covers the base
    from jaxlab.models import steering  # pylint: disable=g-import-not-at-top
    return steering.digest(path)
  digest = output_digest(path)
  if digest is not None:
    return digest
  ckpts = epath.Path(path) / "checkpoints"
  steps = sorted(int(p.name) for p in ckpts.iterdir() if p.name.isdigit()) \
      if ckpts.exists() else []
  record = ckpts / str(steps[-1]) / "fingerprint" / "metadata" if steps else None
  if record is None or not record.exists():
    return None
  return hashlib.sha256(record.read_bytes()).hexdigest()[:16]


def verify_outputs(folder, name: str = "") -> None:
  """Raises StageOutputsChanged naming the first recorded output of a complete stage that is
  missing or whose contents changed."""
  folder = epath.Path(folder)
  recorded = json.loads((folder / MARKER).read_text()).get("outputs")
  if recorded is None:
    return
  now = outputs(folder)
  changed = [f for f in sorted(recorded) if now.get(f) != recorded[f]]
  if changed:
    f = changed[0]
    state = f"fingerprint {recorded[f]} -> {now[f]}" if f in now else "missing"
    raise StageOutputsChanged(
        f"stage {name or folder.name}: {folder / f} changed since the stage completed ({state}"
        f"{'; %d more file(s) changed' % (len(changed) - 1) if len(changed) > 1 else ''}); "
        f"its results would mix with ones made from the original. Delete {folder} to "
        "recompute the stage (and the stages that read it)")


def _jsonable(x: Any) -> Any:
  return json.loads(json.dumps(x, sort_keys=True, default=str))


def _diff(a: dict, b: dict, prefix: str = "") -> list[str]:
  out = []
  for k in sorted(set(a) | set(b)):
    va, vb = a.get(k, "<absent>"), b.get(k, "<absent>")
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
      verify_outputs(folder, name)
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
    tmp.write_text(json.dumps({"settings": settings, "seconds": round(time.time() - t0, 1),
                               "outputs": outputs(folder)}, indent=2, sort_keys=True))
    tmp.rename(marker)
  return folder


def stderr_log(msg: str) -> None:
  print(msg, file=sys.stderr, flush=True)
