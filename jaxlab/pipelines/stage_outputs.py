"""What a complete stage wrote, by content (jaxlab.pipelines.stages): the fingerprints its
marker records, checked before the stage is skipped, and the digests other stages put in
their settings to name what they read (a stage recomputed in place with other outputs is then
a changed setting).

Reads: a stage folder's files (checkpoint arrays through their checksum records) and its
`_COMPLETE.json`. Writes nothing.
"""
from __future__ import annotations

import json

from etils import epath

MARKER = "_COMPLETE.json"


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
  direction and its base's fingerprint or path: steered_digest), a stage's
  output digest, else a jaxlab workdir's newest checkpoint checksum record (every weight's
  bits); None for other folders (an HF checkpoint is identified by its path)."""
  import hashlib  # pylint: disable=g-import-not-at-top
  if (epath.Path(path) / "steer.json").exists():  # before a stage's digest: it covers the base
    return steered_digest(path)
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



def reads(**models) -> dict:
  """{"reads": {role: fingerprint}} of the models (and data folders) a stage reads
  (`model_digest`: stage outputs, or a workdir's newest checkpoint checksums): one recomputed
  in place with other contents is then a changed setting of every stage that read it.
  Folders without a cheap fingerprint (an HF checkpoint) are left out and identified by path
  (a student still records its teacher's weights, jaxlab.train.inputs); paths that do not
  exist yet are left out too, so adding a teacher or a cell changes no other stage."""
  out = {k: model_digest(m) if m else None for k, m in models.items()}
  return {"reads": {k: v for k, v in sorted(out.items()) if v is not None}}


def steered_digest(path) -> str:
  """Content fingerprint of a steered folder (jaxlab.models.steering): steer.json, the direction
  file and the base's model_digest (an HF base is identified by its path, in steer.json)."""
  import hashlib  # pylint: disable=g-import-not-at-top
  from jaxlab.fingerprint import file_digest  # pylint: disable=g-import-not-at-top
  from jaxlab.models import steering  # pylint: disable=g-import-not-at-top
  s = steering.read_steer(path)
  parts = {"steer": file_digest(s["file"])["sha256"],
           "direction": file_digest(s["direction_file"])["sha256"],
           "base": model_digest(s["base"])}
  return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]

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
