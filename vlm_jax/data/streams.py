"""Glue for pipelines built on top of `make_dataset` streams (mixtures, packing).

Such a pipeline starts one `make_dataset` iterator per stream (each a `CountingBatch` iterator
that drops and counts bad records), recombines them with grain stages (zip, mix, pack, batch), and
must still answer `counters()` and checkpoint as one iterator. grain builds a stage's parent
iterators itself, so `Started` hands it iterators that already exist: the pipeline keeps a handle on
them for their counters, while grain's stages carry their state (the outer `get_state()` nests every
stream's state, skip counts included, so a restore continues each stream exactly).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import grain
import numpy as np


class Started(grain.IterDataset):
  """An `IterDataset` whose iterator is one that already exists (made by the caller, who keeps it).

  One-shot: every `iter()` returns that same iterator, so build a fresh `Started` per pipeline
  iterator.
  """

  def __init__(self, iterator: grain.DatasetIterator):
    super().__init__()
    self._iterator = iterator

  def __iter__(self) -> grain.DatasetIterator:
    return self._iterator

  def __str__(self) -> str:
    return f"Started({self._iterator})"


class Counted(grain.DatasetIterator):
  """Passes `inner` through; `counters()` gathers the streams' counters, each under its prefix.

  streams: {prefix: iterator with `counters()`}; prefix "" keeps the stream's own names.
  """

  def __init__(self, inner: grain.DatasetIterator, streams: Mapping[str, Any]):
    super().__init__(inner)
    self._streams = dict(streams)

  def __next__(self):
    return next(self._parent)

  def counters(self) -> dict[str, int]:
    return {f"{prefix}/{k}" if prefix else k: v
            for prefix, it in self._streams.items() for k, v in it.counters().items()}

  def get_state(self) -> dict:
    return self._parent.get_state()

  def set_state(self, state: dict) -> None:
    self._parent.set_state(state)


def first_example(batch: Any) -> Any:
  """A batch of one ({"inputs": {...[1, ...]}, "labels": [1, T]}) -> that example (row 0)."""
  if isinstance(batch, Mapping):
    return {k: first_example(v) for k, v in batch.items()}
  return batch[0]


def collate(examples: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
  """Flat examples {"vision_x", "input_ids", ..., "labels"} -> the batch layout of
  `vlm_jax.data.pipeline` ({"inputs": {...}, "labels": ...}), each leaf stacked on a new axis 0."""
  stacked = {key: np.stack([ex[key] for ex in examples]) for key in examples[0]}
  labels = stacked.pop("labels")
  return {"inputs": stacked, "labels": labels}
