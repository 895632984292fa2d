"""Two local CPU processes with jax.distributed (localhost coordinator) against one process:
each shared output is written once (by process 0) with the same content, and the two-process
checkpoint restores in a single process."""
import json
import os
import socket
import subprocess
import sys

import jax
import numpy as np

from jaxlab import checkpoint
from jaxlab.run_metrics import read_metrics
from tests.loop_test import _args, data  # noqa: F401  (pytest fixture)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKER = os.path.join(ROOT, "tests", "realrun_distributed_worker.py")


def _free_port():
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _launch(nproc, workdir, args):
  port = _free_port()
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  procs = [subprocess.Popen([sys.executable, WORKER, str(i), str(nproc), str(port), str(workdir),
                             json.dumps(args)], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True) for i in range(nproc)]
  results = []
  for p in procs:
    out, err = p.communicate(timeout=600)
    assert p.returncode == 0, err[-3000:]
    results.append(json.loads(out.split("RESULT ", 1)[1]))
  return results


def test_two_processes_write_once_and_match_one(data, tmp_path):
  args = [a for a in _args(data, "unused", steps=3) if not a.startswith("--workdir")] + [
      "--config.model.d_model=32", "--config.model.n_layers=1", "--config.model.d_ff=64",
      "--config.data.max_examples=32", "--config.checkpoint.every=2"]
  one, two = tmp_path / "one", tmp_path / "two"
  (r1,) = _launch(1, one, args)
  r2 = _launch(2, two, args)
  assert r1["devices"] == 2 and [r["devices"] for r in r2] == [2, 2]
  assert [r["process"] for r in r2] == [0, 1] and all(r["step"] == 3 for r in r2)
  # Process 0 wrote each shared output once; process 1 wrote none.
  outputs = ["channel.json", "config.json", "data_stats.json", "tokenizer/"]
  assert r2[0]["written"] == outputs == r1["written"]
  assert r2[1]["written"] == [] and r2[1]["metric_rows"] == []
  assert r2[0]["metric_rows"] == [1, 2, 3]
  assert [json.loads(l)["step"] for l in (two / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3]
  # Same content as the one-process run.
  for name in ("config.json", "data_stats.json", "channel.json"):
    assert (two / name).read_text() == (one / name).read_text(), name
  for name in sorted(os.listdir(one / "tokenizer")):
    assert (two / "tokenizer" / name).read_bytes() == (one / "tokenizer" / name).read_bytes()
  m1, m2 = read_metrics(one), read_metrics(two)
  for a, b in zip(m1, m2):
    np.testing.assert_allclose([a["loss"], a["grad_norm"]], [b["loss"], b["grad_norm"]], rtol=1e-5)
  assert sorted(os.listdir(two / "checkpoints")) == ["2", "3"]
  # The two-process checkpoint restores in this single process.
  _, p1, _ = checkpoint.load_params(str(one))
  _, p2, _ = checkpoint.load_params(str(two))
  for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(p2)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)
