"""MMC4 interleaved documents (jsonl shards) as a grain random-access source of records.

One document per line: {"text_list": [sentence, ...],
                        "image_info": [{"image_name", "matched_text_index", "matched_sim",
                                        "raw_url"?, "image_base64"?}, ...],
                        "similarity_matrix": [[sim(image i, sentence j) ...] per image]}
An image's bytes come from its "image_base64" (as OpenFlamingo's `convert_mmc4_to_wds.py` writes
them) or else from `image_dir/<image_name>`.

`build_record` turns one document into a record ({"text", "images", "id"}, see `records.py`) the way
OpenFlamingo's `preprocess_interleaved` (repository main branch) does, up to tokenization:

  1. images without bytes or under `min_image_bytes` are left out (OF: no "image_base64" -> skipped;
     `len(bytes) // 1000 <= 10` -> skipped, i.e. under 11,000 bytes); so is every image that does
     not decode or fails the size limits (`DocumentOptions`; OF would crash or drop the document on
     those, reference/flamingo.md §2.2), and a repeated `image_name` (the first one stays). Each is
     counted under `dropped_images/<reason>`; `on_bad_image="drop_record"` drops the document;
  2. the remaining images are matched one-to-one to sentences on the similarity matrix (Hungarian,
     maximum total similarity; `matching="argmax"` is the PyPI release's rule) and pairs with
     similarity < `sim_threshold` are dropped. The default 0.24 is what OF's README and paper use;
     OF's argparse default of 30 would drop every image of CLIP cosine similarities;
  3. the images are listed in TEXT order. OF lists them in image order while its `<image>` tokens
     follow sentence order, so the k-th token can get another sentence's image: a bug, not a choice;
  4. the text is laid out by `of_layout.interleave` (at most `max_images` images);
  5. documents with no image left -> "no_image" (or, when every listed image was unusable, that
     image problem's reason, so the counters say why); a single image with no text after it ->
     "image_only_at_end"; other single-image documents are kept with probability
     `single_image_keep_prob` (OF: 0.5) -> "single_image_dropped", decided by (seed, index).

OF applies the last two rules after tokenizing and truncating to 256 tokens; records are not
tokenized yet, so here they see the untruncated document and `transforms.InterleavedDocTransform`
repeats OF's token-level checks after truncation.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from typing import Any, ClassVar

import numpy as np

from vlm_jax.data import files
from vlm_jax.data.formats import config_fields, image_payloads, matching, of_layout
from vlm_jax.data.data_config import parse
from vlm_jax.data.formats.doc_options import DocumentOptions
from vlm_jax.data.formats.line_index import LineIndex
from vlm_jax.data.records import DROPPED_KEY, BadRecord, CheckedImage

@dataclasses.dataclass(frozen=True)
class MMC4Options(DocumentOptions):
  """How MMC4 documents become records (defaults: OpenFlamingo's training settings); the shared
  fields are `DocumentOptions`'."""

  READER: ClassVar[str] = "mmc4"

  min_image_bytes: int = 11_000
  single_image_keep_prob: float = 0.5
  sim_threshold: float = 0.24
  matching: str = "hungarian"

  def __post_init__(self):
    super().__post_init__()
    if self.matching not in matching.METHODS:
      raise ValueError(f"mmc4: matching={self.matching!r}; expected one of {matching.METHODS}.")


def parse_document(raw: bytes | str | dict, record_id: str) -> dict[str, Any]:
  """One document (JSON text or its parsed object) with its three fields checked.

  Returns {"sentences": list[str], "infos": list[dict], "sim": float64[num_images, num_sentences]}.

  Raises:
    BadRecord("malformed_json"): unparseable JSON, or a field missing or of the wrong shape.
  """
  doc = raw
  if not isinstance(raw, dict):
    try:
      doc = json.loads(raw)
    except ValueError as e:  # JSONDecodeError and UnicodeDecodeError
      raise BadRecord("malformed_json", f"{record_id}: {e}") from None
  if not isinstance(doc, dict):
    raise BadRecord("malformed_json",
                    f"{record_id}: expected a JSON object, got {type(doc).__name__}")
  if "is_gpt" in doc:
    raise BadRecord("malformed_json", f"{record_id}: ChatGPT-generated ('is_gpt') documents are "
                    "not supported by the MMC4 reader")
  sentences, infos = doc.get("text_list"), doc.get("image_info")
  if not isinstance(sentences, list) or not all(isinstance(s, str) for s in sentences):
    raise BadRecord("malformed_json", f"{record_id}: 'text_list' must be a list of strings")
  if not isinstance(infos, list) or not all(isinstance(i, dict) for i in infos):
    raise BadRecord("malformed_json", f"{record_id}: 'image_info' must be a list of objects")
  try:
    sim = np.asarray(doc.get("similarity_matrix"), np.float64)
  except (TypeError, ValueError) as e:
    raise BadRecord("malformed_json", f"{record_id}: bad 'similarity_matrix' ({e})") from None
  if infos and (sim.shape != (len(infos), len(sentences)) or not np.isfinite(sim).all()):
    raise BadRecord("malformed_json", f"{record_id}: 'similarity_matrix' has shape {sim.shape}, "
                    f"expected finite [{len(infos)} images, {len(sentences)} sentences]")
  return {"sentences": sentences, "infos": infos, "sim": sim}


def image_bytes(info: dict[str, Any], image_dir: str | None, what: str) -> bytes:
  """One image's encoded bytes: "image_base64" if present, else image_dir/<image_name>."""
  payload = info.get("image_base64")
  if payload is not None:
    return image_payloads.decode_base64(payload, what)
  return image_payloads.read_image_file(image_dir, info.get("image_name"), what)


def _usable_images(
  infos: Sequence[dict], options: MMC4Options, record_id: str
) -> tuple[list[int], list[CheckedImage], list[image_payloads.ImageProblem]]:
  """(rows of `infos` whose image is usable, their checked images, the problems of the others)."""
  rows, payloads, names = [], [], set()
  problems: list[image_payloads.ImageProblem] = []
  for i, info in enumerate(infos):
    name = info.get("image_name")
    what = f"{record_id} image {i} ({name if name is not None else '?'})"
    if isinstance(name, str) and name:
      if name in names:
        problems.append(image_payloads.ImageProblem(
          "image_duplicate", f"{what}: listed before in this document", floor=True))
        continue
      names.add(name)
    data = options.usable_image(
      lambda: image_bytes(info, options.image_dir, what), what, problems)  # noqa: B023
    if data is None:
      continue
    rows.append(i)
    payloads.append(data)
  if not rows:
    raise image_payloads.no_usable_image(problems, record_id)
  return rows, payloads, problems


def build_record(
  raw: bytes | str | dict, *, index: int, record_id: str, options: MMC4Options
) -> dict[str, Any]:
  """One MMC4 document (a jsonl line, or its parsed dict) -> {"text", "images", "id"}.

  Raises:
    BadRecord: with the reasons listed in the module docstring.
  """
  doc = parse_document(raw, record_id)
  rows, payloads, problems = _usable_images(doc["infos"], options, record_id)
  dropped = image_payloads.dropped_counts(problems)
  pairs = matching.assign_images(doc["sim"][rows], options.sim_threshold, options.matching)
  if not pairs:
    raise BadRecord("no_image", f"{record_id}: no image-sentence similarity >= "
                    f"sim_threshold={options.sim_threshold} among {len(rows)} usable images",
                    dropped)
  pairs.sort(key=lambda p: (p[1], p[0]))  # text order; argmax ties keep image order
  text, placed = of_layout.interleave(doc["sentences"], [s for _, s in pairs], options.max_images)
  try:
    options.check_single_image(text, placed, index, record_id)
  except BadRecord as e:
    raise BadRecord(e.reason, e.detail, dropped) from None
  return {"text": text, "images": [payloads[r] for r, _ in pairs[:placed]], "id": record_id,
          DROPPED_KEY: dropped}


class MMC4Source:
  """Grain random-access source over MMC4 jsonl shards: `len()` documents, `source[i]` a record.

  The line offsets of every shard are indexed once at construction (`LineIndex`); `source[i]` reads
  one line and raises `BadRecord` for a document that cannot become a record.
  """

  def __init__(self, paths: Sequence[str], options: MMC4Options | None = None,
               index_threads: int = 16):
    if not paths:
      raise ValueError("MMC4Source: no shard paths given.")
    self.options = options or MMC4Options()
    self._index = LineIndex(paths, num_threads=index_threads)
    self._names = [files.basename(p) for p in self._index.paths]

  def __len__(self) -> int:
    return len(self._index)

  def __repr__(self) -> str:
    return (f"MMC4Source({len(self._names)} shards, {len(self)} documents, "
            f"options={self.options})")

  def __getitem__(self, index: int) -> dict[str, Any]:
    index = int(index)
    shard, line, raw = self._index.read(index)
    return build_record(raw, index=index, record_id=f"mmc4/{self._names[shard]}:{line}",
                        options=self.options)


def make_source(data_config: Any, split: str) -> MMC4Source:
  """MMC4Source from config.data: `paths` (required; see config_fields), `image_dir`,
  `sim_threshold`, `min_image_bytes`, `max_images`, `matching`, `single_image_keep_prob`,
  `on_bad_image`, `seed`, `image_size`, `min_image_side`, `max_image_pixels`, `max_image_bytes`
  (all optional, OpenFlamingo's values by default)."""
  data = parse(data_config)
  return MMC4Source(config_fields.shard_paths(data, split, reader="mmc4"),
                    MMC4Options.from_config(data))

