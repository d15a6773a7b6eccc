"""Record -> example transforms with OpenFlamingo's settings for its two web corpora.

  * LAION pairs: `laion_transform`, the "pairs" label rule (caption, `<|endofchunk|>` and eos
    trained), one image, 32 tokens (OF's `preprocess_laion_text` max_tokens).
  * MMC4 / OBELICS documents: `InterleavedDocTransform`, the "interleaved" label rule, 6 images,
    256 tokens (OF's `preprocess_interleaved`), plus OF's checks on the tokenized, truncated text.

OF rejects an MMC4 document after tokenizing it when fewer than `min_num_images` (1) `<image>`
tokens survive the 256-token truncation, and when its only `<image>` is the last token ("labels will
all be -100", which made its loss NaN, open_flamingo #215). `InterleavedDocTransform` raises
BadRecord "no_image" for the first and "image_only_at_end" for any example whose labels train
nothing, which is OF's case and the only way it arises with the interleaved rule (every chunk is
`<image>` + text).
The synthetic source keeps using the plain `InterleavedTransform`.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import tokenizers

from vlm_jax.data.interleaved import IGNORE_INDEX, InterleavedTransform
from vlm_jax.data.records import BadRecord

LAION_MAX_TEXT_LEN = 32
MMC4_MAX_TEXT_LEN = 256
MMC4_MAX_IMAGES = 6


def laion_transform(
  tokenizer: tokenizers.Tokenizer, image_size: int, max_text_len: int = LAION_MAX_TEXT_LEN,
  **image_checks: Any,
) -> InterleavedTransform:
  """OF's LAION example: one image slot, `max_text_len` tokens, pair labels. `image_checks` go to
  `InterleavedTransform` unchanged."""
  return InterleavedTransform(tokenizer, max_text_len=max_text_len, max_images=1,
                              image_size=image_size, label_rule="pairs", **image_checks)


class InterleavedDocTransform(InterleavedTransform):
  """`InterleavedTransform` with the interleaved label rule and OF's post-truncation rejections.

  Same outputs as `InterleavedTransform` (vision_x float32[max_images, S, S, 3], input_ids /
  attention_mask / labels int32[max_text_len]); `image_checks` go to `InterleavedTransform`.
  """

  def __init__(self, tokenizer: tokenizers.Tokenizer, image_size: int,
               max_text_len: int = MMC4_MAX_TEXT_LEN, max_images: int = MMC4_MAX_IMAGES,
               **image_checks: Any):
    super().__init__(tokenizer, max_text_len=max_text_len, max_images=max_images,
                     image_size=image_size, label_rule="interleaved", **image_checks)

  def map(self, element: dict[str, Any]) -> dict[str, np.ndarray]:
    example = super().map(element)
    record_id = element.get("id", "record")
    if not np.any(example["input_ids"] == self.media_id):
      raise BadRecord("no_image", f"{record_id}: no <image> within the first "
                      f"{self.max_text_len} tokens")
    if np.all(example["labels"] == IGNORE_INDEX):
      raise BadRecord("image_only_at_end", f"{record_id}: truncation to {self.max_text_len} "
                      "tokens leaves no text after the images")
    return example
