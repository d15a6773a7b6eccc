"""The last pipeline stage: drop `Skip` markers, count them per reason, and batch what is left.

`CountingBatch(parent, batch_size, collate)` is a grain `IterDataset`. Its iterator pulls examples from
the parent, counts each `Skip` under its reason (and every example seen), and yields batches of exactly
`batch_size` good examples. The counts are part of the iterator state, so they survive a checkpoint
restore, and `iterator.counters()` gives them to the trainer's metrics and log line. It runs in the main
process after any multiprocess prefetch, so the counts cover every worker.
"""

from __future__ import annotations

import collections
import logging
from typing import Any, Callable, Sequence

import grain

from vlm_jax.data.records import Skip


class _CountingBatchIterator(grain.DatasetIterator):

  def __init__(self, parent: grain.DatasetIterator, batch_size: int,
               collate: Callable[[Sequence[Any]], Any], log_every: int):
    super().__init__(parent)
    self._batch_size, self._collate, self._log_every = batch_size, collate, log_every
    self._skipped: collections.Counter[str] = collections.Counter()
    self._seen = 0
    self._last_detail = ""

  def __next__(self):
    examples = []
    while len(examples) < self._batch_size:
      element = next(self._parent)  # StopIteration ends the epoch; a partial batch is dropped
      self._seen += 1
      if isinstance(element, Skip):
        self._skipped[element.reason] += 1
        self._last_detail = f"{element.reason}: {element.detail}"
        total = sum(self._skipped.values())
        if self._log_every and total % self._log_every == 0:
          logging.info("data: skipped %d of %d records so far %s (latest %s)", total, self._seen,
                       dict(self._skipped), self._last_detail)
        continue
      examples.append(element)
    return self._collate(examples)

  def counters(self) -> dict[str, int]:
    """{"seen": records pulled, "skipped/<reason>": count} since the start of the run."""
    return {"seen": self._seen, **{f"skipped/{k}": v for k, v in sorted(self._skipped.items())}}

  def get_state(self) -> dict:
    return {"parent": self._parent.get_state(), "seen": self._seen,
            "skipped": dict(self._skipped)}

  def set_state(self, state: dict) -> None:
    self._parent.set_state(state["parent"])
    self._seen = int(state["seen"])
    self._skipped = collections.Counter({k: int(v) for k, v in state["skipped"].items()})


class CountingBatch(grain.IterDataset):
  """Batches of `batch_size` good examples; `Skip` markers are counted and dropped."""

  def __init__(self, parent: grain.IterDataset, batch_size: int,
               collate: Callable[[Sequence[Any]], Any], log_every: int = 1000):
    super().__init__(parent)
    self._batch_size, self._collate, self._log_every = batch_size, collate, log_every

  def __iter__(self) -> _CountingBatchIterator:
    return _CountingBatchIterator(self._parent.__iter__(), self._batch_size, self._collate,
                                  self._log_every)

  def __str__(self) -> str:
    return f"CountingBatch(batch_size={self._batch_size})"
