"""Image decoding and CLIP preprocessing (numpy + PIL), NHWC throughout.

Every image that enters a vlm_jax pipeline passes through `decode_image` (whatever it came as: a
file path, encoded bytes, a `records.CheckedImage`, a PIL image of any mode, or an array) and then
`clip_preprocess`, which reproduces the OpenAI CLIP / open_clip eval transform: bicubic resize of the
shortest side, center crop, scale to [0, 1], normalise with the CLIP mean/std. `stack_images` pads a
document's images to a fixed count with zero images, as OpenFlamingo does, so batches have static
shapes.

`decode_image` is the strict entry point for training data: an image it cannot use raises
`records.BadRecord` with the reason:

  path that does not exist         -> image_missing     zero bytes             -> image_empty
  fewer than min_bytes             -> image_too_small   either side < min_side -> image_too_small
  W * H > max_pixels (header only) -> image_too_large   corrupt / truncated    -> image_undecodable
  more than max_bytes (file size)  -> image_too_large

The pixel limit is ours and is checked from the header, before any pixel is allocated, so it holds
whatever a program sets PIL's global `Image.MAX_IMAGE_PIXELS` to (PIL's own guard, raised inside
`Image.open` above twice its limit, and its DecompressionBombWarning under `-W error`, are caught and
reported the same way). Any other exception PIL raises on hostile input (OSError, SyntaxError from
broken PNG chunks, ValueError, struct.error, zlib.error, IndexError, ...) becomes
"image_undecodable".

`check_image` is the web readers' form: it decodes and checks once and keeps the CLIP crop, so a
reader can leave a bad image out of its document before laying out the `<image>` tokens.

Everything else is converted to RGB: CMYK, palette (with or without transparency), 1-bit, grayscale,
LA / RGBA (alpha composited on white), 16-bit (rescaled, where PIL would clip), EXIF orientation
applied. `to_rgb_uint8` is the lenient converter for callers that hold trusted images: same
conversions, no size limits, and a plain ValueError.
"""

from __future__ import annotations

import functools
import io
import os
import stat
from collections.abc import Sequence
from typing import Any, BinaryIO

import numpy as np
from PIL import Image, ImageFile, ImageOps

from vlm_jax.data import files
from vlm_jax.data.records import BadRecord, CheckedImage

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# Smallest side kept by default: a strip under 8 pixels (a tracking pixel, a spacer GIF, a 1-pixel
# rule) carries nothing a ViT can use. (OpenFlamingo's tiny-image filter is by encoded size,
# `min_bytes`, which the web-corpus readers apply.)
DEFAULT_MIN_SIDE = 8
# PIL's own decompression-bomb threshold (Image.MAX_IMAGE_PIXELS), written out so that a library
# changing PIL's global does not change which images we accept.
DEFAULT_MAX_PIXELS = 89_478_485
# Largest encoded image file read: 64 MiB is ~10x a large photo; a bigger file is not read into memory.
DEFAULT_MAX_BYTES = 64 * 2**20

# Modes whose pixel values are wider than 8 bits; PIL's own convert("RGB") clips them instead of
# rescaling, which turns most 16-bit images white.
_WIDE_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I", "F")


def _wide_to_uint8(image: Image.Image) -> np.ndarray:
  """uint8[H, W] from a 16-bit / 32-bit-int / float single-channel PIL image."""
  arr = np.asarray(image)
  if image.mode == "F":
    arr = arr.astype(np.float64)
    # Float images are conventionally [0, 1]; anything larger is taken as already 0..255.
    arr = arr * 255.0 if arr.size and np.nanmax(arr) <= 1.0 else arr
  else:
    # "I" here is how older PIL versions open 16-bit PNGs, so treat both as a 0..65535 range.
    arr = np.clip(arr.astype(np.float64), 0, 65535) / 257.0
  return np.clip(np.nan_to_num(np.rint(arr)), 0, 255).astype(np.uint8)


def _composite_on_white(rgba: np.ndarray) -> np.ndarray:
  """uint8[H, W, 3] from uint8[H, W, 4], blending transparent pixels onto white."""
  rgb = rgba[..., :3].astype(np.float32)
  alpha = rgba[..., 3:4].astype(np.float32) / 255.0
  return np.rint(rgb * alpha + 255.0 * (1.0 - alpha)).astype(np.uint8)


def _pil_to_rgb(image: Image.Image) -> np.ndarray:
  mode = image.mode
  if mode in _WIDE_MODES:
    gray = _wide_to_uint8(image)
    return np.repeat(gray[..., None], 3, axis=-1)
  # Anything that can carry transparency goes through RGBA so the alpha is honoured, not dropped.
  if mode in ("RGBA", "LA", "PA", "RGBa", "La") or (
    mode in ("P", "L", "RGB") and "transparency" in image.info
  ):
    return _composite_on_white(np.asarray(image.convert("RGBA")))
  if mode != "RGB":
    image = image.convert("RGB")  # L, 1, P, CMYK, YCbCr, LAB, HSV.
  return np.asarray(image, dtype=np.uint8)


def _array_to_rgb(arr: np.ndarray) -> np.ndarray:
  if arr.dtype == np.bool_:
    arr = arr.astype(np.uint8) * 255
  elif arr.dtype == np.uint16:
    arr = (arr.astype(np.float32) / 257.0).round().astype(np.uint8)
  elif np.issubdtype(arr.dtype, np.floating):
    # Float arrays are taken as [0, 1] (the usual convention for decoded float images).
    arr = np.clip(np.rint(np.nan_to_num(arr.astype(np.float32)) * 255.0), 0, 255).astype(np.uint8)
  elif arr.dtype != np.uint8:
    if np.issubdtype(arr.dtype, np.integer) and arr.size and arr.min() >= 0 and arr.max() <= 255:
      arr = arr.astype(np.uint8)
    else:
      raise ValueError(
        f"Image array of dtype {arr.dtype} is outside 0..255; expected uint8, uint16, bool or "
        "float in [0, 1]."
      )
  if arr.ndim == 2:
    arr = arr[..., None]
  if arr.ndim != 3 or arr.shape[-1] not in (1, 3, 4) or 0 in arr.shape[:2]:
    raise ValueError(
      f"Image array has shape {arr.shape}; expected [H, W], [H, W, 1], [H, W, 3] or [H, W, 4]."
    )
  if arr.shape[-1] == 1:
    return np.repeat(arr, 3, axis=-1)
  if arr.shape[-1] == 4:
    return _composite_on_white(arr)
  return np.ascontiguousarray(arr)


def _require_strict_truncation() -> None:
  # With LOAD_TRUNCATED_IMAGES set, PIL grey-fills the missing part of a truncated file instead of
  # raising, and we would train on the half-grey image without anyone noticing.
  if ImageFile.LOAD_TRUNCATED_IMAGES:
    raise RuntimeError(
      "PIL.ImageFile.LOAD_TRUNCATED_IMAGES is True (some imported code set it); PIL would then "
      "decode truncated images with their missing part filled in grey. Set it back to False "
      "before building a vlm_jax input pipeline.")


def _check_dims(width: int, height: int, what: str, min_side: int, max_pixels: int | None) -> None:
  if max_pixels is not None and width * height > max_pixels:
    raise BadRecord("image_too_large", f"{what}: {width}x{height} = {width * height} pixels > "
                                       f"max_pixels={max_pixels}")
  if min(width, height) < min_side:
    raise BadRecord("image_too_small", f"{what}: {width}x{height}, a side < min_side={min_side}")


def _check_byte_count(num_bytes: int, what: str, min_bytes: int,
                      max_bytes: int | None = DEFAULT_MAX_BYTES) -> None:
  if num_bytes == 0:
    raise BadRecord("image_empty", f"{what}: zero bytes")
  if num_bytes < min_bytes:
    raise BadRecord("image_too_small", f"{what}: {num_bytes} bytes < min_bytes={min_bytes}")
  if max_bytes is not None and num_bytes > max_bytes:
    raise BadRecord("image_too_large", f"{what}: {num_bytes} bytes > max_bytes={max_bytes}")


def _decode_file(fp: BinaryIO, what: str, min_side: int, max_pixels: int | None) -> Image.Image:
  """Opens an encoded image, checks its size from the header, then decodes it fully.

  Returns the loaded PIL image with its EXIF orientation applied.
  """
  _require_strict_truncation()
  # PIL's parsers raise many types on hostile input (OSError, SyntaxError, ValueError, struct.error,
  # IndexError, ...), so anything but the bomb guard counts as undecodable.
  try:
    pil = Image.open(fp)  # parses the header only
  except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
    # PIL's guard fires inside open() above 2x its limit (and the warning, above 1x, when warnings
    # are errors); our own max_pixels check below covers everything under it.
    raise BadRecord("image_too_large", f"{what}: {e}") from None
  except Exception as e:
    raise BadRecord("image_undecodable", f"{what}: {type(e).__name__}: {e}") from None
  # Before load(): a small file that declares 20000x20000 must not get its pixels allocated.
  _check_dims(*pil.size, what, min_side, max_pixels)
  try:
    pil.load()  # raises on truncated data because LOAD_TRUNCATED_IMAGES is False
  except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
    raise BadRecord("image_too_large", f"{what}: {e}") from None
  except Exception as e:
    raise BadRecord("image_undecodable", f"{what}: {type(e).__name__}: {e}") from None
  try:
    ImageOps.exif_transpose(pil, in_place=True)
  except Exception:
    # A broken EXIF block does not make the decoded pixels unusable; keep the stored orientation.
    pass
  return pil


def _describe(item: Any) -> str:
  if isinstance(item, (str, os.PathLike)):
    return os.fspath(item)
  if isinstance(item, (bytes, bytearray, memoryview)):
    return f"image bytes ({len(item)} bytes)"
  return f"image {type(item).__name__}"


def decode_image(
  item: Any,
  *,
  min_side: int = DEFAULT_MIN_SIDE,
  max_pixels: int | None = DEFAULT_MAX_PIXELS,
  min_bytes: int = 0,
  max_bytes: int | None = DEFAULT_MAX_BYTES,
) -> np.ndarray:
  """Decodes and checks one training image; see the module docstring for the reasons.

  Args:
    item: a path (str or os.PathLike) to an image file, encoded bytes (JPEG/PNG/...), a
      `CheckedImage` (its bytes are decoded), a PIL image of any mode, or a numpy array [H, W],
      [H, W, 1], [H, W, 3] or [H, W, 4] (uint8, uint16, bool or float in [0, 1]). None counts as a
      missing image.
    min_side: images with a side shorter than this are rejected.
    max_pixels: images with more pixels than this are rejected from the header, before decoding
      (None: no limit of ours; PIL's own bomb guard, 2 * Image.MAX_IMAGE_PIXELS, still applies).
    min_bytes: encoded files/bytes shorter than this are rejected (OpenFlamingo's tiny-image
      filter).
    max_bytes: encoded files/bytes longer than this are rejected (a file is not read at all).

  Returns:
    uint8[H, W, 3], EXIF orientation applied.

  Raises:
    BadRecord: with reason image_missing, image_empty, image_too_small, image_too_large or
      image_undecodable.
    RuntimeError: if PIL's LOAD_TRUNCATED_IMAGES has been switched on (it would hide truncation).
  """
  if isinstance(item, CheckedImage):
    item = item.encoded
  what = _describe(item)
  if item is None:
    raise BadRecord("image_missing", "the record has None in place of an image")
  if isinstance(item, str) and files.is_url(item):  # a remote object (LLaVA's image_dir on gs://)
    try:
      item = files.read_bytes(item) if max_bytes is None or files.size(item) <= max_bytes else None
    except (OSError, ValueError) as e:  # FileNotFoundError, a backend's own errors
      raise BadRecord("image_missing", f"{what}: {e}") from None
    if item is None:
      raise BadRecord("image_too_large", f"{what}: more than max_bytes={max_bytes} bytes")
  if isinstance(item, (str, os.PathLike)):
    try:
      info = os.stat(item)
    except OSError as e:  # FileNotFoundError, NotADirectoryError, PermissionError, ...
      raise BadRecord("image_missing", f"{what}: {e.strerror or e}") from None
    if not stat.S_ISREG(info.st_mode):
      raise BadRecord("image_missing", f"{what}: not a regular file")
    _check_byte_count(info.st_size, what, min_bytes, max_bytes)
    try:
      f = open(item, "rb")
    except OSError as e:  # deleted since the stat, unreadable, ...
      raise BadRecord("image_missing", f"{what}: {e.strerror or e}") from None
    with f:
      return _pil_to_rgb(_decode_file(f, what, min_side, max_pixels))
  if isinstance(item, (bytes, bytearray, memoryview)):
    data = bytes(item)
    _check_byte_count(len(data), what, min_bytes, max_bytes)
    return _pil_to_rgb(_decode_file(io.BytesIO(data), what, min_side, max_pixels))
  if isinstance(item, Image.Image):
    _check_dims(*item.size, what, min_side, max_pixels)
    try:
      return _pil_to_rgb(item)  # a lazily opened image decodes here
    except Exception as e:
      raise BadRecord("image_undecodable", f"{what}: {type(e).__name__}: {e}") from None
  if isinstance(item, np.ndarray):
    if item.ndim in (2, 3):
      _check_dims(item.shape[1], item.shape[0], what, min_side, max_pixels)
    try:
      return _array_to_rgb(item)
    except ValueError as e:
      raise BadRecord("image_undecodable", str(e)) from None
  raise BadRecord("image_undecodable", f"unsupported image type {type(item).__name__}; expected a "
                                       "path, bytes, PIL.Image or numpy array")


def check_image(
  data: bytes,
  *,
  size: int | None,
  min_side: int = DEFAULT_MIN_SIDE,
  max_pixels: int | None = DEFAULT_MAX_PIXELS,
  min_bytes: int = 0,
  max_bytes: int | None = DEFAULT_MAX_BYTES,
) -> CheckedImage:
  """Decodes and checks encoded image bytes once, for a reader that must know now whether an image
  is usable (to leave it out of its document before laying out the `<image>` tokens).

  Args:
    data: the encoded file.
    size: the training image side S: the CLIP crop is kept (uint8[S, S, 3], not normalised), so the
      transform does not decode again; None only validates (a TFDS build stores the bytes).
    min_side, max_pixels, min_bytes, max_bytes: as `decode_image`.

  Returns:
    CheckedImage(encoded=data, pixels=uint8[S, S, 3] or None).

  Raises:
    BadRecord: as `decode_image`.
  """
  rgb = decode_image(data, min_side=min_side, max_pixels=max_pixels, min_bytes=min_bytes,
                     max_bytes=max_bytes)
  pixels = None if size is None else clip_preprocess(rgb, size, normalize=False)
  return CheckedImage(bytes(data), pixels)


def to_rgb_uint8(image: Any) -> np.ndarray:
  """Converts an image of any supported kind to RGB (lenient: no size limits, plain ValueError).

  Args:
    image: encoded bytes (JPEG/PNG/...; EXIF orientation is applied), a PIL image of any mode
      (alpha is composited on white, 16-bit is rescaled, CMYK/palette are converted), or a numpy
      array [H, W], [H, W, 1], [H, W, 3] or [H, W, 4] (uint8, uint16, bool or float in [0, 1]).

  Returns:
    uint8[H, W, 3].

  Raises:
    ValueError: if the input cannot be decoded or has an unsupported type/shape.
  """
  if isinstance(image, (bytes, bytearray, memoryview)):
    try:
      pil = _decode_file(io.BytesIO(bytes(image)), "image bytes", min_side=1, max_pixels=None)
    except BadRecord as e:
      raise ValueError(f"Could not decode image bytes ({len(image)} bytes): {e}") from None
    return _pil_to_rgb(pil)
  if isinstance(image, Image.Image):
    return _pil_to_rgb(image)
  if isinstance(image, np.ndarray):
    return _array_to_rgb(image)
  raise ValueError(
    f"Unsupported image type {type(image).__name__}; expected bytes, PIL.Image or numpy array."
  )


@functools.lru_cache(maxsize=8)
def _normalisation(
  mean: tuple[float, ...], std: tuple[float, ...]
) -> tuple[np.ndarray, np.ndarray]:
  """(scale, offset) with (x / 255 - mean) / std == x * scale - offset, as float32[3]."""
  std32 = np.asarray(std, np.float32)
  scale = (1.0 / (255.0 * std32)).astype(np.float32)
  offset = (np.asarray(mean, np.float32) / std32).astype(np.float32)
  scale.flags.writeable = offset.flags.writeable = False  # Shared through the cache.
  return scale, offset


def clip_preprocess(
  image_uint8: np.ndarray,
  size: int,
  mean: Sequence[float] = CLIP_MEAN,
  std: Sequence[float] = CLIP_STD,
  normalize: bool = True,
) -> np.ndarray:
  """CLIP eval transform: resize shortest side (bicubic), center crop, normalise.

  Args:
    image_uint8: uint8[H, W, 3].
    size: output side length.
    mean, std: per-channel normalisation constants (defaults: OpenAI CLIP).
    normalize: False returns the uint8 crop; the ViT then normalises on the device (4x fewer bytes
      through the input pipeline and onto the accelerator).

  Returns:
    float32[size, size, 3] (uint8 when not normalising).
  """
  img = np.asarray(image_uint8)
  if img.dtype != np.uint8 or img.ndim != 3 or img.shape[-1] != 3:
    img = to_rgb_uint8(img)
  h, w = img.shape[:2]
  if (h, w) != (size, size):
    # Same arithmetic as torchvision's Resize(int) + CenterCrop, which CLIP/open_clip use.
    if h <= w:
      new_h, new_w = size, int(size * w / h)
    else:
      new_h, new_w = int(size * h / w), size
    if (new_h, new_w) != (h, w):
      img = np.asarray(Image.fromarray(img).resize((new_w, new_h), Image.Resampling.BICUBIC))
    top = round((new_h - size) / 2.0)
    left = round((new_w - size) / 2.0)
    img = img[top : top + size, left : left + size]
  if not normalize:
    return np.ascontiguousarray(img)
  # (x / 255 - mean) / std folded into one multiply-add.
  scale, offset = _normalisation(tuple(mean), tuple(std))
  out = img.astype(np.float32)
  out *= scale  # In place: this runs per image in the input pipeline's hot loop.
  out -= offset
  return out


def stack_images(
  images: Sequence[Any],
  max_images: int,
  size: int,
  *,
  min_side: int = DEFAULT_MIN_SIDE,
  max_pixels: int | None = DEFAULT_MAX_PIXELS,
  min_bytes: int = 0,
  dtype: Any = np.float32,
  **preprocess_kwargs,
) -> tuple[np.ndarray, int]:
  """Decodes (`decode_image`) and preprocesses a document's images, zero-padded to `max_images`.

  Zero images mark padded slots (OpenFlamingo's convention); the model ignores them because no text
  token is conditioned on an image index past the number of `<image>` tokens.

  Args:
    images: up to `max_images` images, each anything `decode_image` accepts.
    max_images: number of image slots T_img.
    size: image side S.
    min_side, max_pixels, min_bytes: forwarded to `decode_image`.
    dtype: float32 (CLIP-normalised) or uint8 (resized and cropped only; normalised by the ViT).
    **preprocess_kwargs: forwarded to `clip_preprocess` (mean, std).

  Returns:
    (dtype[max_images, size, size, 3], number of real images).

  Raises:
    BadRecord: if any image is unusable; the caller drops the whole record, since leaving one image
      out here would shift every later image onto the wrong `<image>` token (web readers leave bad
      images out earlier, with `check_image`, before the tokens are placed).
    ValueError: if there are more images than slots (dropping some silently could misalign images
      and `<image>` tokens; the caller decides which to keep).
  """
  if len(images) > max_images:
    raise ValueError(f"Got {len(images)} images but only max_images={max_images} slots.")
  dtype = np.dtype(dtype)
  if dtype not in (np.float32, np.uint8):
    raise ValueError(f"image dtype must be float32 or uint8, got {dtype}")
  out = np.zeros((max_images, size, size, 3), dtype)
  for i, image in enumerate(images):
    if (isinstance(image, CheckedImage) and image.pixels is not None
        and image.pixels.shape == (size, size, 3)):
      rgb = image.pixels  # decoded, checked and cropped by the reader: only normalising is left
    else:
      rgb = decode_image(image, min_side=min_side, max_pixels=max_pixels, min_bytes=min_bytes)
    out[i] = clip_preprocess(rgb, size, normalize=dtype == np.float32, **preprocess_kwargs)
  return out, len(images)
