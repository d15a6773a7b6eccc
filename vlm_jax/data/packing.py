"""Sequence packing: several short examples (image-caption pairs) in one row.

A LAION pair is ~17 tokens and one image (reference/flamingo.md §2.2), so a row of max_text_len
tokens padded per example is mostly padding. Packing puts examples back to back in a row of
max_text_len tokens and max_images image slots, with grain's first-fit packer
(`grain.experimental.FirstFitPackIterDataset`):

  input_ids    int32[T]   <image> a red circle <eoc> <eos> <image> a blue ... <pad> <pad>
  segment_ids  int32[T]   1       1 1   1      1     1     2       2 2         0     0
  attention_mask int32[T] segment_ids > 0
  labels       int32[T]   each example's own labels (per its label rule), and -100 at the first
                          token of every example, so the last token of example j is never trained
                          to predict the first token of example j+1 (alone, that label is never a
                          target either)
  vision_x     float32[max_images, S, S, 3]   the examples' images in packing order, zero after

The model keeps examples apart with `segment_ids` (block-diagonal causal self-attention,
positions restarting per example: `vlm_jax.layers.segments`). The gated xattn needs no extra mask:
text token t sees image cumsum(<image>)[t], which is its own example's image *provided every example
starts with its `<image>`*; the packer checks that for every example (and that the k-th `<image>` of
a row is its k-th image), and refuses data that breaks it.

Config: `config.data.packing_bins = N` (0 = no packing): grain fills N rows at once, each example
going to the first row it fits in (more rows, less padding, more memory). `max_text_len` and
`max_images` size the row, so for pairs `max_images` also caps the examples per row. Rows are
batched to the trainer's batch size as usual; the batch gains `inputs["segment_ids"]`.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import grain
import numpy as np

from vlm_jax.data import streams
from vlm_jax.data.data_config import DataConfig, parse
from vlm_jax.data.interleaved import IGNORE_INDEX
from vlm_jax.data.tokenizer import MEDIA_TOKEN, PAD_TOKEN, load_tokenizer, special_token_id


def trim_example(example: dict, *, media_id: int) -> dict[str, np.ndarray]:
  """A padded example {"inputs": {...}, "labels"} -> its real part, ready for the packer.

  Returns {"input_ids", "labels"} int32[n] (labels[0] = -100) and, for image data, "vision_x"
  float32[k, S, S, 3] with k = number of `<image>` tokens.

  Raises:
    ValueError: an image example that does not start with `<image>`: packed after another example,
      its first tokens would attend to that example's image.
  """
  inputs = example["inputs"]
  n = int(np.count_nonzero(inputs["attention_mask"]))  # right-padded: the real tokens come first
  ids = inputs["input_ids"][:n]
  labels = example["labels"][:n].copy()
  labels[:1] = IGNORE_INDEX
  out = {"input_ids": ids, "labels": labels}
  if "vision_x" in inputs:
    if n == 0 or ids[0] != media_id:
      raise ValueError(
        f"packing: every packed example must start with its {MEDIA_TOKEN} token (id {media_id}) so "
        f"that no token sees an earlier example's image; got first ids {ids[:8].tolist()}. Pack "
        f"image-caption pairs (kind 'pairs'), not documents that start with text.")
    out["vision_x"] = inputs["vision_x"][: int(np.count_nonzero(ids == media_id))]
  return out


def finish_row(row: dict, *, media_id: int) -> dict[str, np.ndarray]:
  """grain's packed row -> the layout of the module docstring, checking the image invariants."""
  seg = row["input_ids_segment_ids"]
  ids = row["input_ids"]
  out = {"input_ids": ids, "attention_mask": (seg > 0).astype(np.int32), "segment_ids": seg,
         "labels": row["labels"]}
  if "vision_x" in row:
    starts = np.flatnonzero((seg > 0) & (seg != np.concatenate([[0], seg[:-1]])))
    media_segments = seg[ids == media_id]
    image_segments = row["vision_x_segment_ids"]
    if (ids[starts] != media_id).any() or not np.array_equal(
        media_segments, image_segments[: len(media_segments)]) or image_segments[
          len(media_segments):].any():
      raise ValueError(f"packing: images and {MEDIA_TOKEN} tokens are misaligned in a packed row "
                       f"(token segments {media_segments.tolist()}, image segments "
                       f"{image_segments.tolist()}).")
    out["vision_x"] = row["vision_x"]
  return out


class Packed(grain.IterDataset):
  """Packed rows of an example stream, batched; `counters()` are the stream's."""

  def __init__(self, examples: grain.IterDataset, *, batch_size: int, max_text_len: int,
               max_images: int | None, num_bins: int, pad_id: int, media_id: int):
    super().__init__(examples)
    self._batch_size, self._num_bins = batch_size, num_bins
    self._media_id = media_id
    self._lengths = {"input_ids": max_text_len, "labels": max_text_len}
    self._padding = {"input_ids": pad_id, "labels": IGNORE_INDEX}
    if max_images is not None:
      self._lengths["vision_x"], self._padding["vision_x"] = max_images, 0.0

  def _trim(self, batch_of_one):
    example = trim_example(streams.first_example(batch_of_one), media_id=self._media_id)
    if ("vision_x" in example) != ("vision_x" in self._lengths):
      raise ValueError("packing: examples have images but the packer was built without max_images "
                       "(or the other way round).")
    return example

  def __iter__(self) -> streams.Counted:
    examples = self._parent.__iter__()
    packed = grain.experimental.FirstFitPackIterDataset(
      streams.Started(examples).map(self._trim), length_struct=self._lengths,
      num_packing_bins=self._num_bins, padding_struct=self._padding, shuffle_bins=False)
    rows = packed.map(lambda row: finish_row(row, media_id=self._media_id))
    batches = rows.batch(self._batch_size, drop_remainder=True, batch_fn=streams.collate)
    return streams.Counted(batches.__iter__(), {"": examples})

  def __str__(self) -> str:
    return f"Packed(num_bins={self._num_bins}, lengths={self._lengths})"


def packer(data_config: DataConfig | Any, *,
           batch_size: int) -> Callable[[grain.IterDataset], Packed]:
  """The stage `make_dataset` puts after its one-example batches when `config.data.packing_bins` is
  set: examples -> packed rows (module docstring), batched to `batch_size`; the batch is
  make_dataset's plus `inputs["segment_ids"]` int32[B, T]. Checks the config before any source is
  built."""
  data = parse(data_config)
  num_bins = data.packing_bins
  if num_bins < 1:
    raise ValueError(f"config.data.packing_bins must be >= 1 to pack, got {num_bins}.")
  if data.source == "llava":
    raise ValueError("config.data.packing_bins: packing takes Flamingo-layout examples (image-caption "
                     "pairs), not source 'llava'.")
  tokenizer = load_tokenizer(data.require("tokenizer", "packing"))
  has_images = data.kind != "text"
  return functools.partial(
    Packed, batch_size=batch_size, max_text_len=data.require("max_text_len", "packing"),
    max_images=data.require("max_images", "packing") if has_images else None,
    num_bins=num_bins, pad_id=special_token_id(tokenizer, PAD_TOKEN),
    media_id=special_token_id(tokenizer, MEDIA_TOKEN))
