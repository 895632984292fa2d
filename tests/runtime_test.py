"""jaxlab.runtime: with the tuned host allocator big blocks come from the heap and are reused."""
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CHILD = r"""
import ctypes, json, numpy as np
from jaxlab import runtime
tuned = runtime.tune_host_allocator()
libc = ctypes.CDLL("libc.so.6")
libc.sbrk.restype, libc.sbrk.argtypes = ctypes.c_void_p, [ctypes.c_ssize_t]
out = []
for _ in range(4):  # what XLA:CPU does every step: malloc a big temp buffer, use it, free it
  buf = np.empty(64 * 2**20, np.uint8)
  buf.fill(1)
  out.append({"addr": buf.ctypes.data, "brk": libc.sbrk(0)})
  del buf
print(json.dumps({"tuned": tuned, "blocks": out}))
"""


def _run(env_value):
  env = {**os.environ, "PYTHONPATH": ROOT}
  env.pop("GLIBC_TUNABLES", None)
  env.pop("JAXLAB_HOST_MALLOC", None)
  if env_value:
    env["JAXLAB_HOST_MALLOC"] = env_value
  out = subprocess.run([sys.executable, "-c", CHILD], env=env, capture_output=True, text=True,
                       timeout=120, check=True)
  return json.loads(out.stdout.strip().splitlines()[-1])


def test_tuned_allocator_serves_big_blocks_from_the_heap_and_reuses_them():
  stock = _run("default")  # the opt-out: stock glibc mmaps each 64 MiB block above the heap
  assert not stock["tuned"]
  assert all(b["addr"] > b["brk"] for b in stock["blocks"]), stock
  tuned = _run(None)
  assert tuned["tuned"]
  blocks = tuned["blocks"]
  assert all(b["addr"] < b["brk"] for b in blocks), tuned  # inside the heap (below the break)
  assert len({b["addr"] for b in blocks}) == 1, tuned  # the freed block is reused every time
  assert len({b["brk"] for b in blocks}) == 1, tuned  # and the heap neither grows nor shrinks


SETUP = r"""
import json, sys
from jaxlab import runtime
out = runtime.setup()
import jax
out["sum"] = float(jax.numpy.arange(4.0).sum())
out["jax_before_setup"] = "jax" in sys.modules
print(json.dumps(out))
"""


def test_setup_tunes_the_cpu_backend_and_respects_the_opt_out():
  env = {**os.environ, "PYTHONPATH": ROOT, "JAX_PLATFORMS": "cpu"}
  env.pop("JAXLAB_HOST_MALLOC", None)
  run = lambda env: json.loads(subprocess.run(
      [sys.executable, "-c", SETUP], env=env, capture_output=True, text=True, timeout=120,
      check=True).stdout.strip().splitlines()[-1])
  out = run(env)
  assert out["platform"] == "cpu" and out["host_malloc_tuned"] and out["sum"] == 6.0
  out = run({**env, "JAXLAB_HOST_MALLOC": "default"})
  assert out["platform"] == "cpu" and not out["host_malloc_tuned"]


def test_cpu_backend_expected_follows_jax_platforms(monkeypatch):
  from jaxlab import runtime
  for value, want in [("cpu", True), ("tpu", False), ("cuda,cpu", False), ("cpu,tpu", True)]:
    monkeypatch.setenv("JAX_PLATFORMS", value)
    assert runtime.cpu_backend_expected() is want, value


CACHE = r"""
import json, os
from jaxlab import runtime
out = runtime.setup()
import jax
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
jax.jit(lambda x: (x @ x.T).sum() * 3.0)(jax.numpy.ones((64, 64))).block_until_ready()
print(json.dumps(out))
"""


def test_compile_cache_is_written_to_its_folder_and_can_be_switched_off(tmp_path):
  env = {**os.environ, "PYTHONPATH": ROOT, "JAX_PLATFORMS": "cpu"}
  run = lambda **kw: json.loads(subprocess.run(
      [sys.executable, "-c", CACHE], env={**env, **kw}, capture_output=True, text=True,
      timeout=120, check=True).stdout.strip().splitlines()[-1])
  folder = tmp_path / "xla"
  assert run(JAXLAB_COMPILE_CACHE=str(folder))["compile_cache"] == str(folder)
  assert len(os.listdir(folder)) >= 1  # the compiled program, keyed by its content
  assert run(JAXLAB_COMPILE_CACHE="off")["compile_cache"] == ""
