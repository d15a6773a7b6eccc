"""Settings shared by the interleaved-document readers (MMC4, OBELICS, MMC4-in-tar), read from
`config.data` fields of the same names, validated with errors that name the reader and the field."""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, ClassVar

from vlm_jax.data.formats import config_fields, image_payloads, of_layout
from vlm_jax.data.records import BadRecord

BAD_IMAGE_POLICIES = ("skip", "drop")


@dataclasses.dataclass(frozen=True)
class DocumentOptions:
  """on_bad_image: "skip" leaves a missing / empty / non-image file out of the document (OpenFlamingo's
  behaviour for images that were never downloaded); "drop" drops the whole document with that image's
  reason. Images under min_image_bytes are always just skipped (OpenFlamingo's size filter)."""

  READER: ClassVar[str] = "documents"

  max_images: int = 6
  min_image_bytes: int = 0
  single_image_keep_prob: float = 1.0
  on_bad_image: str = "skip"
  seed: int = 0
  image_dir: str | None = None

  def __post_init__(self):
    r = self.READER
    if self.max_images < 1:
      raise ValueError(f"{r}: max_images must be >= 1, got {self.max_images}.")
    if self.min_image_bytes < 0:
      raise ValueError(f"{r}: min_image_bytes must be >= 0, got {self.min_image_bytes}.")
    if not 0.0 <= self.single_image_keep_prob <= 1.0:
      raise ValueError(f"{r}: single_image_keep_prob={self.single_image_keep_prob} not in [0, 1].")
    if self.on_bad_image not in BAD_IMAGE_POLICIES:
      raise ValueError(f"{r}: on_bad_image={self.on_bad_image!r}; expected {BAD_IMAGE_POLICIES}.")
    if self.seed < 0:
      raise ValueError(f"{r}: seed must be >= 0, got {self.seed}.")

  def usable_image(self, fetch: Callable[[], bytes], what: str,
                   problems: list) -> bytes | None:
    """The image's bytes if usable; None after noting its problem in `problems` (the image is left
    out); raises BadRecord when `on_bad_image="drop"` (size-floor misses are always just left out)."""
    try:
      return image_payloads.check_image_bytes(fetch(), self.min_image_bytes, what)
    except image_payloads.ImageProblem as p:
      if self.on_bad_image == "drop" and p.reason != "image_too_small":
        raise BadRecord(p.reason, p.detail) from None
      problems.append(p)
      return None

  def check_single_image(self, text: str, placed: int, index: int, record_id: str) -> None:
    """OF's rules for a laid-out document with one image (`placed` images in `text`): no text after
    it -> BadRecord "image_only_at_end"; else kept with probability `single_image_keep_prob`, a coin
    of (seed, index) -> BadRecord "single_image_dropped"."""
    if placed != 1:
      return
    if of_layout.single_image_without_text(text):
      raise BadRecord("image_only_at_end", f"{record_id}: no text follows the only image")
    if not of_layout.keep_single_image(self.seed, index, self.single_image_keep_prob):
      raise BadRecord("single_image_dropped", record_id)

  @classmethod
  def from_config(cls, config: Any, reader: str | None = None):
    """Every field from config.data (all optional; absent -> the class default)."""
    reader = reader or cls.READER
    defaults = cls()
    kwargs = {}
    for f in dataclasses.fields(cls):
      if f.name == "image_dir":
        kwargs[f.name] = config_fields.image_dir(config, reader=reader)
        continue
      default = getattr(defaults, f.name)
      kwargs[f.name] = type(default)(config_fields.field(config, f.name, default, reader=reader))
    return cls(**kwargs)
