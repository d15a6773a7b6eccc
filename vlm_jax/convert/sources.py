"""Where source tensors come from: state-dict files of any format, and views over them.

`open_state_dict(path)` gives a lazy `{key: np.ndarray}` mapping for a safetensors file / sharded
directory (numpy only) or a PyTorch pickle (`.pt`, `.bin`, `.pth`: OpenFlamingo's `checkpoint.pt`,
open_clip weights). Pickles are read with `torch.load(weights_only=True)` — never by unpickling
arbitrary objects — and only if torch is installed; the library itself never needs torch.

`Renamed` and `Overlay` let one family table read keys that live under other names (an OpenFlamingo
state dict stores the LLaMA layer `model.layers.3.mlp...` as `lang_encoder.model.layers.3.decoder_layer.mlp...`).
"""

import json
import os
import pickle
from typing import Callable, Iterator, Mapping

import numpy as np

from vlm_jax.convert.safetensors_io import CheckpointReader

PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")


class TorchStateDict(Mapping):
  """A PyTorch state dict as `{key: np.ndarray}`; tensors are converted to numpy when read."""

  def __init__(self, path: str):
    try:
      import torch  # pylint: disable=g-import-not-at-top  (optional, read-only use)
    except ImportError as e:
      raise ImportError(
        f"{path} is a PyTorch pickle; reading it needs torch (`pip install torch`, the CPU build is "
        "enough), or convert it to safetensors first") from e
    self.path = path
    try:
      obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError:  # old (non-zip) pickles cannot be memory-mapped
      obj = self._load_plain(torch, path)
    except pickle.UnpicklingError as e:
      raise ValueError(self._unsafe_message(e)) from e
    if isinstance(obj, Mapping) and "model_state_dict" in obj:  # OpenFlamingo's checkpoint_N.pt
      obj = obj["model_state_dict"]
    if not isinstance(obj, Mapping):
      raise ValueError(f"{path}: expected a state dict (a mapping of names to tensors), got "
                       f"{type(obj).__name__}")
    # DistributedDataParallel saves `module.`-prefixed names.
    self._tensors = {(k[len("module."):] if k.startswith("module.") else k): v
                     for k, v in obj.items() if isinstance(v, torch.Tensor)}
    self._torch = torch

  def _load_plain(self, torch, path):
    try:
      return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
      raise ValueError(self._unsafe_message(e)) from e

  def _unsafe_message(self, e) -> str:
    return (f"{self.path}: cannot be read with torch.load(weights_only=True): it stores Python objects "
            f"besides tensors ({str(e).splitlines()[0]}). vlm_jax does not unpickle arbitrary code; "
            "re-save the weights with torch.save(model.state_dict(), ...) or as safetensors")

  def __getitem__(self, key: str) -> np.ndarray:
    if key not in self._tensors:
      raise KeyError(f"{self.path}: no tensor named {key!r}")
    t = self._tensors[key]
    if t.dtype == self._torch.bfloat16:  # numpy has no bfloat16; float32 holds it exactly
      t = t.float()
    return t.numpy()

  def __iter__(self) -> Iterator[str]:
    return iter(self._tensors)

  def __len__(self) -> int:
    return len(self._tensors)

  def shape(self, key: str) -> tuple[int, ...]:
    return tuple(self._tensors[key].shape)


class _Reader(Mapping):
  """`CheckpointReader` as a Mapping (it only offers keys / [] / in)."""

  def __init__(self, reader: CheckpointReader):
    self.reader, self.path = reader, reader.path

  def __getitem__(self, key):
    return self.reader[key]

  def __iter__(self):
    return iter(self.reader.keys())

  def __len__(self):
    return len(self.reader.keys())

  def shape(self, key: str) -> tuple[int, ...]:
    return self.reader.shape(key)


class _Merged(Mapping):
  """Shards of a sharded PyTorch checkpoint (`pytorch_model.bin.index.json`) as one mapping."""

  def __init__(self, shards: list[Mapping], path: str):
    self.path = path
    self._owner = {k: s for s in shards for k in s}

  def __getitem__(self, key):
    return self._owner[key][key]

  def __iter__(self):
    return iter(self._owner)

  def __len__(self):
    return len(self._owner)

  def shape(self, key):
    return shape_of(self._owner[key], key)


WEIGHT_FILES = ("model.safetensors.index.json", "model.safetensors", "pytorch_model.bin.index.json",
                "pytorch_model.bin")


def has_weights(directory: str) -> bool:
  return any(os.path.exists(os.path.join(directory, f)) for f in WEIGHT_FILES)


def open_state_dict(path: str) -> Mapping[str, np.ndarray]:
  """A checkpoint file or an HF model directory -> lazy `{key: np.ndarray}` with `.shape(key)`.

  Directories are searched for safetensors (sharded first) and then PyTorch `pytorch_model.bin`
  (sharded first), the order transformers uses.
  """
  if os.path.isdir(path):
    for name in WEIGHT_FILES:
      file = os.path.join(path, name)
      if os.path.exists(file):
        break
    else:
      raise FileNotFoundError(f"{path}: no weights in this directory (looked for {WEIGHT_FILES})")
    if name == "pytorch_model.bin.index.json":
      with open(file) as f:
        shards = sorted(set(json.load(f)["weight_map"].values()))
      return _Merged([TorchStateDict(os.path.join(path, s)) for s in shards], file)
    path = file
  if path.endswith(PICKLE_SUFFIXES):
    if not os.path.exists(path):
      raise FileNotFoundError(f"{path}: no such file")
    return TorchStateDict(path)
  return _Reader(CheckpointReader(path))


def shape_of(source: Mapping, key: str) -> tuple[int, ...]:
  return source.shape(key) if hasattr(source, "shape") else tuple(np.shape(source[key]))


class Renamed(Mapping):
  """`source` seen through a key translation: `view[new] = source[old]` for every old key with
  `rename(old)` not None."""

  def __init__(self, source: Mapping, rename: Callable[[str], str | None]):
    self.source = source
    self.path = getattr(source, "path", "")
    self._old = {}
    for old in source:
      new = rename(old)
      if new is not None:
        self._old[new] = old

  def __getitem__(self, key):
    return self.source[self._old[key]]

  def __iter__(self):
    return iter(self._old)

  def __len__(self):
    return len(self._old)

  def shape(self, key):
    return shape_of(self.source, self._old[key])


class Overlay(Mapping):
  """Keys of `top` win over the same keys of `bottom` (a trained checkpoint over the base weights)."""

  def __init__(self, top: Mapping, bottom: Mapping | None):
    self.top, self.bottom = top, bottom or {}

  def _owner(self, key):
    return self.top if key in self.top else self.bottom

  def __getitem__(self, key):
    return self._owner(key)[key]

  def __iter__(self):
    yield from self.top
    yield from (k for k in self.bottom if k not in self.top)

  def __len__(self):
    return len(set(self.top) | set(self.bottom))

  def shape(self, key):
    return shape_of(self._owner(key), key)
