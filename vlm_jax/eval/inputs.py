"""Model inputs for few-shot evaluation: images of records, tokenized prompts, fixed-shape batches.

OpenFlamingo tokenizes a batch of prompts with `padding="longest"`, left padding, `truncation=True,
max_length=2000` (the tokenizer's default, right-side truncation) and the tokenizer's own special
tokens (a BOS where the LM's tokenizer adds one); class names are tokenized alone without special
tokens and appended after the left-padded context. We do the same, but pad the length up to a multiple
of `length_bucket` and the batch to a fixed row count so that jit compiles a few shapes, not one per
batch (padding is masked, and RoPE/ALiBi attention only sees relative positions, so the extra left
padding changes nothing).
"""

from __future__ import annotations

import collections
import concurrent.futures
import os
import threading
from typing import Any, Mapping, Sequence

import numpy as np
import tokenizers

from vlm_jax.data.images import clip_preprocess, decode_image
from vlm_jax.data.records import BadRecord
from vlm_jax.eval.tasks import image_candidates


class ImageLoader:
  """Record -> uint8[S, S, 3] (CLIP resize + center crop; the ViT normalises on the device), with an LRU
  cache: demonstrations come from a query set of a few thousand images that every batch draws from."""

  def __init__(self, image_size: int, cache_size: int = 4096, num_threads: int = 4):
    self.image_size = image_size
    self.cache_size = cache_size
    self._cache: collections.OrderedDict = collections.OrderedDict()
    self._lock = threading.Lock()
    self._pool = concurrent.futures.ThreadPoolExecutor(max(1, num_threads))

  def _load(self, key: tuple, record: Mapping[str, Any], task: str) -> np.ndarray:
    with self._lock:
      if key in self._cache:
        self._cache.move_to_end(key)
        return self._cache[key]
    candidates = image_candidates(record)
    item = next((c for c in candidates if not isinstance(c, (str, os.PathLike)) or os.path.exists(c)),
                None)
    if item is None:
      raise FileNotFoundError(f"task {task}: image of record {record['id']!r} not found; tried "
                              f"{[os.fspath(c) for c in candidates]}")
    try:
      image = clip_preprocess(decode_image(item), self.image_size, normalize=False)
    except BadRecord as e:
      raise ValueError(f"task {task}: image of record {record['id']!r} is unusable: {e}") from None
    with self._lock:
      self._cache[key] = image
      if len(self._cache) > self.cache_size:
        self._cache.popitem(last=False)
    return image

  def load(self, records: Sequence[Mapping[str, Any]], keys: Sequence[tuple], task: str
           ) -> list[np.ndarray]:
    """Images of `records` (decoded in threads; PIL releases the GIL), cached under `keys`."""
    return list(self._pool.map(lambda kr: self._load(kr[0], kr[1], task), zip(keys, records)))

  def close(self) -> None:
    self._pool.shutdown(wait=False)


def encode(tokenizer: tokenizers.Tokenizer, texts: Sequence[str], max_tokens: int
           ) -> tuple[list[list[int]], int]:
  """Prompts -> token ids (with the tokenizer's special tokens), right-truncated to `max_tokens` as
  OpenFlamingo's tokenizer call does; returns (ids, number of truncated prompts)."""
  ids = [e.ids for e in tokenizer.encode_batch(list(texts), add_special_tokens=True)]
  truncated = sum(len(x) > max_tokens for x in ids)
  return [x[:max_tokens] for x in ids], truncated


def bucket(n: int, multiple: int) -> int:
  return max(multiple, -(-n // multiple) * multiple)


def left_pad(seqs: Sequence[Sequence[int]], length: int, pad_id: int
             ) -> tuple[np.ndarray, np.ndarray]:
  """-> (int32[N, length] ids, int32[N, length] attention mask), sequences right-aligned."""
  ids = np.full((len(seqs), length), pad_id, np.int32)
  mask = np.zeros((len(seqs), length), np.int32)
  for i, s in enumerate(seqs):
    if len(s) > length:
      raise ValueError(f"sequence of {len(s)} tokens does not fit length {length}")
    if len(s):
      ids[i, length - len(s):] = s
      mask[i, length - len(s):] = 1
  return ids, mask


def pad_rows(x: np.ndarray, rows: int) -> np.ndarray:
  """Pads the leading axis to `rows` by repeating the last row (those results are discarded)."""
  if len(x) >= rows:
    return x
  return np.concatenate([x, np.repeat(x[-1:], rows - len(x), 0)])


def stack_vision(images: Sequence[Sequence[np.ndarray]], num_images: int, image_size: int
                 ) -> np.ndarray:
  """Per example its list of images -> uint8[B, num_images, S, S, 3], zero slots after the last."""
  out = np.zeros((len(images), num_images, image_size, image_size, 3), np.uint8)
  for i, example in enumerate(images):
    if len(example) > num_images:
      raise ValueError(f"example {i} has {len(example)} images, more than {num_images} slots")
    for j, img in enumerate(example):
      out[i, j] = img
  return out
