"""Process set-up shared by every jaxlab entry point: distributed init and the host allocator.

Host allocator (CPU backend only). XLA:CPU allocates each executable's temporaries with
`malloc` on every call: about 1.7 GB per step for the benchmark model of
`benchmarks/train_step.py`. glibc serves any request above its mmap threshold (at most 32 MiB)
with a fresh `mmap` and returns it with `munmap`, so every step touches ~420k fresh pages,
and the kernel zeroes each one on its first-touch fault: about 15% of a CPU training step.
`tune_host_allocator` switches that off with `mallopt`: no mmap for large blocks, never trim
the heap, one arena. Freed blocks are then reused by the next step as already-mapped memory.
The settings equal `GLIBC_TUNABLES=glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=...:
glibc.malloc.arena_max=1`, but need no environment variable set before the process starts.

`setup()` applies it before JAX starts its thread pools (settings made afterwards do not
reach the threads that run XLA's executables: measured, they leave the step time unchanged).
Cost: the heap keeps its high-water mark (RSS never shrinks after a peak), which is what a
training or eval process does anyway. It is applied only on the CPU backend: on TPU/GPU hosts
the big buffers live on the accelerators, and host memory is better returned after checkpoint
loading. Opt out with `JAXLAB_HOST_MALLOC=default`. This is the CPU analogue of the tcmalloc
`LD_PRELOAD` that JAX recommends on TPU VMs.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import glob
import os
import sys

# <malloc.h> parameter numbers.
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
M_ARENA_MAX = -8
_INT_MAX = 2**31 - 1

# glibc's defaults; the arena limit cannot be lifted again once set (it binds new threads only).
_DEFAULTS = ((M_MMAP_MAX, 65536), (M_TRIM_THRESHOLD, 128 * 1024))
_TUNED = ((M_MMAP_MAX, 0), (M_TRIM_THRESHOLD, _INT_MAX), (M_ARENA_MAX, 1))
_tuned = False


def _mallopt(settings) -> bool:
  try:
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    mallopt = libc.mallopt
  except (OSError, AttributeError):  # not glibc (e.g. musl): nothing to tune
    return False
  mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
  return all(mallopt(param, value) == 1 for param, value in settings)


def tune_host_allocator() -> bool:
  """Applies the glibc malloc settings above; True when they are in effect (idempotent).

  Call it before JAX starts its backend (before `import jax` in a script): the one-arena
  setting only binds threads created afterwards, and measured here it is the part that
  matters (the same calls after `jax.devices()` leave the step time unchanged).
  """
  global _tuned
  if not _tuned and os.environ.get("JAXLAB_HOST_MALLOC", "tuned") != "default" \
      and sys.platform.startswith("linux"):
    _tuned = _mallopt(_TUNED)
  return _tuned


def restore_host_allocator() -> None:
  """Back to glibc's defaults (e.g. when the backend turned out to be an accelerator)."""
  global _tuned
  if _tuned:
    _mallopt(_DEFAULTS)
    _tuned = False


def cpu_backend_expected() -> bool:
  """Whether JAX will run on CPU, judged without starting it: JAX_PLATFORMS if set, else
  the absence of TPU (/dev/accel*, /dev/vfio/N), NVIDIA or AMD GPU device files."""
  platforms = os.environ.get("JAX_PLATFORMS", "").strip()
  if platforms:
    return platforms.split(",")[0].strip() == "cpu"
  return not any(glob.glob(p) for p in ("/dev/accel*", "/dev/vfio/[0-9]*", "/dev/nvidia[0-9]*",
                                         "/dev/kfd"))


def enable_compile_cache(path: str | None = None) -> str:
  """Turns on JAX's persistent compilation cache; returns its folder ("" when off).

  A pipeline (the EM study, subliminal learning) trains and samples dozens of models of one
  architecture in one process or several; each run builds fresh jitted functions, so without
  a cache XLA compiles the same train step and sampler again for every cell and seed (on the
  tiny CPU configs that is most of the wall time). The cache is keyed by the compiled program,
  its compile options and the jax/XLA version, so a changed model, shape or setting compiles
  anew: it can only save time. Folder: `path`, else $JAXLAB_COMPILE_CACHE, else
  ~/.cache/jaxlab/xla; JAXLAB_COMPILE_CACHE=off disables it. Idempotent.
  """
  import jax  # pylint: disable=g-import-not-at-top
  path = path or os.environ.get("JAXLAB_COMPILE_CACHE", "") or os.path.join(
      os.path.expanduser("~"), ".cache", "jaxlab", "xla")
  if path == "off":
    return ""
  if jax.config.jax_compilation_cache_dir != path:
    jax.config.update("jax_compilation_cache_dir", path)
    # Programs that compile in under a second are not worth a file read.
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
  return path


def setup() -> dict:
  """Once per process, first thing (before `import jax`): allocator, multi-host init.

  The allocator is tuned when a CPU backend is expected, and put back to glibc's defaults
  if JAX then starts on an accelerator. Returns what was done, for logging.
  """
  if cpu_backend_expected():
    tune_host_allocator()
  import jax  # pylint: disable=g-import-not-at-top  (after the allocator settings)
  if os.environ.get("JAXLAB_DISTRIBUTED") == "1":
    # TPU VMs and SLURM are auto-detected; plain GPU nodes (launch/gpu.sh) name their rank here
    # and the coordinator in JAX_COORDINATOR_ADDRESS.
    jax.distributed.initialize(**{k: int(os.environ[v]) for k, v in (
        ("num_processes", "JAXLAB_NUM_PROCESSES"), ("process_id", "JAXLAB_PROCESS_ID"))
        if v in os.environ})
  platform = jax.default_backend()
  if platform != "cpu":
    restore_host_allocator()
  return {"platform": platform, "host_malloc_tuned": _tuned, "compile_cache": enable_compile_cache()}
