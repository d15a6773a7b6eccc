"""WebDataset tar shards, as OpenFlamingo trains on them, as a grain random-access record source.

Two kinds (config.data.kind):
  "pairs"        LAION image-text pairs: members KEY.jpg | KEY.png | KEY.jpeg | KEY.webp (first
                 present, in that order; OF reads "jpg;png;jpeg") and KEY.txt. Record text is OF's
                 `preprocess_laion_text` layout
                 "<image>{caption.strip()}<|endofchunk|><|endoftext|>" with the one image.
                 (OF keeps an empty caption; we drop it as "text_empty".)
  "interleaved"  MMC4 converted by OF's `convert_mmc4_to_wds.py`: one KEY.json per sample, an MMC4
                 document whose image_info entries carry "image_base64"; built by
                 `mmc4.build_record` with the same options as the jsonl reader.

Every shard's headers are scanned once at construction (`tar_index`, shards in parallel threads);
`source[i]` then reads only sample i's members. A truncated shard keeps its complete samples and
adds one index entry that raises BadRecord("truncated_shard"), so the damage is counted once per
epoch.
"""

from __future__ import annotations

import concurrent.futures
import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from vlm_jax.data import files
from vlm_jax.data.data_config import parse
from vlm_jax.data.formats import config_fields, image_payloads, mmc4, of_layout, tar_index
from vlm_jax.data.records import BadRecord

KINDS = ("pairs", "interleaved")
IMAGE_EXTENSIONS = ("jpg", "png", "jpeg", "webp")
_SLOTS = {"pairs": (IMAGE_EXTENSIONS, ("txt",)), "interleaved": (("json",),)}


class WebDatasetSource:
  """Grain random-access source over WebDataset tar shards: `len()` samples, `source[i]` a record.

  Args:
    paths: uncompressed .tar shards.
    kind: "pairs" (LAION) or "interleaved" (MMC4 json samples).
    options: MMC4 options for kind "interleaved".
    index_threads: shards indexed in parallel at construction.
  """

  def __init__(self, paths: Sequence[str], kind: str, options: mmc4.MMC4Options | None = None,
               index_threads: int = 16):
    if kind not in KINDS:
      raise ValueError(f"webdataset: kind={kind!r}; expected one of {KINDS}.")
    if not paths:
      raise ValueError("WebDatasetSource: no shard paths given.")
    self.kind = kind
    self.options = options or mmc4.MMC4Options()
    self.paths = [os.fspath(p) for p in paths]
    self._names = [files.basename(p) for p in self.paths]
    slots = _SLOTS[kind]
    workers = max(1, min(index_threads, len(self.paths)))
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
      shards = list(pool.map(lambda p: tar_index.index_shard(p, slots), self.paths))
    # One row per sample, plus one placeholder row (sample number -1) per truncated shard.
    offsets, sizes, shard_of, sample_no = [], [], [], []
    self._truncated: dict[int, str] = {}
    for s, shard in enumerate(shards):
      offsets.append(shard.offsets)
      sizes.append(shard.sizes)
      numbers = np.arange(len(shard.offsets), dtype=np.int32)
      if shard.truncated:
        self._truncated[s] = shard.truncated
        offsets.append(np.full((1, len(slots)), -1, np.int64))
        sizes.append(np.full((1, len(slots)), -1, np.int64))
        numbers = np.append(numbers, np.int32(-1))
      sample_no.append(numbers)
      shard_of.append(np.full(len(numbers), s, np.int32))
    self._offsets = np.concatenate(offsets)
    self._sizes = np.concatenate(sizes)
    self._shard_of = np.concatenate(shard_of)
    self._sample_no = np.concatenate(sample_no)

  def __len__(self) -> int:
    return len(self._shard_of)

  def __repr__(self) -> str:
    return (f"WebDatasetSource(kind={self.kind!r}, {len(self.paths)} shards, {len(self)} samples, "
            f"{len(self._truncated)} truncated)")

  def truncated_shards(self) -> dict[str, str]:
    """{shard path: why it counts as truncated}."""
    return {self.paths[s]: why for s, why in self._truncated.items()}

  def _member(self, index: int, slot: int) -> bytes | None:
    size = int(self._sizes[index, slot])
    if size < 0:
      return None
    path = self.paths[self._shard_of[index]]
    return tar_index.read_member(path, int(self._offsets[index, slot]), size)

  def __getitem__(self, index: int) -> dict[str, Any]:
    index = int(index)
    if not 0 <= index < len(self):
      raise IndexError(f"WebDatasetSource index {index} out of range [0, {len(self)}).")
    shard = int(self._shard_of[index])
    if self._sample_no[index] < 0:
      raise BadRecord("truncated_shard", f"{self.paths[shard]}: {self._truncated[shard]}")
    record_id = f"wds/{self._names[shard]}:{int(self._sample_no[index])}"
    if self.kind == "interleaved":
      raw = self._member(index, 0)
      if raw is None:
        raise BadRecord("malformed_json", f"{record_id}: sample has no .json member")
      return mmc4.build_record(raw, index=index, record_id=record_id, options=self.options)
    return self._pair(index, record_id)

  def _pair(self, index: int, record_id: str) -> dict[str, Any]:
    image, caption = self._member(index, 0), self._member(index, 1)
    if caption is None:
      raise BadRecord("text_empty", f"{record_id}: sample has no .txt member")
    if image is None:
      raise BadRecord("image_missing", f"{record_id}: sample has no "
                      f"{'/'.join('.' + e for e in IMAGE_EXTENSIONS)} member")
    caption_text = caption.decode("utf-8", errors="replace")
    if not of_layout.remove_special_tokens(caption_text).strip():
      raise BadRecord("text_empty", f"{record_id}: empty caption")
    try:
      # OF's LAION loader has no byte-size floor (that is its MMC4 rule).
      image = self.options.check_image(image, record_id, min_bytes=0)
    except image_payloads.ImageProblem as p:  # a pair has one image: without it there is nothing
      raise BadRecord(p.reason, p.detail) from None
    return {"text": of_layout.pair_text(caption_text), "images": [image], "id": record_id}


def make_source(data_config: Any, split: str) -> WebDatasetSource:
  """WebDatasetSource from config.data: `paths` (required; see config_fields), `kind` (required:
  "pairs" or "interleaved"), the image checks (`image_size`, `min_image_side`, `max_image_pixels`,
  `max_image_bytes`), and for "interleaved" the MMC4 fields (`sim_threshold`,
  `min_image_bytes`, `max_images`, `matching`, `single_image_keep_prob`, `on_bad_image`, `seed`,
  `image_dir`; see `mmc4.make_source`)."""
  reader = "webdataset"
  data = parse(data_config)
  kind = data.require("kind", reader)
  if kind not in KINDS:
    raise ValueError(f"{reader}: config.data.kind={kind!r}; expected one of {KINDS}.")
  return WebDatasetSource(config_fields.shard_paths(data, split, reader=reader), kind,
                          mmc4.MMC4Options.from_config(data, reader))
