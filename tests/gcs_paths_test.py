"""gs:// workdirs through the installed GCS filesystem (gcsfs, etils' `epath-gcs` extra).

The bucket is a stand-in for gcsfs.GCSFileSystem put where fsspec looks it up (the class
`gcsfs.GCSFileSystem` of fsspec's known implementations), so every call goes the way a real
gs:// path goes (etils.epath -> fsspec -> gcsfs) without network or credentials. The stand-in
keeps GCS's object semantics that matter to jaxlab: gcsfs's path form ("bucket/key"), an object
appears when its writer closes, and append mode overwrites (gcsfs warns and opens "wb").
"""
import io
import json
import warnings

import gcsfs  # ImportError: the install lacks etils[epath-gcs] (pyproject.toml)
import pytest
from etils import epath
from etils.epath import backend as epath_backend
from fsspec.implementations.memory import MemoryFile, MemoryFileSystem
from fsspec.registry import _registry
from fsspec.utils import stringify_path

from jaxlab import paths
from jaxlab.evals.records import append_jsonl, read_jsonl
from jaxlab.run_metrics import MetricsWriter, read_metrics


class _Upload(io.BytesIO):
  """A GCS upload: the object is written when the file closes (flush() does not upload)."""

  def __init__(self, fs, path):
    super().__init__()
    self.fs, self.path = fs, path

  def close(self):
    if not self.closed:
      MemoryFile(self.fs, self.path, self.getvalue()).commit()
    super().close()


@pytest.fixture
def bucket():
  """The objects of the fake GCS: {"bucket/key": file}."""

  class FakeGCSFileSystem(MemoryFileSystem):
    protocol = ("gs", "gcs")
    root_marker = ""
    store = {}
    pseudo_dirs = [""]

    @classmethod
    def _strip_protocol(cls, path):
      path = stringify_path(path)
      for prefix in ("gs://", "gcs://"):
        path = path.removeprefix(prefix)
      return path.strip("/")

    def _open(self, path, mode="rb", **kwargs):
      path = self._strip_protocol(path)
      if "a" in mode:  # as gcsfs.core.GCSFile does
        warnings.warn("Append mode 'a' is not supported in GCS. Using overwrite mode instead.")
        mode = mode.replace("a", "w")
      if "w" in mode:
        return _Upload(self, path)
      return super()._open(path, mode, **kwargs)

  def reset():
    for proto in ("gs", "gcs"):
      _registry.pop(proto, None)  # fsspec imports gcsfs.GCSFileSystem on first use
    epath_backend.fsspec_backend._get_filesystem.cache_clear()  # pylint: disable=protected-access

  real = gcsfs.GCSFileSystem
  gcsfs.GCSFileSystem = FakeGCSFileSystem
  reset()
  try:
    yield FakeGCSFileSystem.store
  finally:
    gcsfs.GCSFileSystem = real
    reset()


def _text(bucket, key):
  return bucket[key].getvalue().decode()


def test_epath_on_a_gs_path_goes_through_gcsfs(bucket):
  d = epath.Path("gs://bucket/run")
  d.mkdir(parents=True, exist_ok=True)
  (d / "a.txt").write_text("hello")
  assert _text(bucket, "bucket/run/a.txt") == "hello"  # the object, in gcsfs's path form
  assert (d / "a.txt").exists() and (d / "a.txt").read_text() == "hello"
  (d / "a.txt").rename(d / "b.txt")
  assert not (d / "a.txt").exists() and (d / "b.txt").read_text() == "hello"
  assert [p.name for p in d.iterdir()] == ["b.txt"]
  assert [str(p) for p in d.glob("*.txt")] == ["gs://bucket/run/b.txt"]


def test_jaxlab_path_helpers_on_a_gs_workdir(bucket, tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  workdir = "gs://bucket/runs/w"
  assert paths.is_uri(workdir) and str(paths.path(workdir, "config.json")) == \
      "gs://bucket/runs/w/config.json"
  paths.write_text(paths.path(workdir, "config.json"), '{"a": 1}')
  assert _text(bucket, "bucket/runs/w/config.json") == '{"a": 1}'
  assert "bucket/runs/w/config.json.tmp" not in bucket  # written through a temporary name
  paths.write_text(paths.path(workdir, "config.json"), '{"a": 2}')  # replaces the object
  assert json.loads(paths.read_text(paths.path(workdir, "config.json"))) == {"a": 2}
  assert paths.read_text(paths.path(workdir, "absent.json")) is None
  # Eval records (append = rewrite on object stores).
  append_jsonl(f"{workdir}/scores/a.jsonl", [{"a": 1}])
  append_jsonl(f"{workdir}/scores/a.jsonl", [{"a": 2}])
  assert read_jsonl(f"{workdir}/scores/a.jsonl") == [{"a": 1}, {"a": 2}]
  assert not (tmp_path / "gs:").exists()  # nothing local under the URI's name


def test_metrics_writer_on_a_gs_workdir(bucket, tmp_path, monkeypatch):
  """Rows are in the bucket after every flush (GCS uploads only whole objects), and a resumed
  run keeps the rows up to its checkpoint (GCS cannot append)."""
  monkeypatch.chdir(tmp_path)
  workdir = "gs://bucket/runs/w"
  w = MetricsWriter(workdir, total_steps=4, progress=False)
  w.write(1, {"loss": 1.0})
  w.write(2, {"loss": 0.5})
  w.flush()
  assert [r["step"] for r in read_metrics(workdir)] == [1, 2]  # durable before close
  w.write(3, {"loss": 0.25})
  w.flush()
  assert [r["step"] for r in read_metrics(workdir)] == [1, 2, 3]
  # Killed after step 3; resumed from the checkpoint at step 2.
  with warnings.catch_warnings():
    warnings.simplefilter("error")  # no append mode on GCS
    w = MetricsWriter(workdir, total_steps=4, start_step=2, progress=False)
    w.write(3, {"loss": 0.3})
    w.write(4, {"loss": 0.2})
    w.close()
  rows = read_metrics(workdir)
  assert [(r["step"], r["loss"]) for r in rows] == [(1, 1.0), (2, 0.5), (3, 0.3), (4, 0.2)]
  assert [json.loads(l)["step"] for l in _text(bucket, "bucket/runs/w/metrics.jsonl").splitlines()
          ] == [1, 2, 3, 4]
  assert any(k.startswith("bucket/runs/w/tb/") for k in bucket)  # TensorBoard events copied
  assert not (tmp_path / "gs:").exists()
