"""Getting one image's encoded bytes out of a web-corpus record, and judging if they are usable.

Readers keep images as encoded bytes (decoding and resizing happen in the transform, in the workers
that batch them); here they only fetch the bytes and apply the cheap checks that decide whether an
image takes part in the document at all:

  missing file / no payload -> "image_missing"     zero bytes               -> "image_empty"
  fewer than min_bytes      -> "image_too_small"   not a known image format -> "image_undecodable"

An unusable image is reported as an `ImageProblem` (not a `BadRecord`): the reader leaves it out
*before* it places `<image>` tokens, which is what OpenFlamingo does (its MMC4 loader skips images
without bytes or under its size limit), so no token ever loses its image. Only the PIL header is
read here; a corrupt body is caught later when the transform decodes, and then the whole record
goes.
"""

from __future__ import annotations

import base64
import binascii
import collections
import io
import os
from collections.abc import Sequence

from PIL import Image, UnidentifiedImageError

from vlm_jax.data.records import BadRecord


class ImageProblem(Exception):
  """An image that cannot take part in its document; `reason` is a `records.REASONS` name."""

  def __init__(self, reason: str, detail: str):
    super().__init__(f"{reason}: {detail}")
    self.reason, self.detail = reason, detail


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


def read_image_file(image_dir: str | None, name: str, what: str) -> bytes:
  """Bytes of `image_dir/name`.

  `name` must stay inside `image_dir` (web data names files; it must not make us read /etc).
  """
  if image_dir is None:
    raise ImageProblem("image_missing",
                       f"{what}: no bytes in the record and no config.data.image_dir")
  if not isinstance(name, str) or not name:
    raise ImageProblem("image_missing", f"{what}: no file name")
  root = os.path.abspath(image_dir)
  path = os.path.abspath(os.path.join(root, name))
  if os.path.commonpath([root, path]) != root:
    raise ImageProblem("image_missing", f"{what}: {name!r} points outside image_dir")
  try:
    with open(path, "rb") as f:
      return f.read()
  except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
    raise ImageProblem("image_missing", f"{what}: {path} does not exist") from None
  except OSError as e:
    raise ImageProblem("image_missing", f"{what}: cannot read {path} ({e})") from None


def check_image_bytes(data: bytes, min_bytes: int, what: str) -> bytes:
  """`data` if it is non-empty, at least `min_bytes` long and starts like an image; else raises."""
  if not data:
    raise ImageProblem("image_empty", f"{what}: zero bytes")
  if len(data) < min_bytes:
    raise ImageProblem("image_too_small",
                       f"{what}: {len(data)} bytes < min_image_bytes={min_bytes}")
  try:
    Image.open(io.BytesIO(data))  # lazy: parses the header only
  except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
    # Typically an HTML error page saved under the image's name by a downloader.
    raise ImageProblem("image_undecodable", f"{what}: not an image ({e})") from None
  return data


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
    reason, f"no usable image of {len(problems)} ({dict(counts)}); e.g. {first.detail}")
