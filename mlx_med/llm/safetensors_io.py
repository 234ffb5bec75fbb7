"""A small, strict reader and streaming writer for the safetensors format.

Why our own instead of `safetensors.safe_open`: we need (1) lazy reads of arbitrary
slices of bfloat16 tensors into NumPy (the NumPy backend of `safetensors` has no
bfloat16), so that a sharded load reads only each device's shard; (2) errors that
name the file and tensor for truncated or inconsistent files; (3) a writer that
streams one tensor at a time, so saving a model never holds a second copy of it in
host memory. The format is simple: an 8-byte little-endian header length, a JSON
header {name: {dtype, shape, data_offsets}} (+ "__metadata__"), then the bytes.
Files written here are read back by `safetensors`/transformers (tested).
"""

from __future__ import annotations

import json
import os
import struct
from typing import Iterable, Optional

import ml_dtypes
import numpy as np

_DTYPES = {
    "F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16), "I64": np.dtype(np.int64), "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16), "I8": np.dtype(np.int8), "U8": np.dtype(np.uint8), "BOOL": np.dtype(np.bool_),
}
_NAMES = {v: k for k, v in _DTYPES.items()}
_MAX_HEADER = 100 * 1024 * 1024


class CheckpointError(ValueError):
  """A checkpoint file or index that cannot be used; the message names the file and tensor."""


class SafetensorsFile:
  """Lazy view of one .safetensors file: shapes from the header, data through a memmap."""

  def __init__(self, path: str):
    self.path = path
    try:
      size = os.path.getsize(path)
    except OSError as e:
      raise CheckpointError(f"cannot open safetensors file {path!r}: {e.strerror}") from None
    with open(path, "rb") as f:
      head = f.read(8)
      if len(head) < 8:
        raise CheckpointError(f"{path}: truncated safetensors file (no header; {size} bytes)")
      (header_len,) = struct.unpack("<Q", head)
      if header_len > _MAX_HEADER or 8 + header_len > size:
        raise CheckpointError(f"{path}: truncated or corrupt safetensors file "
                              f"(header claims {header_len} bytes, file has {size})")
      try:
        header = json.loads(f.read(header_len).decode("utf-8"))
      except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: corrupt safetensors header ({e})") from None
    self.metadata = header.pop("__metadata__", None) or {}
    self._data_start = 8 + header_len
    self._entries = header
    data_size = size - self._data_start
    for name, entry in header.items():
      try:
        dtype = _DTYPES[entry["dtype"]]
        begin, end = (int(x) for x in entry["data_offsets"])
        shape = tuple(int(d) for d in entry["shape"])
      except (KeyError, TypeError, ValueError):
        raise CheckpointError(f"{path}: tensor {name!r} has an unsupported or malformed header entry {entry!r}") from None
      if end - begin != dtype.itemsize * int(np.prod(shape, dtype=np.int64)):
        raise CheckpointError(f"{path}: tensor {name!r} header is inconsistent "
                              f"(shape {list(shape)} {entry['dtype']} vs {end - begin} bytes)")
      if end > data_size:
        raise CheckpointError(f"{path}: truncated safetensors file: tensor {name!r} needs bytes up to "
                              f"{self._data_start + end}, the file has {size}")
    self._mmap: Optional[np.memmap] = None

  def keys(self) -> list[str]:
    return list(self._entries)

  def __contains__(self, name: str) -> bool:
    return name in self._entries

  def shape(self, name: str) -> tuple[int, ...]:
    return tuple(int(d) for d in self._entries[name]["shape"])

  def dtype(self, name: str) -> np.dtype:
    return _DTYPES[self._entries[name]["dtype"]]

  def tensor(self, name: str) -> np.ndarray:
    """A read-only memmapped view; slicing it reads only the touched bytes."""
    if self._mmap is None:
      self._mmap = np.memmap(self.path, dtype=np.uint8, mode="r")
    entry = self._entries[name]
    begin, end = (int(x) for x in entry["data_offsets"])
    raw = self._mmap[self._data_start + begin:self._data_start + end]
    return raw.view(self.dtype(name)).reshape(self.shape(name))


def write_safetensors(path: str, tensors: Iterable[tuple[str, tuple[int, ...], np.dtype]],
                      arrays: Iterable[np.ndarray], metadata: Optional[dict[str, str]] = None) -> int:
  """Writes a safetensors file from a header plan and a stream of arrays in the same order.

  `tensors` lists (name, shape, dtype); `arrays` yields the matching arrays one by one,
  so only one tensor is in host memory at a time. Returns the bytes of tensor data.
  """
  plan = list(tensors)
  header: dict = {"__metadata__": dict(metadata or {"format": "pt"})}
  offset = 0
  for name, shape, dtype in plan:
    dtype = np.dtype(dtype)
    if dtype not in _NAMES:
      raise CheckpointError(f"cannot write tensor {name!r} of dtype {dtype} to safetensors")
    nbytes = dtype.itemsize * int(np.prod(shape, dtype=np.int64))
    header[name] = {"dtype": _NAMES[dtype], "shape": [int(d) for d in shape], "data_offsets": [offset, offset + nbytes]}
    offset += nbytes
  blob = json.dumps(header, separators=(",", ":")).encode("utf-8")
  blob += b" " * (-len(blob) % 8)  # keeps the data 8-byte aligned, as the reference writer does
  with open(path, "wb") as f:
    f.write(struct.pack("<Q", len(blob)))
    f.write(blob)
    for (name, shape, dtype), array in zip(plan, arrays):
      array = np.ascontiguousarray(array, dtype=np.dtype(dtype))
      if tuple(array.shape) != tuple(shape):
        raise CheckpointError(f"tensor {name!r}: planned shape {tuple(shape)} but got {array.shape}")
      f.write(array.tobytes())
  return offset
