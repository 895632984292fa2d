"""A run's ending (the runner's "export" step): the merged model written to export.hf_dir, and
the config.json of a finished workdir mended from its last checkpoint."""
from __future__ import annotations

import json
import os
import sys

from jaxlab import paths


def export(config, workdir, cfg, state) -> None:
  """Writes the merged model to export.hf_dir (every process calls it; process 0 writes)."""
  from jaxlab.models.hf import export_hf
  from jaxlab.models.params import merge_lora
  export_hf(config.export.hf_dir, cfg, merge_lora(state.params, state.frozen, cfg),
            tokenizer_dir=config.tokenizer.path or config.init.hf_path
            or os.path.join(workdir, "tokenizer"), dtype=config.export.dtype)


def export_done(config) -> bool:
  d = paths.path(config.export.hf_dir)
  return (d / "config.json").exists() and (d / "model.safetensors.index.json").exists()


def mend_config_json(workdir, saved: dict) -> None:
  """A finished workdir's config.json that is missing or not valid JSON (a truncated copy, an
  edit) is rewritten from the config saved in its last checkpoint, and the user is told."""
  file = paths.path(workdir, "config.json")
  text = paths.read_text(file)
  try:
    if text is not None and isinstance(json.loads(text), dict):
      return
  except json.JSONDecodeError:
    pass
  paths.write_text(file, json.dumps(saved, indent=2))
  if paths.is_writer():
    print(f"jaxlab: {file} was {'missing' if text is None else 'damaged (not valid JSON)'}; "
          "rewritten from the config saved in the last checkpoint", file=sys.stderr)
