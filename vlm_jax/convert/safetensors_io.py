"""Reading and writing safetensors checkpoints with numpy only (no PyTorch at run time).

A checkpoint is a single `model.safetensors`, a sharded set described by `model.safetensors.index.json`
(`{"weight_map": {key: shard file}}`), or a directory holding either. Tensors are read lazily, one at a
time, so converting a large model never holds two full copies in host memory.

The file format is an 8-byte little-endian header length, a JSON header `{key: {"dtype", "shape",
"data_offsets": [begin, end]}}` and the raw bytes. We parse it ourselves rather than through
`safetensors.numpy`, which cannot return bfloat16 (the dtype most hub checkpoints are stored in); numpy
gets bfloat16 from `ml_dtypes`.
"""

import json
import os
import struct
from typing import Iterator, Mapping

import ml_dtypes
import numpy as np
from safetensors.numpy import save_file

DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
          "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8,
          "BOOL": np.bool_, "F8_E4M3": ml_dtypes.float8_e4m3fn, "F8_E5M2": ml_dtypes.float8_e5m2}


def _read_header(file: str) -> tuple[int, dict]:
  """-> (byte offset of the data section, {key: entry}); raises naming the file when it is not a
  complete safetensors file."""
  size = os.path.getsize(file)
  try:
    with open(file, "rb") as f:
      (n,) = struct.unpack("<Q", f.read(8))
      if n > size - 8:
        raise ValueError(f"header of {n} bytes does not fit in {size} bytes")
      header = json.loads(f.read(n))
  except (struct.error, ValueError, UnicodeDecodeError) as e:
    raise ValueError(f"{file}: not a readable safetensors file ({e}); is it truncated?") from e
  header.pop("__metadata__", None)
  start = 8 + n
  end = max((v["data_offsets"][1] for v in header.values()), default=0)
  if start + end > size:
    raise ValueError(f"{file}: header describes {start + end} bytes but the file has {size}; "
                     "the file is truncated")
  for key, v in header.items():
    if v["dtype"] not in DTYPES:
      raise ValueError(f"{file}: tensor {key!r} has dtype {v['dtype']}, which vlm_jax cannot read")
  return start, header

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"


class CheckpointReader:
  """Random access to the tensors of a (possibly sharded) safetensors checkpoint."""

  def __init__(self, path: str):
    self.path = path
    self._key_to_file: dict[str, str] = {}
    self._entries: dict[str, dict] = {}
    self._data_start: dict[str, int] = {}
    if os.path.isdir(path):
      if os.path.exists(os.path.join(path, INDEX)):
        self._from_index(os.path.join(path, INDEX))
      elif os.path.exists(os.path.join(path, SINGLE)):
        self._from_file(os.path.join(path, SINGLE))
      else:
        raise FileNotFoundError(f"{path}: no {SINGLE} or {INDEX} in this directory")
    elif path.endswith(".json"):
      self._from_index(path)
    elif os.path.exists(path):
      self._from_file(path)
    else:
      raise FileNotFoundError(f"{path}: no such checkpoint file or directory")

  def _from_file(self, file: str) -> None:
    start, header = _read_header(file)
    self._data_start[file] = start
    self._entries.update(header)
    self._key_to_file.update({k: file for k in header})

  def _from_index(self, index: str) -> None:
    with open(index) as f:
      weight_map = json.load(f).get("weight_map")
    if not isinstance(weight_map, dict):
      raise ValueError(f"{index}: expected a 'weight_map' object mapping tensor names to shard files")
    root = os.path.dirname(index)
    for shard in sorted(set(weight_map.values())):
      file = os.path.join(root, shard)
      if not os.path.exists(file):
        raise FileNotFoundError(f"{index} names shard {shard!r}, which does not exist in {root}")
      self._from_file(file)
    missing = set(weight_map) - set(self._key_to_file)
    if missing:
      raise ValueError(f"{index} lists tensors its shards do not contain: {sorted(missing)[:5]}")

  def keys(self) -> list[str]:
    return sorted(self._key_to_file)

  def __contains__(self, key: str) -> bool:
    return key in self._key_to_file

  def __getitem__(self, key: str) -> np.ndarray:
    if key not in self._key_to_file:
      raise KeyError(f"{self.path}: no tensor named {key!r}")
    file, entry = self._key_to_file[key], self._entries[key]
    dtype = np.dtype(DTYPES[entry["dtype"]])
    begin, end = entry["data_offsets"]
    count = (end - begin) // dtype.itemsize
    if count != int(np.prod(entry["shape"])):
      raise ValueError(f"{file}: tensor {key!r} has {end - begin} bytes, not shape {entry['shape']} "
                       f"of {entry['dtype']}")
    with open(file, "rb") as f:
      f.seek(self._data_start[file] + begin)
      out = np.fromfile(f, dtype=dtype, count=count)
    if out.size != count:
      raise ValueError(f"{file}: tensor {key!r} is cut short; the file is truncated")
    return out.reshape(entry["shape"])

  def shape(self, key: str) -> tuple[int, ...]:
    return tuple(self._entries[key]["shape"])

  def nbytes(self) -> int:
    return sum(e["data_offsets"][1] - e["data_offsets"][0] for e in self._entries.values())

  def items(self) -> Iterator[tuple[str, np.ndarray]]:
    for k in self.keys():
      yield k, self[k]


def write_checkpoint(directory: str, tensors: Mapping[str, np.ndarray],
                     max_shard_bytes: int = 5 * 2**30) -> None:
  """Write `tensors` as model.safetensors, or shards + index when larger than `max_shard_bytes`."""
  os.makedirs(directory, exist_ok=True)
  shards: list[dict[str, np.ndarray]] = [{}]
  size = 0
  for k in sorted(tensors):
    v = np.ascontiguousarray(tensors[k])
    if shards[-1] and size + v.nbytes > max_shard_bytes:
      shards.append({})
      size = 0
    shards[-1][k] = v
    size += v.nbytes
  metadata = {"format": "pt"}  # transformers refuses files without it
  if len(shards) == 1:
    save_file(shards[0], os.path.join(directory, SINGLE), metadata=metadata)
    return
  weight_map = {}
  for i, shard in enumerate(shards):
    name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
    save_file(shard, os.path.join(directory, name), metadata=metadata)
    weight_map.update({k: name for k in shard})
  total = sum(v.nbytes for v in tensors.values())
  with open(os.path.join(directory, INDEX), "w") as f:
    json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
