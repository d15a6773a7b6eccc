"""Reading and writing safetensors checkpoints with numpy only (no PyTorch at run time).

A checkpoint is a single `model.safetensors`, a sharded set described by `model.safetensors.index.json`
(`{"weight_map": {key: shard file}}`), or a directory holding either. Tensors are read lazily, one at a
time, so converting a large model never holds two full copies in host memory.
"""

import json
import os
from typing import Iterator, Mapping

import numpy as np
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"


class CheckpointReader:
  """Random access to the tensors of a (possibly sharded) safetensors checkpoint."""

  def __init__(self, path: str):
    self.path = path
    self._key_to_file: dict[str, str] = {}
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
    try:
      with safe_open(file, framework="numpy") as f:
        keys = list(f.keys())
    except (SafetensorError, OSError) as e:
      raise ValueError(f"{file}: not a readable safetensors file ({e}); is it truncated?") from e
    self._key_to_file.update({k: file for k in keys})

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
    file = self._key_to_file[key]
    try:
      with safe_open(file, framework="numpy") as f:
        return f.get_tensor(key)
    except (SafetensorError, OSError) as e:
      raise ValueError(f"{file}: cannot read tensor {key!r} ({e}); is the file truncated?") from e

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
