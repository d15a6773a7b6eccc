"""OBELICS interleaved documents (parquet) as a grain random-access source of records.

Each row holds two parallel lists, `texts` and `images`: at every position exactly one of texts[k] /
images[k] is non-null, so together they spell the page in reading order. An image is encoded bytes,
an HF-datasets image struct {"bytes", "path"}, or a string: a path relative to `image_dir`, or a URL
looked up at `image_dir/<URL without its scheme>` (the layout `wget --force-directories` writes).

Records use OpenFlamingo's MMC4 layout (`of_layout.interleave`): each image goes before the text
that follows it, a chunk runs to the next image and ends with `<|endofchunk|>`, and the document
ends with `<|endoftext|>`; at most `max_images` images, the text cut before the next one. Bad images
(missing, empty, undecodable, outside the size limits, under `min_image_bytes`) are left out before
layout and counted, as for MMC4 (`DocumentOptions`). OF
never trained on OBELICS, so its single-image coin is off by default (`single_image_keep_prob=1.0`).

Random access: the (file, row group, row) of every global index comes from the parquet footers, read
once at construction; `source[i]` reads the row's row group (only the two columns) and keeps the
last few row groups in memory, so neighbouring indices cost one read.
"""

from __future__ import annotations

import collections
import dataclasses
import os
import threading
from collections.abc import Sequence
from typing import Any, ClassVar

import numpy as np
import pyarrow.parquet as pq

from vlm_jax.data import files
from vlm_jax.data.formats import config_fields, image_payloads, of_layout
from vlm_jax.data.data_config import parse
from vlm_jax.data.formats.doc_options import DocumentOptions
from vlm_jax.data.records import DROPPED_KEY, BadRecord, CheckedImage

COLUMNS = ("texts", "images")


@dataclasses.dataclass(frozen=True)
class ObelicsOptions(DocumentOptions):
  """How OBELICS rows become records (`DocumentOptions`; no single-image coin, no size floor)."""

  READER: ClassVar[str] = "obelics"


def _url_or_path(value: str, image_dir: str | None, what: str) -> bytes:
  scheme, sep, rest = value.partition("://")
  name = rest if sep and scheme.isalpha() else value
  return image_payloads.read_image_file(image_dir, name, what)


def image_bytes(value: Any, image_dir: str | None, what: str) -> bytes:
  """Encoded bytes of one `images` entry (bytes, {"bytes", "path"} struct, path or URL)."""
  if isinstance(value, (bytes, bytearray, memoryview)):
    return bytes(value)
  if isinstance(value, dict):
    if value.get("bytes") is not None:
      return bytes(value["bytes"])
    value = value.get("path")
  if isinstance(value, str):
    return _url_or_path(value, image_dir, what)
  raise image_payloads.ImageProblem("image_missing", f"{what}: no bytes or path ({value!r:.80})")


def build_record(texts: Any, images: Any, *, index: int, record_id: str,
                 options: ObelicsOptions) -> dict[str, Any]:
  """One OBELICS row -> {"text", "images", "id"}; raises BadRecord (see the module docstring)."""
  if not isinstance(texts, list) or not isinstance(images, list) or len(texts) != len(images):
    raise BadRecord("malformed_json", f"{record_id}: 'texts' and 'images' must be lists of equal "
                    f"length, got {type(texts).__name__}/{type(images).__name__}")
  sentences: list[str] = []
  slots: list[int] = []
  payloads: list[CheckedImage] = []
  problems: list[image_payloads.ImageProblem] = []
  for k, (text, image) in enumerate(zip(texts, images)):
    if (text is None) == (image is None):
      raise BadRecord("malformed_json", f"{record_id}: position {k} must have exactly one of "
                      "texts[k] / images[k]")
    if text is not None:
      if not isinstance(text, str):
        raise BadRecord("malformed_json", f"{record_id}: texts[{k}] is {type(text).__name__}")
      sentences.append(text)
      continue
    what = f"{record_id} images[{k}]"
    data = options.usable_image(
      lambda: image_bytes(image, options.image_dir, what), what, problems)  # noqa: B023
    if data is None:
      continue
    slots.append(len(sentences))  # before the next text
    payloads.append(data)
  if not slots:
    raise image_payloads.no_usable_image(problems, record_id)
  dropped = image_payloads.dropped_counts(problems)
  text, placed = of_layout.interleave(sentences, slots, options.max_images)
  try:
    options.check_single_image(text, placed, index, record_id)
  except BadRecord as e:
    raise BadRecord(e.reason, e.detail, dropped) from None
  return {"text": text, "images": payloads[:placed], "id": record_id, DROPPED_KEY: dropped}


class ObelicsSource:
  """Grain random-access source over OBELICS parquet files: `len()` rows, `source[i]` a record."""

  def __init__(self, paths: Sequence[str], options: ObelicsOptions | None = None,
               cached_row_groups: int = 2):
    if not paths:
      raise ValueError("ObelicsSource: no parquet paths given.")
    self.options = options or ObelicsOptions()
    self.paths = [os.fspath(p) for p in paths]
    self._names = [files.basename(p) for p in self.paths]
    group_file, group_number, group_rows, group_first_row = [], [], [], []
    for f, path in enumerate(self.paths):
      try:
        with files.open_file(path) as fp:
          parquet = pq.ParquetFile(fp)
          columns, meta = parquet.schema_arrow.names, parquet.metadata
      except Exception as e:  # pyarrow raises ArrowInvalid/OSError for non-parquet files
        raise ValueError(f"obelics: cannot read parquet metadata of {path}: {e}") from e
      missing = [c for c in COLUMNS if c not in columns]
      if missing:
        raise ValueError(f"obelics: {path} has no column(s) {missing}; it has {columns}.")
      first_row = 0
      for g in range(meta.num_row_groups):
        group_file.append(f)
        group_number.append(g)
        group_first_row.append(first_row)  # within its file, for record ids
        group_rows.append(meta.row_group(g).num_rows)
        first_row += group_rows[-1]
    self._group_file = np.asarray(group_file, np.int64)
    self._group_number = np.asarray(group_number, np.int64)
    self._group_first_row = np.asarray(group_first_row, np.int64)
    self._group_ends = np.cumsum(np.asarray(group_rows, np.int64))
    self._cached_row_groups = max(1, cached_row_groups)
    self._init_cache()

  def _init_cache(self):
    self._cache: collections.OrderedDict[int, Any] = collections.OrderedDict()
    self._lock = threading.Lock()

  def __getstate__(self):  # grain ships sources to worker processes: leave the cache behind
    state = self.__dict__.copy()
    del state["_cache"], state["_lock"]
    return state

  def __setstate__(self, state):
    self.__dict__.update(state)
    self._init_cache()

  def __len__(self) -> int:
    return int(self._group_ends[-1]) if len(self._group_ends) else 0

  def __repr__(self) -> str:
    return f"ObelicsSource({len(self.paths)} files, {len(self)} rows, options={self.options})"

  def _row_group(self, group: int):
    with self._lock:
      if group in self._cache:
        self._cache.move_to_end(group)
        return self._cache[group]
    path = self.paths[self._group_file[group]]
    with files.open_file(path) as f:
      table = pq.ParquetFile(f).read_row_group(int(self._group_number[group]),
                                               columns=list(COLUMNS))
    with self._lock:
      self._cache[group] = table
      while len(self._cache) > self._cached_row_groups:
        self._cache.popitem(last=False)
    return table

  def __getitem__(self, index: int) -> dict[str, Any]:
    index = int(index)
    if not 0 <= index < len(self):
      raise IndexError(f"ObelicsSource index {index} out of range [0, {len(self)}).")
    group = int(np.searchsorted(self._group_ends, index, side="right"))
    row = index - (int(self._group_ends[group - 1]) if group else 0)
    table = self._row_group(group)
    texts, images = (table.column(c)[row].as_py() for c in COLUMNS)
    record_id = (f"obelics/{self._names[self._group_file[group]]}:"
                 f"{int(self._group_first_row[group]) + row}")
    return build_record(texts, images, index=index, record_id=record_id, options=self.options)


def make_source(data_config: Any, split: str) -> ObelicsSource:
  """ObelicsSource from config.data: `paths` (required; see config_fields), `image_dir`,
  `max_images`, `min_image_bytes`, `single_image_keep_prob`, `on_bad_image`, `seed`, `image_size`,
  `min_image_side`, `max_image_pixels`, `max_image_bytes` (optional)."""
  data = parse(data_config)
  return ObelicsSource(config_fields.shard_paths(data, split, reader="obelics"),
                       ObelicsOptions.from_config(data))
