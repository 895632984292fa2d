"""Tests for launch/: dry runs print the right commands; env-based multi-process start works."""

import os
import socket
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
JOB = ["--config=configs/em_real.py:em_qwen7b", "--workdir=gs://bucket/run",
       "--config.model.lora.layers=(1, 2)"]


def dry(script, *args, env=None):
  out = subprocess.run(["bash", f"launch/{script}", *args], cwd=ROOT, capture_output=True,
                       text=True, env={**os.environ, "RUN_ID": "r1", **(env or {})})
  return out.returncode, [l[2:] for l in out.stdout.splitlines() if l.startswith("+ ")], out.stderr


def test_tpu_single_host_dry_run():
  rc, cmds, err = dry("tpu.sh", "--name", "t1", "--zone", "us-west4-a", "--type", "v5litepod-8",
                      "--dry-run", "--", *JOB)
  assert rc == 0, err
  assert "1 host(s)" in err
  assert not any("create" in c for c in cmds)  # no --create: the VM must exist
  ssh = "gcloud compute tpus tpu-vm ssh t1 --zone us-west4-a"
  install, start, logs = cmds[-3:]
  assert install.startswith(f"{ssh} --worker=all --command ") and "'jax[tpu]==0.10.2'" in install
  assert start.startswith(f"{ssh} --worker=all --command ")
  assert "JAXLAB_DISTRIBUTED" not in start  # one host: no distributed init
  assert ("-m jaxlab.main --config=configs/em_real.py:em_qwen7b --workdir=gs://bucket/run "
          r"--config.model.lora.layers=\(1\,\ 2\)") in start
  assert logs == (f"{ssh} --worker=0 --command 'tail -n +1 -f --pid=$(cat "
                  "~/jaxlab_logs/r1.pid) ~/jaxlab_logs/r1.log'")
  assert cmds[1] == ("gcloud compute tpus tpu-vm scp /tmp/jaxlab_r1.tar.gz t1:jaxlab.tar.gz "
                     "--zone us-west4-a --worker=all")


def test_tpu_four_host_slice_dry_run_creates_runs_everywhere_fetches_and_deletes():
  rc, cmds, err = dry("tpu.sh", "--name", "t4", "--zone", "us-east5-a", "--type", "v5p-32",
                      "--create", "--project", "p", "--fetch", "/tmp/out", "--delete",
                      "--dry-run", "--", "--config=configs/sft.py:em_lora", "--workdir=/data/run")
  assert rc == 0, err
  assert "v5p-32: 16 chips, 4 host(s)" in err
  where = "--zone us-east5-a --project p"
  assert cmds[0] == (f"gcloud compute tpus tpu-vm describe t4 {where} >/dev/null 2>&1 || "
                     f"gcloud compute tpus tpu-vm create t4 {where} --accelerator-type v5p-32 "
                     "--version v2-alpha-tpuv5")
  start = next(c for c in cmds if "jaxlab.main" in c)
  assert start.startswith(f"gcloud compute tpus tpu-vm ssh t4 {where} --worker=all --command ")
  assert "env JAXLAB_RUN_ID=r1 JAXLAB_DISTRIBUTED=1 .venv/bin/python -m jaxlab.main" in start
  assert cmds[-3:] == [
      "mkdir -p /tmp/out",
      f"gcloud compute tpus tpu-vm scp --recurse t4:/data/run /tmp/out {where} --worker=0",
      f"gcloud compute tpus tpu-vm delete t4 {where} --quiet"]


def test_tpu_bad_arguments():
  assert dry("tpu.sh", "--name", "t", "--zone", "z", "--dry-run")[0] == 2
  rc, _, err = dry("tpu.sh", "--name", "t", "--zone", "z", "--type", "v9-8", "--dry-run", "--", "x")
  assert rc == 2 and "unknown TPU generation v9" in err


def test_gpu_two_node_dry_run():
  rc, cmds, err = dry("gpu.sh", "--hosts", "gpu-a,gpu-b", "--coordinator", "gpu-a:1234",
                      "--dry-run", "--", "--config=configs/em_real.py:em_qwen7b",
                      "--workdir=/shared/run")
  assert rc == 0, err
  for h in ("gpu-a", "gpu-b"):
    assert f"scp /tmp/jaxlab_r1.tar.gz {h}:jaxlab.tar.gz" in cmds
    assert any(c.startswith(f"ssh {h} 'mkdir -p ~/jaxlab") and "jax[cuda12]==0.10.2" in c
               for c in cmds)
  env = "JAXLAB_DISTRIBUTED=1 JAX_COORDINATOR_ADDRESS=gpu-a:1234 JAXLAB_NUM_PROCESSES=2"
  job = ".venv/bin/python -m jaxlab.main --config=configs/em_real.py:em_qwen7b --workdir=/shared/run"
  assert cmds[-2:] == [
      f"ssh gpu-b 'cd ~/jaxlab && env JAXLAB_RUN_ID=r1 {env} JAXLAB_PROCESS_ID=1 {job} "
      "> ~/jaxlab_logs/r1.log 2>&1' &",
      f"ssh gpu-a 'cd ~/jaxlab && env JAXLAB_RUN_ID=r1 {env} JAXLAB_PROCESS_ID=0 {job}'"]
  rc, _, err = dry("gpu.sh", "--hosts", "a,b", "--dry-run", "--", "x")
  assert rc == 2 and "needs --coordinator" in err


def test_gpu_one_rank_of_a_job_started_per_node():
  rc, cmds, err = dry("gpu.sh", "--nodes", "2", "--node-rank", "1", "--coordinator", "h:1",
                      "--dry-run", "--", "--config=c", "--workdir=w")
  assert rc == 0, err
  assert cmds[-1] == ("env JAXLAB_DISTRIBUTED=1 JAX_COORDINATOR_ADDRESS=h:1 JAXLAB_NUM_PROCESSES=2 "
                      "JAXLAB_PROCESS_ID=1 JAXLAB_RUN_ID=r1 .venv/bin/python -m jaxlab.main "
                      "--config=c --workdir=w")
  assert dry("gpu.sh", "--nodes", "2", "--node-rank", "2", "--coordinator", "h:1", "--dry-run",
             "--", "x")[0] == 2


def test_local_sh_interface_unchanged():
  out = subprocess.run(["bash", "launch/local.sh", "nope"], cwd=ROOT, capture_output=True, text=True)
  assert out.returncode == 2 and "usage: launch/local.sh main|test" in out.stderr


WORKER = """
import jaxlab.runtime as r
r.setup()
import jax
print("processes", jax.process_count(), "index", jax.process_index(), flush=True)
jax.distributed.shutdown()
"""


def test_environment_of_gpu_sh_starts_a_two_process_jax_job():
  """What launch/gpu.sh exports is enough for jaxlab.runtime.setup() to join 2 processes."""
  with socket.socket() as s:
    s.bind(("localhost", 0))
    port = s.getsockname()[1]
  procs = [subprocess.Popen(
      [sys.executable, "-c", WORKER], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
      text=True, env={**os.environ, "JAX_PLATFORMS": "cpu", "JAXLAB_DISTRIBUTED": "1",
                      "JAX_COORDINATOR_ADDRESS": f"localhost:{port}",
                      "JAXLAB_NUM_PROCESSES": "2", "JAXLAB_PROCESS_ID": str(i)})
      for i in range(2)]
  outs = [p.communicate(timeout=120) for p in procs]
  for i, (p, (out, err)) in enumerate(zip(procs, outs)):
    assert p.returncode == 0, err[-2000:]
    assert f"processes 2 index {i}" in out
