"""A gs:// workdir: a run and a resume write to the bucket (here a fake one backed by a local
folder), never to a local `./gs:/...` folder."""
import json
import os

import fsspec
import jax
import numpy as np
import pytest
from etils.epath import backend as epath_backend
from fsspec.implementations.local import LocalFileSystem

from jaxlab import checkpoint, paths
from jaxlab.config import parse_argv
from jaxlab.run_metrics import read_metrics
from jaxlab.train import runner
from tests.loop_test import _args, data  # noqa: F401  (pytest fixture)


@pytest.fixture
def fake_gcs(tmp_path, monkeypatch):
  """gs://BUCKET/... served from tmp_path/bucket_root/BUCKET/... for etils.epath (fsspec)
  and for Orbax's TensorStore arrays (its GCS kvstore spec becomes a local file one)."""
  from orbax.checkpoint._src.path import gcs_utils
  root = str(tmp_path / "bucket_root")
  os.makedirs(root)

  class FakeGCS(LocalFileSystem):
    protocol = ("gs", "gcs")

    @classmethod
    def _strip_protocol(cls, path):
      path = os.fspath(path)
      if path.startswith(("gs://", "gcs://")):
        path = root + "/" + path.split("://", 1)[1]
      return super()._strip_protocol(path)

    def glob(self, path, **kw):  # results as "bucket/...", as GCS's fsspec returns them
      return [p[len(root) + 1:] for p in super().glob(path, **kw)]

  for proto in ("gs", "gcs"):
    fsspec.register_implementation(proto, FakeGCS, clobber=True)
  epath_backend.fsspec_backend._get_filesystem.cache_clear()  # pylint: disable=protected-access
  monkeypatch.setattr(gcs_utils, "get_kvstore_for_gcs", lambda p: {
      "driver": "file", "path": root + "/" + p.split("://", 1)[1]})
  monkeypatch.setattr(gcs_utils, "is_hierarchical_namespace_enabled", lambda p: False)
  monkeypatch.chdir(tmp_path)
  yield root
  from fsspec.registry import _registry  # pylint: disable=g-import-not-at-top
  for proto in ("gs", "gcs"):
    _registry.pop(proto, None)
  epath_backend.fsspec_backend._get_filesystem.cache_clear()  # pylint: disable=protected-access


def test_gs_workdir_run_and_resume(data, tmp_path, fake_gcs):
  workdir = "gs://bucket/runs/w"
  extra = ["--config.model.d_model=32", "--config.model.n_layers=1", "--config.model.d_ff=64",
           "--config.data.max_examples=32", "--config.checkpoint.every=2"]
  config, _ = parse_argv(_args(data, workdir, steps=2, extra=extra))
  runner.run(config, workdir)
  local = os.path.join(fake_gcs, "bucket", "runs", "w")
  assert {"config.json", "metrics.jsonl", "data_stats.json", "channel.json", "tb", "tokenizer",
          "checkpoints"} <= set(os.listdir(local))
  assert os.listdir(os.path.join(local, "tb"))  # TensorBoard events copied to the bucket
  assert not os.path.exists(tmp_path / "gs:")  # nothing local under the URI's name
  # Resume in a new run (more steps allowed), reading config, checkpoint and metrics back.
  config, _ = parse_argv(_args(data, workdir, steps=4, extra=extra + [
      "--config.resume.allow_changes=train.steps"]))
  out = runner.run(config, workdir)
  assert int(out["state"].step) == 4
  assert [r["step"] for r in read_metrics(workdir)] == [1, 2, 3, 4]
  assert sorted(os.listdir(os.path.join(local, "checkpoints"))) == ["2", "4"]
  assert json.loads(paths.read_text(paths.path(workdir, "config.json")))["train"]["steps"] == 4
  _, params, _ = checkpoint.load_params(workdir)
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(out["state"].params)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert not os.path.exists(tmp_path / "gs:")
