"""What a training run read, by content: fingerprints of its data files, tokenizer and teacher.

They are saved in the run's config (key `inputs`, nested by config key: `inputs.data.train_path`,
`inputs.teacher.path`, `inputs.tokenizer`; in config.json and every checkpoint). A
resumed or rerun workdir whose inputs changed is refused, naming the file (or model) and both
fingerprints, unless `resume.allow_changes` names its config key: a run that trained on one
version of a file and resumes on another is a result about neither.
"""
from __future__ import annotations

from jaxlab import config as config_lib
from jaxlab import fingerprint


def data_files(config) -> dict[str, str]:
  """{config key: path} of the data files the run reads (TFDS sources carry their own checksums)."""
  source = config.data.get("source", "jsonl")
  if source == "mixture":
    return {f"data.mixture.{n}.path": config.data.mixture[n].path
            for n in sorted(config.data.mixture)}
  if source == "tfds":
    return {}
  return {"data.train_path": config.data.train_path}


def data_fingerprints(config) -> dict[str, str]:
  return {k: fingerprint.file_digest(p)["sha256"][:16] for k, p in data_files(config).items()}


def nested(flat: dict[str, str]) -> dict:
  """{"data.train_path": x} -> {"data": {"train_path": x}} (config keys hold no dots)."""
  out: dict = {}
  for key, value in flat.items():
    *groups, leaf = key.split(".")
    node = out
    for g in groups:
      node = node.setdefault(g, {})
    node[leaf] = value
  return out


def flat(tree: dict, prefix: str = "") -> dict[str, str]:
  out = {}
  for k, v in tree.items():
    out.update(flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
  return out


def check(saved_config: dict | None, now: dict[str, str], config, where: str) -> None:
  """Raises ConfigError for each input in both `saved_config["inputs"]` and `now` whose
  fingerprint differs, unless resume.allow_changes names its key."""
  before = flat(dict((saved_config or {}).get("inputs") or {}))
  allowed = {a.strip() for a in str(config.get("resume", {}).get("allow_changes", "") or "")
             .split(",") if a.strip()}
  changed = [k for k in sorted(now) if k in before and before[k] != now[k] and k not in allowed]
  if not changed:
    return
  what = {**data_files(config), "teacher.path": config.get("teacher", {}).get("path", ""),
          "tokenizer": config.tokenizer.get("path", "") or "the run's tokenizer"}
  lines = [f"{k} ({what.get(k) or k}): fingerprint {before[k]} -> {now[k]}" for k in changed]
  raise config_lib.ConfigError(
      f"{where} was trained on other inputs; resuming would mix them:\n  " + "\n  ".join(lines)
      + "\nStart a new workdir, or accept the new contents with "
      f"--config.resume.allow_changes={','.join(changed)}")
