"""OpenFlamingo's text layout for web corpora: where `<image>`, `<|endofchunk|>` and eos go.

From `open_flamingo/train/data.py` (reference/flamingo.md §2.2):

  * LAION pairs (`preprocess_laion_text`): "<image>" + caption.strip() + "<|endofchunk|>" + eos.
  * MMC4 documents (`preprocess_interleaved`): each matched sentence is prefixed with
    "<|endofchunk|><image>", sentences are joined with single spaces, the FIRST "<|endofchunk|>" is
    removed, single spaces around the special tokens are removed, and "<|endofchunk|>" + eos is
    appended. So a chunk runs from its `<image>` up to the next `<image>` (sentences without an
    image belong to the chunk before them), every chunk ends with `<|endofchunk|>`, text before the
    first image belongs to no chunk, and the document ends "...<|endofchunk|><|endoftext|>".

Where we differ from OpenFlamingo, on purpose:
  * Literal special-token strings inside web text are removed first; OF leaves them, so a page that
    contains the text "<image>" gets an extra image token with no image behind it.
  * At most `max_images` images are placed, and the text is cut just before the image that would be
    the (max_images+1)-th, which is the rule `InterleavedTransform` applies to longer records. OF
    keeps the first max_images *image tensors* but still writes an `<image>` for every matched
    sentence, so its later tokens point at zero-padded slots.
"""

from __future__ import annotations

import collections
from collections.abc import Sequence

import numpy as np

from vlm_jax.data.special_tokens import EOC_TOKEN, EOS_TOKEN, MEDIA_TOKEN, SPECIAL_TOKENS

# Keeps the coin of `keep_single_image` apart from any other random stream keyed by (seed, index).
_SINGLE_IMAGE_STREAM = 0x51_16_1E


def remove_special_tokens(text: str) -> str:
  """`text` with every literal special-token string (`<image>`, `<|endofchunk|>`, ...) removed."""
  for token in SPECIAL_TOKENS:
    if token in text:
      text = text.replace(token, "")
  return text


def pair_text(caption: str) -> str:
  """OF's LAION layout: "<image>{caption.strip()}<|endofchunk|><|endoftext|>"."""
  return f"{MEDIA_TOKEN}{remove_special_tokens(caption).strip()}{EOC_TOKEN}{EOS_TOKEN}"


def interleave(
  sentences: Sequence[str], image_slots: Sequence[int], max_images: int
) -> tuple[str, int]:
  """OF's MMC4 layout of a document.

  Args:
    sentences: the document's text pieces, in order.
    image_slots: for each image, in the order its bytes will be listed, the index of the sentence it
      goes before (len(sentences) = after the last one); must be non-decreasing.
    max_images: at most this many images are placed (the first ones); the text is cut just before
      the next one.

  Returns:
    (text, number of images placed, = min(len(image_slots), max_images)).

  Example: sentences ["A.", "B.", "C.", "D."], image_slots [1, 3] ->
    "A.<image>B. C.<|endofchunk|><image>D.<|endofchunk|><|endoftext|>".
  """
  slots = [int(s) for s in image_slots]
  if any(b < a for a, b in zip(slots, slots[1:])):
    raise ValueError(f"image_slots must be non-decreasing, got {slots}.")
  if slots and not 0 <= slots[0] <= slots[-1] <= len(sentences):
    raise ValueError(f"image_slots {slots} out of range for {len(sentences)} sentences.")
  placed = min(len(slots), max_images)
  cut = slots[placed] if len(slots) > placed else len(sentences)
  markers = collections.Counter(slots[:placed])
  marker = EOC_TOKEN + MEDIA_TOKEN
  parts = [marker * markers[i] + remove_special_tokens(s) for i, s in enumerate(sentences[:cut])]
  if markers[cut]:  # images placed right at the cut (or after the last sentence) have no text
    parts.append(marker * markers[cut])
  text = " ".join(parts).replace(EOC_TOKEN, "", 1)
  text = (text.replace(" " + EOC_TOKEN, EOC_TOKEN).replace(MEDIA_TOKEN + " ", MEDIA_TOKEN)
          .replace(" " + MEDIA_TOKEN, MEDIA_TOKEN))
  return f"{text}{EOC_TOKEN}{EOS_TOKEN}", placed


def single_image_without_text(text: str) -> bool:
  """True when `text` has exactly one `<image>` and nothing but whitespace follows it in its chunk.

  The record-level form of OF's "only image is the last token" rejection: such a document has no
  text conditioned on its image, so its interleaved labels train nothing but `<|endofchunk|>`.
  """
  if text.count(MEDIA_TOKEN) != 1:
    return False
  chunk = text.split(MEDIA_TOKEN, 1)[1].split(EOC_TOKEN, 1)[0]
  return not chunk.replace(EOS_TOKEN, "").strip()


def keep_single_image(seed: int, index: int, keep_prob: float) -> bool:
  """OF keeps single-image MMC4 documents with probability 0.5 (`random.random() <= 0.5` -> drop).

  Here the coin is a pure function of (seed, index), so reruns, workers and restored iterators make
  the same choice for the same record.
  """
  if keep_prob >= 1.0:
    return True
  u = np.random.default_rng([int(seed), _SINGLE_IMAGE_STREAM, int(index)]).random()
  return bool(u < keep_prob)
