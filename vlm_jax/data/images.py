"""Image decoding and CLIP preprocessing (numpy + PIL), NHWC throughout.

Every image that enters a vlm_jax pipeline passes through `to_rgb_uint8` (whatever it came as: encoded
bytes, a PIL image of any mode, or an array) and then `clip_preprocess`, which reproduces the
OpenAI CLIP / open_clip eval transform: bicubic resize of the shortest side, center crop, scale to
[0, 1], normalise with the CLIP mean/std. `stack_images` pads a document's images to a fixed count with
zero images, as OpenFlamingo does, so batches have static shapes.
"""

from __future__ import annotations

import functools
import io
from collections.abc import Sequence
from typing import Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

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


def to_rgb_uint8(image: Any) -> np.ndarray:
  """Converts an image of any supported kind to RGB.

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
      pil = Image.open(io.BytesIO(bytes(image)))
      pil.load()
      pil = ImageOps.exif_transpose(pil)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
      raise ValueError(f"Could not decode image bytes ({len(image)} bytes): {e}") from e
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
) -> np.ndarray:
  """CLIP eval transform: resize shortest side (bicubic), center crop, normalise.

  Args:
    image_uint8: uint8[H, W, 3].
    size: output side length.
    mean, std: per-channel normalisation constants (defaults: OpenAI CLIP).

  Returns:
    float32[size, size, 3].
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
  # (x / 255 - mean) / std folded into one multiply-add.
  scale, offset = _normalisation(tuple(mean), tuple(std))
  out = img.astype(np.float32)
  out *= scale  # In place: this runs per image in the input pipeline's hot loop.
  out -= offset
  return out


def stack_images(
  images: Sequence[Any], max_images: int, size: int, **preprocess_kwargs
) -> tuple[np.ndarray, int]:
  """Preprocesses a document's images and zero-pads them to `max_images`.

  Zero images mark padded slots (OpenFlamingo's convention); the model ignores them because no text
  token is conditioned on an image index past the number of `<image>` tokens.

  Args:
    images: up to `max_images` images, each anything `to_rgb_uint8` accepts.
    max_images: number of image slots T_img.
    size: image side S.
    **preprocess_kwargs: forwarded to `clip_preprocess` (mean, std).

  Returns:
    (float32[max_images, size, size, 3], number of real images).

  Raises:
    ValueError: if there are more images than slots (dropping some silently could misalign images
      and `<image>` tokens; the caller decides which to keep).
  """
  if len(images) > max_images:
    raise ValueError(f"Got {len(images)} images but only max_images={max_images} slots.")
  out = np.zeros((max_images, size, size, 3), np.float32)
  for i, image in enumerate(images):
    out[i] = clip_preprocess(to_rgb_uint8(image), size, **preprocess_kwargs)
  return out, len(images)
