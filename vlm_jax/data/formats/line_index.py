"""Byte offsets of the lines of jsonl shards, so any line can be read by index (random access).

Each shard is read once in large blocks and its newlines found with numpy; the index keeps two int64
numbers per non-empty line (start, length) and one per shard, so 100M documents cost ~1.6 GB and
scanning is I/O bound. Shards are scanned in parallel threads (numpy and file reads release the
GIL).
"""

from __future__ import annotations

import concurrent.futures
import os
from collections.abc import Sequence

import numpy as np

from vlm_jax.data import files

_BLOCK = 1 << 26  # 64 MiB per read
_NEWLINE = ord("\n")


def index_lines(path: str) -> tuple[np.ndarray, np.ndarray]:
  """(starts, lengths): int64[num_lines] for the non-empty lines of `path` (newline excluded).

  A last line without a trailing newline counts; empty lines ("\\n\\n") are left out.
  """
  newlines = []
  with files.open_file(path) as f:
    pos = 0
    while block := f.read(_BLOCK):
      newlines.append(np.flatnonzero(np.frombuffer(block, np.uint8) == _NEWLINE) + pos)
      pos += len(block)
  ends = np.concatenate(newlines + [np.asarray([pos], np.int64)]).astype(np.int64)
  starts = np.concatenate([[0], ends[:-1] + 1]).astype(np.int64)
  lengths = ends - starts
  keep = lengths > 0
  return starts[keep], lengths[keep]


class LineIndex:
  """Every non-empty line of a list of shards, addressed by one global index.

  `locate(i)` -> (shard number, line number within the shard's non-empty lines, start, length).
  """

  def __init__(self, paths: Sequence[str], num_threads: int = 16):
    self.paths = [os.fspath(p) for p in paths]
    workers = max(1, min(num_threads, len(self.paths)))
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
      per_shard = list(pool.map(index_lines, self.paths))
    self.starts = np.concatenate([s for s, _ in per_shard] + [np.zeros(0, np.int64)])
    self.lengths = np.concatenate([n for _, n in per_shard] + [np.zeros(0, np.int64)])
    # shard_ends[k] = global index one past shard k's last line.
    self.shard_ends = np.cumsum([len(s) for s, _ in per_shard]).astype(np.int64)

  def __len__(self) -> int:
    return len(self.starts)

  def locate(self, index: int) -> tuple[int, int, int, int]:
    if not 0 <= index < len(self.starts):
      raise IndexError(f"line index {index} out of range [0, {len(self.starts)}).")
    shard = int(np.searchsorted(self.shard_ends, index, side="right"))
    first = int(self.shard_ends[shard - 1]) if shard else 0
    return shard, index - first, int(self.starts[index]), int(self.lengths[index])

  def read(self, index: int) -> tuple[int, int, bytes]:
    """(shard number, line number in shard, the line's bytes)."""
    shard, line, start, length = self.locate(index)
    with files.open_file(self.paths[shard]) as f:
      f.seek(start)
      return shard, line, f.read(length)
