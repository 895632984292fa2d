"""Process set-up shared by every jaxlab entry point: distributed init and the host allocator.

Host allocator (CPU backend only). XLA:CPU allocates each executable's temporaries with
`malloc` on every call: about 1.7 GB per step for the benchmark model of
`benchmarks/train_step.py`. glibc serves any request above its mmap threshold (at most 32 MiB)
with a fresh `mmap` and returns it with `munmap`, so every step touches ~420k fresh pages,
and the kernel zeroes each one on its first-touch fault: about 20% of a CPU training step.
`tune_host_allocator` switches that off with `mallopt`: no mmap for large blocks, never trim
the heap, one arena. Freed blocks are then reused by the next step as already-mapped memory.
The settings equal `GLIBC_TUNABLES=glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=...:
glibc.malloc.arena_max=1`, but need no environment variable set before the process starts.

Cost: the heap keeps its high-water mark (RSS never shrinks after a peak), which is what a
training or eval process does anyway. It is applied only on the CPU backend: on TPU/GPU hosts
the big buffers live on the accelerators, and host memory is better returned after checkpoint
loading. Opt out with `JAXLAB_HOST_MALLOC=default`. This is the CPU analogue of the tcmalloc
`LD_PRELOAD` that JAX recommends on TPU VMs.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

# <malloc.h> parameter numbers.
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
M_ARENA_MAX = -8
_INT_MAX = 2**31 - 1

_tuned = False


def tune_host_allocator() -> bool:
  """Applies the glibc malloc settings above; True when they are in effect (idempotent)."""
  global _tuned
  if _tuned:
    return True
  if os.environ.get("JAXLAB_HOST_MALLOC", "tuned") == "default" or not sys.platform.startswith("linux"):
    return False
  try:
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    mallopt = libc.mallopt
  except (OSError, AttributeError):  # not glibc (e.g. musl): nothing to tune
    return False
  mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
  ok = all(mallopt(param, value) == 1 for param, value in
           ((M_MMAP_MAX, 0), (M_TRIM_THRESHOLD, _INT_MAX), (M_ARENA_MAX, 1)))
  _tuned = ok
  return ok


def setup(platform: str | None = None) -> dict:
  """Once per process, before the first computation: multi-host init, then the allocator.

  `platform` defaults to JAX's default backend. Returns what was done, for logging.
  """
  import jax  # pylint: disable=g-import-not-at-top
  if os.environ.get("JAXLAB_DISTRIBUTED") == "1":
    jax.distributed.initialize()
  platform = platform or jax.default_backend()
  return {"platform": platform,
          "host_malloc_tuned": platform == "cpu" and tune_host_allocator()}
