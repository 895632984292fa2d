"""Safetensors files read and written one tensor at a time, with no memory map.

A memory-mapped file counts every touched page towards the process's RSS until it is unmapped,
so reading a whole checkpoint through mmap costs its full size on top of the placed arrays. Here
a tensor's rows are read with one positioned read into a fresh buffer (file format:
8-byte little-endian header size, JSON header, raw row-major data), and writing streams each
tensor to disk as it is produced.
"""
from __future__ import annotations

import dataclasses
import json
import os
import struct
from typing import Callable, Iterable

import ml_dtypes
import numpy as np

DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
          "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8,
          "BOOL": np.bool_}
_NAMES = {np.dtype(t): name for name, t in DTYPES.items()}
INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"


@dataclasses.dataclass(frozen=True)
class TensorInfo:
  """Where a tensor lives: file, dtype, shape and absolute byte offset of its data."""
  file: str
  dtype: np.dtype
  shape: tuple[int, ...]
  offset: int

  @property
  def nbytes(self) -> int:
    return int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize


def read_header(file: str) -> dict[str, TensorInfo]:
  """Tensor name -> TensorInfo for one .safetensors file."""
  with open(file, "rb") as f:
    (n,) = struct.unpack("<Q", f.read(8))
    header = json.loads(f.read(n))
  header.pop("__metadata__", None)
  out = {}
  for name, h in header.items():
    if h["dtype"] not in DTYPES:
      raise ValueError(f"{file}: tensor {name!r} has unsupported dtype {h['dtype']}")
    start, end = h["data_offsets"]
    info = TensorInfo(file, np.dtype(DTYPES[h["dtype"]]), tuple(h["shape"]), 8 + n + start)
    if info.nbytes != end - start:
      raise ValueError(f"{file}: tensor {name!r} has {end - start} bytes for shape {info.shape}")
    out[name] = info
  return out


def checkpoint_tensors(path: str) -> dict[str, TensorInfo]:
  """All tensors of a checkpoint folder: `model.safetensors`, or shards listed in the index."""
  index = os.path.join(path, INDEX_FILE)
  if os.path.exists(index):
    with open(index, encoding="utf-8") as f:
      files = sorted(set(json.load(f)["weight_map"].values()))
  elif os.path.exists(os.path.join(path, SINGLE_FILE)):
    files = [SINGLE_FILE]
  else:
    raise FileNotFoundError(f"{path}: neither {SINGLE_FILE} nor {INDEX_FILE} found")
  tensors: dict[str, TensorInfo] = {}
  for name in files:
    for key, info in read_header(os.path.join(path, name)).items():
      if key in tensors:
        raise ValueError(f"{path}: tensor {key!r} is stored in two files")
      tensors[key] = info
  return tensors


def aligned_empty(shape, dtype, align: int = 64) -> np.ndarray:
  """np.empty with a 64-byte aligned buffer, which JAX's CPU backend adopts without a copy."""
  dtype = np.dtype(dtype)
  nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
  raw = np.empty(nbytes + align, np.uint8)
  start = -raw.ctypes.data % align
  return raw[start:start + nbytes].view(dtype).reshape(shape)


def read_rows(info: TensorInfo, start: int, stop: int) -> np.ndarray:
  """Rows [start, stop) of the tensor's first dimension (the whole tensor if it is 0-d)."""
  shape = info.shape[:0] if not info.shape else (stop - start,) + info.shape[1:]
  row_bytes = info.nbytes // info.shape[0] if info.shape and info.shape[0] else 0
  out = aligned_empty(shape, info.dtype)
  buf = memoryview(out.reshape(-1).view(np.uint8))
  with open(info.file, "rb", buffering=0) as f:
    f.seek(info.offset + start * row_bytes)
    done = 0
    while done < len(buf):  # a single read() returns at most ~2 GiB on Linux
      n = f.readinto(buf[done:])
      if not n:
        raise ValueError(f"{info.file}: file ends inside a tensor at byte {info.offset + done}")
      done += n
  return out


def write_file(file: str, specs: Iterable[tuple[str, tuple[int, ...], np.dtype]],
               fetch: Callable[[str], np.ndarray]) -> int:
  """Writes tensors `specs` (name, shape, dtype), fetching each only when it is written; returns bytes."""
  specs = list(specs)
  header, offset = {}, 0
  for name, shape, dtype in specs:
    nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
    header[name] = {"dtype": _NAMES[np.dtype(dtype)], "shape": list(shape),
                    "data_offsets": [offset, offset + nbytes]}
    offset += nbytes
  header["__metadata__"] = {"format": "pt"}  # transformers refuses files without it
  raw = json.dumps(header, separators=(",", ":")).encode()
  raw += b" " * (-len(raw) % 8)  # data starts 8-byte aligned, like the reference writer
  with open(file, "wb") as f:
    f.write(struct.pack("<Q", len(raw)) + raw)
    for name, shape, dtype in specs:
      arr = np.ascontiguousarray(fetch(name))
      if arr.shape != tuple(shape) or arr.dtype != np.dtype(dtype):
        raise ValueError(f"tensor {name!r}: got {arr.dtype}{arr.shape}, declared {dtype}{tuple(shape)}")
      f.write(arr.reshape(-1).view(np.uint8).data)
  return offset
