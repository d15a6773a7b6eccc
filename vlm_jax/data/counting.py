"""Dropping `Skip` markers, counting them per reason, batching what is left, and reporting the counts.

Two stages, so that the expensive part can run in worker processes and only whole batches cross the
process boundary:
  `CountingBatch(parent, batch_size, collate)`: pulls examples, counts each `Skip` under its reason
    (and every record seen), yields batches of exactly `batch_size` good examples. With
    `emit_stats=True` each batch also carries `"data_stats"`: the counts since the previous batch.
  `StatsCollector(parent)`: (main process, after any `mp_prefetch`) strips `"data_stats"` from each
    batch, accumulates them, logs a line every `log_every` skips, and exposes `iterator.counters()`.
Both iterators keep their counts in `get_state()`, so counts survive a checkpoint restore; without
workers, `CountingBatch` alone also offers `counters()`. Counts cover the records of emitted batches: the
partial batch dropped at the end of a non-repeating pass is not counted.
"""

from __future__ import annotations

import collections
import logging
from typing import Any, Callable, Sequence

import grain

from vlm_jax.data.records import DROPPED_KEY, Skip

STATS_KEY = "data_stats"


def _counters(seen: int, skipped: collections.Counter,
              dropped: collections.Counter) -> dict[str, int]:
  return {"seen": seen, **{f"skipped/{k}": v for k, v in sorted(skipped.items())},
          **{f"{DROPPED_KEY}/{k}": v for k, v in sorted(dropped.items())}}


class _CountsIterator(grain.DatasetIterator):
  """An iterator holding run-long counts (records seen, skipped per reason, images the readers left
  out of their documents per reason) in its state."""

  def __init__(self, parent: grain.DatasetIterator):
    super().__init__(parent)
    self._seen = 0
    self._skipped: collections.Counter[str] = collections.Counter()
    self._dropped: collections.Counter[str] = collections.Counter()

  def counters(self) -> dict[str, int]:
    """{"seen": records pulled, "skipped/<reason>": records, "dropped_images/<reason>": images}
    since the start of the run."""
    return _counters(self._seen, self._skipped, self._dropped)

  def get_state(self) -> dict:
    return {"parent": self._parent.get_state(), "seen": self._seen,
            "skipped": dict(self._skipped), "dropped_images": dict(self._dropped)}

  def set_state(self, state: dict) -> None:
    self._parent.set_state(state["parent"])
    self._seen = int(state["seen"])
    self._skipped = collections.Counter({k: int(v) for k, v in state["skipped"].items()})
    # Absent from states saved before images were counted.
    self._dropped = collections.Counter(
      {k: int(v) for k, v in state.get("dropped_images", {}).items()})


class _CountingBatchIterator(_CountsIterator):

  def __init__(self, parent: grain.DatasetIterator, batch_size: int,
               collate: Callable[[Sequence[Any]], Any], emit_stats: bool):
    super().__init__(parent)
    self._batch_size, self._collate, self._emit_stats = batch_size, collate, emit_stats

  def __next__(self):
    examples, seen = [], 0
    skipped, dropped = collections.Counter(), collections.Counter()
    while len(examples) < self._batch_size:
      element = next(self._parent)  # StopIteration ends the epoch; a partial batch is dropped
      seen += 1
      if isinstance(element, Skip):
        skipped[element.reason] += 1
        dropped.update(element.dropped_images)
        continue
      dropped.update(element.pop(DROPPED_KEY, None) or {})
      examples.append(element)
    self._seen += seen
    self._skipped.update(skipped)
    self._dropped.update(dropped)
    batch = self._collate(examples)
    if self._emit_stats:
      batch[STATS_KEY] = _counters(seen, skipped, dropped)
    return batch


class CountingBatch(grain.IterDataset):
  """Batches of `batch_size` good examples; `Skip` markers are counted and dropped."""

  def __init__(self, parent: grain.IterDataset, batch_size: int,
               collate: Callable[[Sequence[Any]], Any], emit_stats: bool = False):
    super().__init__(parent)
    self._batch_size, self._collate, self._emit_stats = batch_size, collate, emit_stats

  def __iter__(self) -> _CountingBatchIterator:
    return _CountingBatchIterator(self._parent.__iter__(), self._batch_size, self._collate,
                                  self._emit_stats)

  def __str__(self) -> str:
    return f"CountingBatch(batch_size={self._batch_size})"


class _StatsCollectorIterator(_CountsIterator):

  def __init__(self, parent: grain.DatasetIterator, log_every: int):
    super().__init__(parent)
    self._log_every = log_every

  def __next__(self):
    batch = next(self._parent)
    stats = batch.pop(STATS_KEY, None) or {}
    before = sum(self._skipped.values())
    self._seen += int(stats.get("seen", 0))
    self._skipped.update({k[len("skipped/"):]: int(v) for k, v in stats.items()
                          if k.startswith("skipped/")})
    prefix = DROPPED_KEY + "/"
    self._dropped.update({k[len(prefix):]: int(v) for k, v in stats.items()
                          if k.startswith(prefix)})
    total = sum(self._skipped.values())
    if self._log_every and total // self._log_every > before // self._log_every:
      logging.info("data: skipped %d of %d records so far %s", total, self._seen, dict(self._skipped))
    return batch


class StatsCollector(grain.IterDataset):
  """Accumulates the per-batch `"data_stats"` of `CountingBatch(emit_stats=True)` batches."""

  def __init__(self, parent: grain.IterDataset, log_every: int = 1000):
    super().__init__(parent)
    self._log_every = log_every

  def __iter__(self) -> _StatsCollectorIterator:
    return _StatsCollectorIterator(self._parent.__iter__(), self._log_every)

  def __str__(self) -> str:
    return "StatsCollector"
