"""Records -> model-ready numpy examples: tokenization, image/`<image>` alignment, label masking.

Two label rules from OpenFlamingo's `train_one_epoch` (see reference/flamingo.md §2.1):

  * `flamingo_labels` (MMC4 / interleaved): train the text from each `<image>` through its
    `<|endofchunk|>`; mask padding, everything before the first `<image>`, everything after an
    `<|endofchunk|>` until the next `<image>` (so the final `<|endoftext|>` is masked), and the
    `<image>` tokens themselves.
  * `pair_labels` (LAION image-text pairs): mask only padding and `<image>`; caption, `<|endofchunk|>`
    and `<|endoftext|>` are trained.

Labels are aligned with `input_ids` (label[t] is the target *at* position t); the loss shifts them.

The invariant the transforms guard: the k-th `<image>` token that survives truncation is paired with
the k-th image of the record, and no image is kept without its token.
"""

from __future__ import annotations

import re
from typing import Any

import grain
import numpy as np
import tokenizers

from vlm_jax.data import images as images_lib
from vlm_jax.data.records import BadRecord
from vlm_jax.data.tokenizer import (
  EOC_TOKEN,
  EOS_TOKEN,
  MEDIA_TOKEN,
  PAD_TOKEN,
  special_token_id,
)

IGNORE_INDEX = -100

LABEL_RULES = ("interleaved", "pairs")


def flamingo_labels(
  input_ids: np.ndarray, *, media_id: int, eoc_id: int, pad_id: int, ignore: int = IGNORE_INDEX
) -> np.ndarray:
  """OpenFlamingo MMC4 label masking.

  Args:
    input_ids: int[..., T] token ids (any leading batch dims).
    media_id, eoc_id, pad_id: ids of `<image>`, `<|endofchunk|>` and the pad token.
    ignore: label value of masked positions.

  Returns:
    int32[..., T]: input_ids where trained, `ignore` elsewhere.
  """
  ids = np.asarray(input_ids)
  positions = np.broadcast_to(np.arange(ids.shape[-1]), ids.shape)
  # Index of the latest <image> at or before t, and of the latest <|endofchunk|> strictly before t
  # (the <|endofchunk|> itself is trained); -1 when there is none.
  last_media = np.maximum.accumulate(np.where(ids == media_id, positions, -1), axis=-1)
  eoc_pos = np.where(ids == eoc_id, positions, -1)
  last_eoc_before = np.maximum.accumulate(eoc_pos, axis=-1)
  last_eoc_before = np.concatenate(
    [np.full(ids.shape[:-1] + (1,), -1), last_eoc_before[..., :-1]], axis=-1
  )
  # Inside a chunk iff an <image> opened it after the last chunk was closed; this also masks all
  # tokens before the first <image> (last_media == -1).
  inside_chunk = last_media > last_eoc_before
  keep = inside_chunk & (ids != pad_id) & (ids != media_id)
  return np.where(keep, ids, ignore).astype(np.int32)


def pair_labels(
  input_ids: np.ndarray, *, media_id: int, pad_id: int, ignore: int = IGNORE_INDEX
) -> np.ndarray:
  """OpenFlamingo LAION label masking: int32[..., T], only pads and `<image>` masked."""
  ids = np.asarray(input_ids)
  return np.where((ids == pad_id) | (ids == media_id), ignore, ids).astype(np.int32)


def pad_tokens(ids: np.ndarray, length: int, pad_id: int) -> tuple[np.ndarray, np.ndarray]:
  """Right-pads int ids to `length`; returns (int32[length] ids, int32[length] attention mask)."""
  out = np.full((length,), pad_id, np.int32)
  out[: len(ids)] = ids
  mask = np.zeros((length,), np.int32)
  mask[: len(ids)] = 1
  return out, mask


def encode_prompt(
  tokenizer: tokenizers.Tokenizer, text: str, max_len: int
) -> tuple[np.ndarray, int]:
  """Tokenizes an eval prompt (no truncation: a cut prompt would change the question).

  Returns:
    (int32[max_len] ids right-padded with the pad token, number of real tokens).

  Raises:
    ValueError: if the prompt has more than `max_len` tokens.
  """
  ids = tokenizer.encode(text, add_special_tokens=False).ids
  if len(ids) > max_len:
    raise ValueError(f"Prompt has {len(ids)} tokens, more than max_len={max_len}: {text[:80]!r}")
  padded, _ = pad_tokens(np.asarray(ids, np.int32), max_len, special_token_id(tokenizer, PAD_TOKEN))
  return padded, len(ids)


class InterleavedTransform(grain.transforms.Map):
  """Record {"images", "text"} -> {"vision_x", "input_ids", "attention_mask", "labels"}.

  Output:
    vision_x: float32[max_images, S, S, 3], CLIP-normalised, zero in padded slots (with
      image_dtype="uint8": the resized, cropped pixels, which the ViT normalises on the device).
    input_ids: int32[max_text_len], right-padded with the pad token.
    attention_mask: int32[max_text_len], 1 on real tokens.
    labels: int32[max_text_len], per `label_rule` ("interleaved" = MMC4 rule, "pairs" = LAION rule).

  Truncation keeps images and `<image>` tokens aligned: text is cut just before the
  (max_images+1)-th `<image>`, then to max_text_len, and exactly as many images are kept (the first
  ones) as `<image>` tokens survive. Every kept image goes through `images.decode_image`
  (min_image_side, max_image_pixels, min_image_bytes); one unusable image drops the whole record
  with its reason.
  """

  def __init__(
    self,
    tokenizer: tokenizers.Tokenizer,
    max_text_len: int,
    max_images: int,
    image_size: int,
    label_rule: str = "interleaved",
    *,
    min_image_side: int = images_lib.DEFAULT_MIN_SIDE,
    max_image_pixels: int | None = images_lib.DEFAULT_MAX_PIXELS,
    min_image_bytes: int = 0,
    image_dtype: str = "float32",
  ):
    if label_rule not in LABEL_RULES:
      raise ValueError(f"Unknown label_rule {label_rule!r}; expected one of {LABEL_RULES}.")
    if max_text_len < 1 or max_images < 1:
      raise ValueError(f"max_text_len={max_text_len} and max_images={max_images} must be >= 1.")
    self.tokenizer = tokenizer
    self.max_text_len, self.max_images, self.image_size = max_text_len, max_images, image_size
    self.label_rule = label_rule
    self.image_checks = dict(
      min_side=min_image_side, max_pixels=max_image_pixels, min_bytes=min_image_bytes,
      dtype=np.dtype(image_dtype))
    self.media_id = special_token_id(tokenizer, MEDIA_TOKEN)
    self.eoc_id = special_token_id(tokenizer, EOC_TOKEN)
    self.pad_id = special_token_id(tokenizer, PAD_TOKEN)

  def map(self, element: dict[str, Any]) -> dict[str, np.ndarray]:
    ids = np.asarray(self.tokenizer.encode(element["text"], add_special_tokens=False).ids, np.int32)
    record_images = element.get("images") or []
    media_pos = np.flatnonzero(ids == self.media_id)
    if len(record_images) != len(media_pos):
      # Stricter than "fewer images": with extra images we could not tell which image is whose.
      raise BadRecord(
        "image_count_mismatch",
        f"{element.get('id', 'record')} has {len(record_images)} images but its text has "
        f"{len(media_pos)} {MEDIA_TOKEN} tokens; they must match one-to-one.")
    if len(media_pos) > self.max_images:
      ids = ids[: media_pos[self.max_images]]
    ids = ids[: self.max_text_len]
    num_images = int(np.count_nonzero(ids == self.media_id))
    try:
      vision_x, _ = images_lib.stack_images(
        record_images[:num_images], self.max_images, self.image_size, **self.image_checks
      )
    except BadRecord as e:  # the whole record goes: dropping one image would misalign the rest
      raise BadRecord(e.reason, f"{element.get('id', 'record')}: {e.detail}") from None
    if element.get("flip"):  # augment.JointFlip: all images of the record flip together
      vision_x = np.ascontiguousarray(vision_x[:, :, ::-1])
    input_ids, attention_mask = pad_tokens(ids, self.max_text_len, self.pad_id)
    if self.label_rule == "interleaved":
      labels = flamingo_labels(
        input_ids, media_id=self.media_id, eoc_id=self.eoc_id, pad_id=self.pad_id
      )
    else:
      labels = pair_labels(input_ids, media_id=self.media_id, pad_id=self.pad_id)
    return {
      "vision_x": vision_x,
      "input_ids": input_ids,
      "attention_mask": attention_mask,
      "labels": labels,
    }


# One space replaces each `<image>` / `<|endofchunk|>` together with the whitespace around it, so
# words on either side never merge and no double spaces appear (which a BPE tokenizer would encode).
_MEDIA_MARKUP = re.compile(rf"(?:\s*(?:{re.escape(MEDIA_TOKEN)}|{re.escape(EOC_TOKEN)}))+\s*")
_SPACE_BEFORE_EOS = re.compile(rf"\s+(?={re.escape(EOS_TOKEN)})")


def strip_media_markup(text: str) -> str:
  """Removes `<image>`/`<|endofchunk|>` from text, keeping `<|endoftext|>`.

  "Here.<image>A red circle.<|endofchunk|><|endoftext|>" -> "Here. A red circle.<|endoftext|>".
  """
  text = _MEDIA_MARKUP.sub(" ", text)
  return _SPACE_BEFORE_EOS.sub("", text).strip()


class TextOnlyTransform(grain.transforms.Map):
  """Record {"text"} -> {"input_ids", "attention_mask", "labels"} for text-only LM training.

  Media markup is removed (`strip_media_markup`), the text tokenized, truncated and right-padded to
  max_text_len. labels = input_ids with pads set to -100 (`<|endoftext|>` is trained).
  All outputs int32[max_text_len].
  """

  def __init__(self, tokenizer: tokenizers.Tokenizer, max_text_len: int):
    if max_text_len < 1:
      raise ValueError(f"max_text_len must be >= 1, got {max_text_len}.")
    self.tokenizer = tokenizer
    self.max_text_len = max_text_len
    self.pad_id = special_token_id(tokenizer, PAD_TOKEN)

  def map(self, element: dict[str, Any]) -> dict[str, np.ndarray]:
    text = strip_media_markup(element["text"])
    ids = np.asarray(self.tokenizer.encode(text, add_special_tokens=False).ids, np.int32)
    input_ids, attention_mask = pad_tokens(ids[: self.max_text_len], self.max_text_len, self.pad_id)
    labels = np.where(attention_mask == 1, input_ids, IGNORE_INDEX).astype(np.int32)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
