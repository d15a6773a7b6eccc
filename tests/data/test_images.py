"""Tests for image decoding and CLIP preprocessing (vlm_jax.data.images)."""

import io

import numpy as np
import pytest
from PIL import Image

from vlm_jax.data import images


def _encode(pil, fmt="PNG", **kwargs):
  buf = io.BytesIO()
  pil.save(buf, format=fmt, **kwargs)
  return buf.getvalue()


def test_rgb_array_and_bytes_roundtrip():
  arr = np.random.default_rng(0).integers(0, 256, (5, 7, 3), dtype=np.uint8)
  np.testing.assert_array_equal(images.to_rgb_uint8(arr), arr)
  out = images.to_rgb_uint8(_encode(Image.fromarray(arr)))
  assert out.dtype == np.uint8
  np.testing.assert_array_equal(out, arr)


def test_palette():
  pil = Image.new("P", (4, 3))
  pil.putpalette([10, 20, 30, 200, 100, 50] + [0] * 762)
  pil.putpixel((1, 1), 1)
  for src in (pil, _encode(pil)):
    out = images.to_rgb_uint8(src)
    assert out.shape == (3, 4, 3)
    np.testing.assert_array_equal(out[0, 0], [10, 20, 30])
    np.testing.assert_array_equal(out[1, 1], [200, 100, 50])


def test_palette_with_transparency_goes_white():
  pil = Image.new("P", (2, 2))
  pil.putpalette([10, 20, 30, 200, 100, 50] + [0] * 762)
  pil.info["transparency"] = 0
  out = images.to_rgb_uint8(pil)
  np.testing.assert_array_equal(out[0, 0], [255, 255, 255])


def test_rgba_composited_on_white():
  rgba = np.array([[[255, 0, 0, 0], [255, 0, 0, 255], [0, 0, 0, 128]]], np.uint8)
  expected = [[[255, 255, 255], [255, 0, 0], [127, 127, 127]]]
  np.testing.assert_array_equal(images.to_rgb_uint8(rgba), expected)
  np.testing.assert_array_equal(images.to_rgb_uint8(Image.fromarray(rgba, "RGBA")), expected)
  np.testing.assert_array_equal(
    images.to_rgb_uint8(_encode(Image.fromarray(rgba, "RGBA"))), expected
  )
  la = Image.fromarray(np.array([[[100, 0], [100, 255]]], np.uint8), "LA")
  np.testing.assert_array_equal(images.to_rgb_uint8(la), [[[255] * 3, [100] * 3]])


def test_grayscale_inputs():
  gray = np.array([[0, 128, 255]], np.uint8)
  expected = np.repeat(gray[..., None], 3, -1)
  np.testing.assert_array_equal(images.to_rgb_uint8(gray), expected)
  np.testing.assert_array_equal(images.to_rgb_uint8(gray[..., None]), expected)
  np.testing.assert_array_equal(images.to_rgb_uint8(Image.fromarray(gray, "L")), expected)
  np.testing.assert_array_equal(
    images.to_rgb_uint8(Image.fromarray(gray > 100)), [[[0] * 3, [255] * 3, [255] * 3]]
  )


def test_sixteen_bit_is_rescaled_not_clipped():
  arr16 = np.array([[0, 257 * 128, 65535]], np.uint16)
  pil = Image.fromarray(arr16)
  assert pil.mode.startswith("I;16")
  expected = np.repeat(np.array([[0, 128, 255]], np.uint8)[..., None], 3, -1)
  np.testing.assert_array_equal(images.to_rgb_uint8(pil), expected)
  np.testing.assert_array_equal(images.to_rgb_uint8(_encode(pil)), expected)
  np.testing.assert_array_equal(images.to_rgb_uint8(arr16), expected)
  np.testing.assert_array_equal(images.to_rgb_uint8(pil.convert("I")), expected)


def test_cmyk():
  pil = Image.new("CMYK", (2, 2), (0, 255, 255, 0))  # Pure red in CMYK.
  for src in (pil, _encode(pil, "JPEG", quality=100)):
    out = images.to_rgb_uint8(src)
    assert out.shape == (2, 2, 3)
    assert out[0, 0, 0] > 200 and out[0, 0, 1] < 50 and out[0, 0, 2] < 50


def test_float_array():
  out = images.to_rgb_uint8(np.array([[[0.0, 0.5, 1.0]]], np.float32))
  np.testing.assert_array_equal(out, [[[0, 128, 255]]])


def test_exif_orientation_applied():
  pil = Image.new("RGB", (4, 2), (255, 0, 0))
  exif = Image.Exif()
  exif[0x0112] = 6  # "Rotate 90 CW to display".
  out = images.to_rgb_uint8(_encode(pil, "JPEG", exif=exif))
  assert out.shape == (4, 2, 3)


@pytest.mark.parametrize(
  "bad", [b"", b"definitely not an image", _encode(Image.new("RGB", (8, 8)))[:40]]
)
def test_undecodable_bytes_raise(bad):
  with pytest.raises(ValueError, match="decode"):
    images.to_rgb_uint8(bad)


def test_bad_types_and_shapes_raise():
  with pytest.raises(ValueError, match="Unsupported image type"):
    images.to_rgb_uint8("cat.jpg")
  with pytest.raises(ValueError, match="shape"):
    images.to_rgb_uint8(np.zeros((4, 4, 2), np.uint8))


def test_clip_preprocess_values_and_fast_path():
  mean = np.array(images.CLIP_MEAN)
  std = np.array(images.CLIP_STD)
  img = np.random.default_rng(1).integers(0, 256, (16, 16, 3), dtype=np.uint8)
  out = images.clip_preprocess(img, 16)
  assert out.shape == (16, 16, 3) and out.dtype == np.float32
  np.testing.assert_allclose(out, (img / 255.0 - mean) / std, rtol=1e-5, atol=1e-5)


def test_clip_preprocess_resize_and_center_crop():
  # A wide image with a distinct middle third: after shortest-side resize + crop only it remains.
  img = np.zeros((60, 180, 3), np.uint8)
  img[:, 60:120] = (255, 255, 255)
  out = images.clip_preprocess(img, 30)
  assert out.shape == (30, 30, 3)
  white = (1.0 - np.array(images.CLIP_MEAN)) / np.array(images.CLIP_STD)
  np.testing.assert_allclose(out[5:25, 5:25], np.broadcast_to(white, (20, 20, 3)), atol=1e-4)
  tall = images.clip_preprocess(np.zeros((100, 40, 3), np.uint8), 20)
  assert tall.shape == (20, 20, 3)


def test_stack_images_pads_with_zeros():
  imgs = [np.full((10, 12, 3), 200, np.uint8), Image.new("L", (8, 8), 30)]
  stacked, n = images.stack_images(imgs, 4, 8)
  assert n == 2 and stacked.shape == (4, 8, 8, 3) and stacked.dtype == np.float32
  assert stacked[:2].any() and not stacked[2:].any()
  empty, n0 = images.stack_images([], 2, 8)
  assert n0 == 0 and not empty.any()
  with pytest.raises(ValueError, match="max_images=1"):
    images.stack_images(imgs, 1, 8)
