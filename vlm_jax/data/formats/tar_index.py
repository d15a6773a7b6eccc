"""Where each sample's members sit inside WebDataset tar shards, so samples can be read by index.

WebDataset groups consecutive tar members by key: "dir/000123.jpg" and "dir/000123.txt" are the
"jpg" and "txt" fields of sample "dir/000123" (key = path up to the first dot of the file name;
extension lowercased, as `webdataset.tarfile_to_samples` does). `index_shard` walks a shard's
headers once with the stdlib `tarfile` and records, per sample, the data offset and size of the
member that fills each requested *slot* (a slot lists acceptable extensions in order of preference,
e.g. ("jpg", "png", "jpeg", "webp"), the first one present wins). Reading a sample later is one
seek and one read per slot.

A shard that ends early (cut inside a header or a member, or missing the end-of-archive blocks)
keeps the samples before the cut except the last one, which may have lost members after the cut,
and is reported as truncated; reading it never raises anything but the caller's BadRecord.
"""

from __future__ import annotations

import dataclasses
import re
import tarfile
from collections.abc import Sequence

import numpy as np

from vlm_jax.data import files

BLOCK = 512
# webdataset's `base_plus_ext`: key = everything up to the first dot of the last path component.
_KEY_EXT = re.compile(r"^((?:.*/|)[^./]+)\.([^/]*)$")


@dataclasses.dataclass
class ShardIndex:
  """The samples of one shard.

  offsets, sizes: int64[num_samples, num_slots]; data offset and size of each slot's member, -1
    where the sample has none.
  truncated: why the shard counts as truncated ("" when it is whole).
  """

  offsets: np.ndarray
  sizes: np.ndarray
  truncated: str = ""


def split_key(name: str) -> tuple[str, str] | None:
  """("dir/000123", "jpg") for "dir/000123.JPG"; None for names without an extension."""
  match = _KEY_EXT.match(name)
  return (match.group(1), match.group(2).lower()) if match else None


def _end_marker_ok(path: str, offset: int) -> bool:
  with files.open_file(path) as f:
    f.seek(offset)
    block = f.read(BLOCK)
  return len(block) == BLOCK and not any(block)


def index_shard(path: str, slots: Sequence[Sequence[str]]) -> ShardIndex:
  """Indexes one uncompressed tar shard (see the module docstring).

  Raises:
    ValueError: for a gzip-compressed shard (members of a compressed stream cannot be seeked to).
  """
  size = files.size(path)
  with files.open_file(path) as f:
    if f.read(2) == b"\x1f\x8b":
      raise ValueError(f"webdataset: {path} is gzip-compressed; random access needs plain .tar "
                       "shards (decompress it).")
  samples: list[tuple[str, list[list[int]]]] = []  # (key, per slot [preference, offset, size])
  truncated = ""
  try:
    with files.open_file(path) as f, tarfile.open(fileobj=f, mode="r:") as tar:
      for member in tar:
        if member.offset_data + member.size > size:
          truncated = f"member {member.name!r} is cut at byte {size}"
          break
        key_ext = split_key(member.name) if member.isreg() else None
        if key_ext is None:
          continue
        key, ext = key_ext
        if not samples or samples[-1][0] != key:
          samples.append((key, [[len(s), -1, -1] for s in slots]))
        for slot, found in zip(slots, samples[-1][1]):
          if ext in slot and slot.index(ext) < found[0]:
            found[:] = [slot.index(ext), member.offset_data, member.size]
      else:
        if not _end_marker_ok(path, tar.offset):
          truncated = f"no end-of-archive block at byte {tar.offset} of {size}"
  except (tarfile.TarError, EOFError, OSError) as e:
    truncated = f"{type(e).__name__}: {e}"
  if truncated and samples:
    samples.pop()  # the cut may have taken members of the last sample
  table = np.asarray([[(o, s) for _, o, s in found] for _, found in samples], np.int64)
  table = table.reshape(len(samples), len(slots), 2)
  return ShardIndex(offsets=table[..., 0], sizes=table[..., 1], truncated=truncated)


def read_member(path: str, offset: int, size: int) -> bytes:
  with files.open_file(path) as f:
    f.seek(offset)
    return f.read(size)
