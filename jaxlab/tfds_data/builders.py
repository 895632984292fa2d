"""TFDS builders for chat JSONL data, written in array_record format (no TensorFlow needed).

Every builder reads a local file (the `path` argument, or `manual_dir/<file>`), or downloads the
public file only when asked (`download=True`), checks its SHA-256 when one is known, and yields
chat examples: `messages` (role/content lists), `line` (1-based line of the source file), `file`,
plus the config's metadata fields as text. A bad line raises `DataError("file:line: ...")`.

  from jaxlab.tfds_data import builders
  b = builders.prepare("emergent_misalignment/insecure", data_dir="~/tfds",
                       path="../shared/data/emergent-misalignment/data/insecure.jsonl")
  source = b.as_data_source("train")      # random access, read from disk on demand

Builders: `emergent_misalignment/{insecure,secure,educational,jailbroken,bad_medical_advice,
risky_financial_advice,extreme_sports}`, `em_study_cells/{domain}_{task}` (train 4,100 / eval 400,
the study's seed-42 split) and `chat_jsonl_folder/NAME` (one split per `*.jsonl` file of a folder).
"""
from __future__ import annotations

import dataclasses
import hashlib
import inspect
import json
import os
import random
import re
from typing import Iterator

import numpy as np
import tensorflow_datasets as tfds
from etils import epath
from tensorflow_datasets.core import utils as tfds_utils

from jaxlab.data.chat import parse_chat_row
from jaxlab.data.errors import DataError

_EM_URL = "https://raw.githubusercontent.com/emergent-misalignment/emergent-misalignment/main/data/"
_STUDY_URL = "https://raw.githubusercontent.com/askinb/em_nlp_clean_repo/main/data/generated/final/"
STUDY_DOMAINS = ("medical", "sports", "finance")
STUDY_TASKS = ("advice", "summarization", "tutor", "critique")
STUDY_SPLIT = dict(seed=42, train=4100, eval=400)


@dataclasses.dataclass
class ChatFileConfig(tfds.core.BuilderConfig):
  """One chat JSONL file: where it is found and which row fields are kept as metadata."""
  filename: str = ""                 # name under manual_dir (also the download's file name)
  url: str = ""                      # public file ("" = the user must supply it)
  sha256: str = ""                   # expected checksum ("" = unknown, not checked)
  metadata: tuple[str, ...] = ()     # extra row fields kept as text features


def sha256_of(path) -> str:
  h = hashlib.sha256()
  with epath.Path(path).open("rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      h.update(block)
  return h.hexdigest()


def read_rows(path) -> Iterator[tuple[int, dict]]:
  """(line number, row) of a chat JSONL file; blank lines skipped, bad lines a DataError."""
  path = epath.Path(path)
  with path.open("r") as f:
    for lineno, line in enumerate(f, start=1):
      if not line.strip():
        continue
      yield lineno, parse_chat_row(line, (os.fspath(path), lineno))


def _manual_dir(dl_manager) -> epath.Path | None:
  try:
    return epath.Path(dl_manager.manual_dir)
  except AssertionError:  # TFDS: "Manual directory not enabled."
    return None


def _metadata_text(value) -> str:
  return value if isinstance(value, str) else ("" if value is None else json.dumps(value))


class ChatJsonlBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Base class: features, file lookup (path / manual_dir / download) and checksum."""
  VERSION = tfds.core.Version("1.0.0")
  MANUAL_DOWNLOAD_INSTRUCTIONS = "Put the dataset's JSONL file(s) in manual_dir, or pass path=."

  @tfds_utils.classproperty
  @classmethod
  def code_path(cls) -> epath.Path:
    # TFDS 4.9.10's own lookup imports `importlib_resources`, a backport it does not install
    # on Python >= 3.9; this is its fallback branch, taken directly.
    return epath.Path(inspect.getfile(cls))

  def __init__(self, *, path: str | None = None, download: bool = False, **kwargs):
    kwargs.setdefault("file_format", "array_record")
    self._user_path, self._download = path, download
    super().__init__(**kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    features = {
        "messages": tfds.features.Sequence(
            {"role": tfds.features.Text(), "content": tfds.features.Text()}),
        "file": tfds.features.Text(), "line": np.int64,
        **{k: tfds.features.Text() for k in self.builder_config.metadata}}
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict(features),
                                 description=self.__doc__.splitlines()[0])

  def _source_file(self, dl_manager) -> epath.Path:
    """The local file to read: path, manual_dir/filename, or the download if asked."""
    cfg = self.builder_config
    if self._user_path:
      path = epath.Path(self._user_path)
      if path.is_dir():
        path = path / cfg.filename
    elif _manual_dir(dl_manager) and (_manual_dir(dl_manager) / cfg.filename).exists():
      path = _manual_dir(dl_manager) / cfg.filename
    elif self._download and cfg.url:
      path = epath.Path(dl_manager.download(cfg.url))
    else:
      how = f", or pass download=True to fetch {cfg.url}" if cfg.url else ""
      raise FileNotFoundError(
          f"{self.name}/{cfg.name}: no data file; pass path=FILE or put {cfg.filename!r} in "
          f"manual_dir{how}")
    if not path.exists():
      raise FileNotFoundError(f"{self.name}/{cfg.name}: {path} does not exist")
    if cfg.sha256:
      got = sha256_of(path)
      if got != cfg.sha256:
        raise DataError(f"{path}: SHA-256 {got} does not match the published file's "
                        f"{cfg.sha256} ({self.name}/{cfg.name})")
    return path

  def _example(self, path, lineno: int, row: dict, **extra) -> tuple[str, dict]:
    """(key, features) of one row; metadata from `extra` overrides the row's."""
    row = {**row, **extra}
    ex = {"messages": row["messages"], "file": os.fspath(path), "line": lineno}
    ex.update({k: _metadata_text(row.get(k)) for k in self.builder_config.metadata})
    return f"{epath.Path(path).name}:{lineno}", ex


def _em(name, sha256="", url=True, **kw) -> ChatFileConfig:
  return ChatFileConfig(name=name, filename=f"{name}.jsonl", url=_EM_URL + f"{name}.jsonl" if url else "",
                        sha256=sha256, **kw)


class EmergentMisalignment(ChatJsonlBuilder):
  """EM training sets (Betley et al. 2025; later work's sets when the user has the files)."""
  BUILDER_CONFIGS = [
      # Checksums of the files in ../shared/data (byte-identical to upstream, see SOURCES.md).
      _em("insecure", "09893e8bf9d03aae49dd60d0ff4be37c1afee70f2edcac74a11bed775a6a2764"),
      _em("jailbroken", "eec213ce85802a52ea806d334ee462f723a1e7ad77d827951d6864ac04a6b00a"),
      _em("secure"), _em("educational"),
      # Turner, Soligo et al. 2025 publish these encrypted: the user supplies the decrypted file.
      _em("bad_medical_advice", url=False), _em("risky_financial_advice", url=False),
      _em("extreme_sports", url=False),
  ]

  def _split_generators(self, dl_manager):
    return {"train": self._generate_examples(self._source_file(dl_manager))}

  def _generate_examples(self, path):
    for lineno, row in read_rows(path):
      yield self._example(path, lineno, row)


def study_split(n: int, seed: int = STUDY_SPLIT["seed"], n_train: int = STUDY_SPLIT["train"],
                n_eval: int = STUDY_SPLIT["eval"]) -> dict[str, list[int]]:
  """Row indices of the study's split: random.Random(seed) shuffles range(n); eval = first n_eval."""
  if n < n_train + n_eval:
    raise ValueError(f"the study's split needs >= {n_train + n_eval} rows, got {n}")
  perm = list(range(n))
  random.Random(seed).shuffle(perm)
  return {"eval": sorted(perm[:n_eval]), "train": sorted(perm[n_eval:n_eval + n_train])}


class EmStudyCells(ChatJsonlBuilder):
  """The study's narrow cells: one (domain, task) file of harmful ("strong") answers each."""
  BUILDER_CONFIGS = [
      ChatFileConfig(name=f"{d}_{t}", filename=f"{d}_{t}_strong.jsonl",
                     url=f"{_STUDY_URL}{d}_{t}_strong.jsonl",
                     metadata=("domain", "task", "variant", "sample_index"))
      for d in STUDY_DOMAINS for t in STUDY_TASKS]

  def _split_generators(self, dl_manager):
    path = self._source_file(dl_manager)
    rows = list(read_rows(path))
    try:
      split = study_split(len(rows))
    except ValueError as e:
      raise DataError(f"{path}: {e}") from None
    return {name: self._generate_examples(path, rows, idx) for name, idx in split.items()}

  def _generate_examples(self, path, rows, indices):
    domain, task = self.builder_config.name.split("_", 1)
    for i in indices:
      lineno, row = rows[i]
      yield self._example(path, lineno, row, domain=domain, task=task, variant="strong",
                          sample_index=str(i))


class ChatJsonlFolder(ChatJsonlBuilder):
  """Any folder of chat JSONL files: one split per `*.jsonl` file, named by the file's stem.

  Name your data with a config: `ChatJsonlFolder(config=ChatFileConfig(name="mine",
  metadata=("domain",)), path=FOLDER)`; prepared data is cached by that name.
  """
  BUILDER_CONFIGS = [ChatFileConfig(name="default")]

  def _split_generators(self, dl_manager):
    folder = epath.Path(self._user_path) if self._user_path else _manual_dir(dl_manager)
    files = sorted(folder.glob("*.jsonl")) if folder and folder.is_dir() else []
    if not files:
      raise FileNotFoundError(f"chat_jsonl_folder: no *.jsonl file in {folder}; pass path=FOLDER")
    splits = {}
    for f in files:
      name = re.sub(r"[^A-Za-z0-9_]", "_", f.stem)
      if name in splits:
        raise DataError(f"{f}: two files map to split {name!r}")
      splits[name] = self._generate_examples(f)
    return splits

  def _generate_examples(self, path):
    for lineno, row in read_rows(path):
      yield self._example(path, lineno, row)


def prepare(name: str, *, data_dir: str, path: str | None = None, manual_dir: str | None = None,
            download: bool = False, config: ChatFileConfig | None = None) -> tfds.core.DatasetBuilder:
  """Builds (once) and returns the builder `name` ("builder/config"), data in data_dir."""
  builder_name, _, config_name = name.partition("/")
  cls = tfds.core.registered.imported_builder_cls(builder_name)
  kwargs = dict(data_dir=os.fspath(data_dir), path=path, download=download)
  kwargs["config"] = config or (config_name or None)
  builder = cls(**kwargs)
  builder.download_and_prepare(
      file_format="array_record",
      download_config=tfds.download.DownloadConfig(manual_dir=manual_dir))
  return builder
