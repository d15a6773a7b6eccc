"""The record every source yields, and how bad records are skipped and counted.

A *record* is a plain dict that every source produces and every transform consumes:

  {"text": str,      # OpenFlamingo layout: "<image>" marks each image's position; chunks end with
                     # "<|endofchunk|>", the document with "<|endoftext|>" (sources build this layout)
   "images": list,   # one entry per "<image>", in order: encoded bytes, PIL image or uint8 array
   "id": str}        # where it came from ("mmc4/shard_00003.jsonl:17"), for logs and counters

Format readers and transforms signal a record they cannot use by raising `BadRecord(reason, detail)`;
`skipping(fn)` turns that into a `Skip` marker that travels down the pipeline in place of the example,
and `vlm_jax.data.counting` drops it, counts it under its reason and reports the counts. A run never
crashes on data, and a record is dropped whole (never with some images removed from under their
`<image>` tokens).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

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
)


class BadRecord(ValueError):
  """Raised by readers/transforms for a record that must be skipped; `reason` is one of REASONS."""

  def __init__(self, reason: str, detail: str = ""):
    if reason not in REASONS:
      raise ValueError(f"unknown bad-record reason {reason!r}; add it to vlm_jax.data.records.REASONS")
    super().__init__(f"{reason}: {detail}" if detail else reason)
    self.reason, self.detail = reason, detail


@dataclasses.dataclass(frozen=True)
class Skip:
  """Stands in for an example that was dropped; carries the reason and where it came from."""

  reason: str
  detail: str = ""


def skipping(fn: Callable[[Any], Any]) -> Callable[[Any], Any]:
  """`fn` (a function or a grain `transforms.Map`) with `BadRecord` turned into a `Skip` marker (and
  a `Skip` input passed through)."""
  call = fn.map if hasattr(fn, "map") else fn

  def wrapped(element):
    if isinstance(element, Skip):
      return element
    try:
      return call(element)
    except BadRecord as e:
      return Skip(e.reason, e.detail)
  wrapped.__name__ = getattr(fn, "__name__", type(fn).__name__)
  return wrapped
