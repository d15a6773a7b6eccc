"""The record every source yields, and how bad records are skipped and counted.

A *record* is a plain dict that every source produces and every transform consumes:

  {"text": str,      # OpenFlamingo layout: "<image>" marks each image's position; chunks end with
                     # "<|endofchunk|>", the document with "<|endoftext|>" (sources build this layout)
   "images": list,   # one entry per "<image>", in order: a CheckedImage (web readers), encoded
                     # bytes, a file path, a PIL image or a uint8 array
   "id": str,        # where it came from ("mmc4/shard_00003.jsonl:17"), for logs and counters
   "dropped_images": {reason: n}}  # optional: images the reader left out of the document

Format readers and transforms signal a record they cannot use by raising `BadRecord(reason, detail)`;
`skipping(fn)` turns that into a `Skip` marker that travels down the pipeline in place of the example,
and `vlm_jax.data.counting` drops it, counts it under its reason and reports the counts. Any other
exception a record raises (a parser bug, a MemoryError, a warning turned into an error) becomes a
`Skip` with reason "record_error", logged with its traceback the first few times: no exception from
one record reaches the training loop.

Images are judged before the text is laid out: a web reader decodes each image (`CheckedImage`),
leaves unusable ones out of the document before it places `<image>` tokens (counted per reason under
"dropped_images"), so an `<image>` token never loses its image and a bad image costs only itself.
"""

from __future__ import annotations

import dataclasses
import logging
import traceback
from typing import Any, Callable

import numpy as np

# Why a record was dropped (or, for the `fixed_*` kinds, repaired and kept). Counters use these names.
REASONS = (
  "image_undecodable",      # corrupt / truncated / not an image
  "image_missing",          # file named by the record does not exist
  "image_empty",            # zero-byte file or empty payload
  "image_too_small",        # below the configured minimum side / byte size (OpenFlamingo drops tiny images)
  "image_too_large",        # above the pixel budget (decompression bomb guard)
  "text_empty",             # no text left after cleaning
  "no_image",               # interleaved record with no usable image (or none survives truncation)
  "image_only_at_end",      # the only <image> is the last token: nothing to learn from it
  "image_count_mismatch",   # images and <image> tokens disagree and cannot be reconciled
  "malformed_json",         # a jsonl line / json member that does not parse or lacks fields
  "truncated_shard",        # a tar shard that ends mid-member
  "single_image_dropped",   # OpenFlamingo keeps single-image MMC4 documents with probability 0.5
  "no_target_tokens",       # nothing left to train on: every answer token was cut by truncation
  "image_duplicate",        # an image name seen before in the same document (the first one is kept)
  "record_error",           # any other exception while reading or transforming the record
)

DROPPED_KEY = "dropped_images"
# Unexpected exceptions are logged with their traceback this many times per process, then counted only.
_LOGGED_ERRORS_MAX = 5
_logged_errors = 0


class BadRecord(ValueError):
  """Raised by readers/transforms for a record that must be skipped; `reason` is one of REASONS.

  `dropped_images` ({reason: n}) counts the images the reader had already left out of it.
  """

  def __init__(self, reason: str, detail: str = "", dropped_images: dict[str, int] | None = None):
    if reason not in REASONS:
      raise ValueError(f"unknown bad-record reason {reason!r}; add it to vlm_jax.data.records.REASONS")
    super().__init__(f"{reason}: {detail}" if detail else reason)
    self.reason, self.detail = reason, detail
    self.dropped_images = dict(dropped_images or {})


@dataclasses.dataclass(frozen=True)
class Skip:
  """Stands in for an example that was dropped; carries the reason and where it came from, and the
  images its reader had left out ({reason: n})."""

  reason: str
  detail: str = ""
  dropped_images: dict[str, int] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True, eq=False)
class CheckedImage:
  """An image a reader has fully decoded and checked (`images.check_image`).

  encoded: the original file bytes (what a TFDS build stores).
  pixels: uint8[S, S, 3], the CLIP crop (shortest side resized to S, centre crop, not normalised)
    when the reader knew the training image size S; None when it only validated. The transform uses
    it as is, so each image is decoded once.
  """

  encoded: bytes
  pixels: np.ndarray | None = None

  def __eq__(self, other: object) -> bool:  # by value (dataclass eq would compare arrays with ==)
    if not isinstance(other, CheckedImage):
      return NotImplemented
    if self.encoded != other.encoded or (self.pixels is None) != (other.pixels is None):
      return False
    return self.pixels is None or np.array_equal(self.pixels, other.pixels)

  __hash__ = None  # mutable pixels: unhashable, like the dict records that hold it


def skip_for_error(error: BaseException, where: str) -> Skip:
  """The `Skip` for an unexpected exception of one record; the first few are logged in full."""
  global _logged_errors
  detail = f"{where}: {type(error).__name__}: {error}"[:500]
  if _logged_errors < _LOGGED_ERRORS_MAX:
    _logged_errors += 1
    logging.warning("data: skipping a record after an unexpected error (%d of the first %d logged):"
                    " %s\n%s", _logged_errors, _LOGGED_ERRORS_MAX, detail,
                    "".join(traceback.format_exception(error)))
  return Skip("record_error", detail)


def skipping(fn: Callable[[Any], Any]) -> Callable[[Any], Any]:
  """`fn` (a function or a grain `transforms.Map`) with `BadRecord` (and any other exception) turned
  into a `Skip` marker, a `Skip` input passed through, and the record's "dropped_images" counts
  carried onto the example (or the Skip)."""
  call = fn.map if hasattr(fn, "map") else fn

  def wrapped(element):
    if isinstance(element, Skip):
      return element
    dropped = element.get(DROPPED_KEY) if isinstance(element, dict) else None
    try:
      out = call(element)
    except BadRecord as e:
      return Skip(e.reason, e.detail, {**(dropped or {}), **e.dropped_images})
    except Exception as e:  # pylint: disable=broad-except  # one record must never stop a run
      where = element.get("id", "record") if isinstance(element, dict) else "record"
      skip = skip_for_error(e, str(where))
      return Skip(skip.reason, skip.detail, dict(dropped or {}))
    if dropped and isinstance(out, dict):
      out[DROPPED_KEY] = dict(dropped)
    return out
  wrapped.__name__ = getattr(fn, "__name__", type(fn).__name__)
  return wrapped
