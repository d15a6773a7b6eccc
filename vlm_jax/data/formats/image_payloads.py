"""Getting one image's encoded bytes out of a web-corpus record, and judging if it is usable.

Readers fetch each image's bytes and decode it once, here (`check_image`, through
`images.check_image`: header checks first, then a full decode), so they know which images are usable
*before* they place `<image>` tokens; the CLIP crop travels on in the record as a
`records.CheckedImage` and the transform does not decode again. An unusable image is reported as an
`ImageProblem` (not a `BadRecord`), and the reader leaves it out of the document (or, with
`on_bad_image="drop_record"`, drops the document):

  missing file / no payload -> "image_missing"     zero bytes                 -> "image_empty"
  fewer than min_bytes      -> "image_too_small"   a side < min_side          -> "image_too_small"
  W * H > max_pixels        -> "image_too_large"   file > max_bytes           -> "image_too_large"
  corrupt / truncated / not an image (an HTML error page, ...)                -> "image_undecodable"
  a name seen earlier in the same document                                    -> "image_duplicate"

OpenFlamingo's size floor (`min_bytes`) and duplicates only ever leave the image out (`floor`).
"""

from __future__ import annotations

import base64
import binascii
import collections
from collections.abc import Sequence

from vlm_jax.data import files, images
from vlm_jax.data.records import BadRecord, CheckedImage


class ImageProblem(Exception):
  """An image that cannot take part in its document; `reason` is a `records.REASONS` name.

  `floor`: the image is only left out, never the reason to drop its document (OpenFlamingo's
  byte-size filter, duplicate names).
  """

  def __init__(self, reason: str, detail: str, floor: bool = False):
    super().__init__(f"{reason}: {detail}")
    self.reason, self.detail, self.floor = reason, detail, floor


def decode_base64(payload: str, what: str) -> bytes:
  """Bytes of a base64 image string.

  Also accepts the `"b'...'"` form that OpenFlamingo's `convert_mmc4_to_wds.py` writes (it stores
  `str(bytes)`), whose stray leading `b` would otherwise decode into a corrupt first byte.
  """
  if not isinstance(payload, str):
    raise ImageProblem("image_undecodable", f"{what}: base64 payload is {type(payload).__name__}")
  text = payload.strip()
  if len(text) >= 3 and text[:2] in ("b'", 'b"') and text[-1] == text[1]:
    text = text[2:-1]
  try:
    # Non-strict, like OpenFlamingo: line breaks inside the payload are ignored.
    return base64.b64decode(text)
  except (binascii.Error, ValueError) as e:
    raise ImageProblem("image_undecodable", f"{what}: invalid base64 ({e})") from None


def read_image_file(image_dir: str | None, name: str, what: str,
                    max_bytes: int | None = images.DEFAULT_MAX_BYTES) -> bytes:
  """Bytes of `image_dir/name` (local or remote, `vlm_jax.data.files`); a file over `max_bytes` is
  not read.

  `name` must stay inside `image_dir` (web data names files; it must not make us read /etc).
  """
  if image_dir is None:
    raise ImageProblem("image_missing",
                       f"{what}: no bytes in the record and no config.data.image_dir")
  if not isinstance(name, str) or not name:
    raise ImageProblem("image_missing", f"{what}: no file name")
  path = files.join_inside(image_dir, name)
  if path is None:
    raise ImageProblem("image_missing", f"{what}: {name!r} points outside image_dir")
  try:
    with files.open_file(path) as f:
      size = f.seek(0, 2)  # the size without a separate stat (one round trip for remote objects)
      f.seek(0)
      if max_bytes is not None and size > max_bytes:
        raise ImageProblem("image_too_large", f"{what}: {path} has {size} bytes > "
                           f"max_image_bytes={max_bytes}")
      return f.read()
  except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
    raise ImageProblem("image_missing", f"{what}: {path} does not exist") from None
  except OSError as e:
    raise ImageProblem("image_missing", f"{what}: cannot read {path} ({e})") from None


def check_image(data: bytes, what: str, *, size: int | None, min_bytes: int = 0,
                min_side: int = images.DEFAULT_MIN_SIDE,
                max_pixels: int | None = images.DEFAULT_MAX_PIXELS,
                max_bytes: int | None = images.DEFAULT_MAX_BYTES) -> CheckedImage:
  """`data` decoded and checked (`images.check_image`); raises ImageProblem if unusable."""
  if data and len(data) < min_bytes:
    raise ImageProblem("image_too_small", f"{what}: {len(data)} bytes < min_image_bytes="
                       f"{min_bytes}", floor=True)
  try:
    return images.check_image(data, size=size, min_side=min_side, max_pixels=max_pixels,
                              max_bytes=max_bytes)
  except BadRecord as e:
    raise ImageProblem(e.reason, f"{what}: {e.detail}") from None


def dropped_counts(problems: Sequence[ImageProblem]) -> dict[str, int]:
  """{reason: number of images} of the images a reader left out."""
  return dict(collections.Counter(p.reason for p in problems))


def no_usable_image(problems: Sequence[ImageProblem], record_id: str) -> BadRecord:
  """The BadRecord for a document none of whose images is usable: "no_image" when it listed none,
  else the most common problem's reason, so the skip counters say why documents lost their
  images."""
  if not problems:
    return BadRecord("no_image", f"{record_id}: the document has no images")
  counts = collections.Counter(p.reason for p in problems)
  reason = counts.most_common(1)[0][0]
  first = next(p for p in problems if p.reason == reason)
  return BadRecord(
    reason, f"no usable image of {len(problems)} ({dict(counts)}); e.g. {first.detail}",
    dropped_images=dict(counts))
