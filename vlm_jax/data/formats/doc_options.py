"""Settings shared by the interleaved-document readers (MMC4, OBELICS, MMC4-in-tar), read from
`config.data` fields of the same names, validated with errors that name the reader and the field."""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, ClassVar

from vlm_jax.data import images
from vlm_jax.data.data_config import DataConfig, parse
from vlm_jax.data.formats import config_fields, image_payloads, of_layout
from vlm_jax.data.records import BadRecord, CheckedImage

BAD_IMAGE_POLICIES = ("drop_image", "drop_record")


@dataclasses.dataclass(frozen=True)
class DocumentOptions:
  """on_bad_image: "drop_image" (default) leaves an unusable image (missing, empty, undecodable,
  truncated, a side < min_image_side, over max_image_pixels or max_image_bytes) out of the document
  before its `<image>` tokens are placed, so the document keeps its other images; "drop_record"
  drops the whole document with that image's reason (OpenFlamingo's behaviour, which crashes or drops
  on a bad image). Images under min_image_bytes (OpenFlamingo's size filter) and repeated names are
  always just left out. Every image left out is counted under `dropped_images/<reason>`.

  image_size: the training image side; each usable image's CLIP crop is kept in the record (None:
  only validate, as a TFDS build does).
  """

  READER: ClassVar[str] = "documents"

  max_images: int = 6
  min_image_bytes: int = 0
  single_image_keep_prob: float = 1.0
  on_bad_image: str = "drop_image"
  seed: int = 0
  image_dir: str | None = None
  image_size: int | None = None
  min_image_side: int = images.DEFAULT_MIN_SIDE
  max_image_pixels: int | None = images.DEFAULT_MAX_PIXELS
  max_image_bytes: int | None = images.DEFAULT_MAX_BYTES

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
    if self.image_size is not None and self.image_size < 1:
      raise ValueError(f"{r}: image_size must be >= 1, got {self.image_size}.")
    if self.min_image_side < 1:
      raise ValueError(f"{r}: min_image_side must be >= 1, got {self.min_image_side}.")
    for name in ("max_image_pixels", "max_image_bytes"):
      value = getattr(self, name)
      if value is not None and value < 1:
        raise ValueError(f"{r}: {name} must be >= 1 or None (no limit), got {value}.")

  def check_image(self, data: bytes, what: str, min_bytes: int | None = None) -> CheckedImage:
    """`data` decoded and checked with these options (`min_bytes` replaces min_image_bytes when
    given); raises `image_payloads.ImageProblem`."""
    return image_payloads.check_image(
      data, what, size=self.image_size,
      min_bytes=self.min_image_bytes if min_bytes is None else min_bytes,
      min_side=self.min_image_side, max_pixels=self.max_image_pixels,
      max_bytes=self.max_image_bytes)

  def usable_image(self, fetch: Callable[[], bytes], what: str,
                   problems: list) -> CheckedImage | None:
    """The checked image if usable; None after noting its problem in `problems` (the image is left
    out); raises BadRecord when `on_bad_image="drop_record"` (size-floor misses and duplicates are
    always just left out)."""
    try:
      return self.check_image(fetch(), what)
    except image_payloads.ImageProblem as p:
      if self.on_bad_image == "drop_record" and not p.floor:
        raise BadRecord(p.reason, p.detail,
                        image_payloads.dropped_counts([*problems, p])) from None
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
  def from_config(cls, config: DataConfig | Any, reader: str | None = None):
    """These options from (parsed) config.data: each field of the same name; one that is not set
    (None) takes this class's default, except the image limits, where None means no limit and the
    DataConfig's default is the library's."""
    reader = reader or cls.READER
    data = parse(config)
    defaults = cls()
    kwargs = {"image_dir": config_fields.image_dir(data, reader=reader)}
    for f in dataclasses.fields(cls):
      if f.name == "image_dir":
        continue
      if f.name in ("max_image_pixels", "max_image_bytes", "image_size"):
        kwargs[f.name] = getattr(data, f.name)
      else:
        kwargs[f.name] = data.get(f.name, getattr(defaults, f.name))
    return cls(**kwargs)
