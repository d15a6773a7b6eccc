"""Every kind of bad or unusual image `images.decode_image` meets in web data, each built here.

Unusable images must raise `BadRecord` with the right reason (and drop the whole record in the
transforms); unusual-but-fine ones must come out as the exact RGB pixels.
"""

import io
import pathlib
import struct
import warnings
import zlib

import numpy as np
import pytest
from PIL import Image, ImageFile

from vlm_jax.data import images, interleaved
from vlm_jax.data import tokenizer as tok_lib
from vlm_jax.data.records import BadRecord, Skip, skipping


def _encode(pil, fmt="PNG", **kwargs):
  buf = io.BytesIO()
  pil.save(buf, format=fmt, **kwargs)
  return buf.getvalue()


def _reason(item, **kwargs):
  with pytest.raises(BadRecord) as info:
    images.decode_image(item, **kwargs)
  return info.value.reason


def _decode(item, **kwargs):
  """decode_image for the conversion tests, whose images are a few pixels wide (under the default
  min_side)."""
  return images.decode_image(item, **{"min_side": 1, **kwargs})


def _gray3(values):
  return np.repeat(np.asarray(values, np.uint8)[..., None], 3, axis=-1)


def _png_header_only(width, height):
  """A 1-bit grayscale PNG that declares width x height but holds one row of pixel data, so it is
  ~80 bytes however large the declared size."""
  def chunk(kind, data):
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
  ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)  # bit depth 1, grayscale
  row = b"\x00" * (1 + (width + 7) // 8)  # filter byte + packed bits
  return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(row, 9))
          + chunk(b"IEND", b""))


# ----------------------------------------------------------------------------- rejected kinds


def test_truncated_jpeg_is_rejected_not_grey_filled(tmp_path):
  assert ImageFile.LOAD_TRUNCATED_IMAGES is False
  arr = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
  data = _encode(Image.fromarray(arr), "JPEG", quality=90)
  # Cut late (only the last scan bytes missing), in the middle, and inside the header.
  for cut in (len(data) - 8, len(data) // 2, 120):
    assert _reason(data[:cut]) == "image_undecodable", cut
  path = tmp_path / "cut.jpg"
  path.write_bytes(data[: len(data) // 2])
  assert _reason(path) == "image_undecodable"
  assert _reason(b"<html>404 Not Found</html>") == "image_undecodable"


def test_truncated_png_is_rejected():
  data = _encode(Image.fromarray(np.random.default_rng(1).integers(0, 256, (32, 32, 3), np.uint8)))
  assert _reason(data[: len(data) // 2]) == "image_undecodable"


def test_load_truncated_images_switched_on_is_refused(monkeypatch):
  # Some libraries set this globally; PIL would then grey-fill truncated files silently.
  monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
  with pytest.raises(RuntimeError, match="LOAD_TRUNCATED_IMAGES"):
    images.decode_image(_encode(Image.new("RGB", (4, 4))))


def test_zero_bytes_is_empty(tmp_path):
  path = tmp_path / "empty.jpg"
  path.write_bytes(b"")
  assert _reason(path) == "image_empty"
  assert _reason(str(path)) == "image_empty"
  assert _reason(b"") == "image_empty"


def test_missing_path(tmp_path):
  assert _reason(tmp_path / "nope.jpg") == "image_missing"  # pathlib
  assert _reason(str(tmp_path / "nope.jpg")) == "image_missing"  # str
  assert _reason(str(tmp_path)) == "image_missing"  # a directory is not an image file
  assert _reason(None) == "image_missing"


def test_too_small_by_side_and_by_bytes():
  one = _encode(Image.new("RGB", (1, 1), (9, 9, 9)))
  assert _reason(one) == "image_too_small"  # default min_side=8
  assert _reason(_encode(Image.new("RGB", (7, 64)))) == "image_too_small"
  assert images.decode_image(_encode(Image.new("RGB", (8, 64)))).shape == (64, 8, 3)
  assert _reason(Image.new("RGB", (1, 5))) == "image_too_small"
  assert _reason(np.zeros((5, 1, 3), np.uint8)) == "image_too_small"
  np.testing.assert_array_equal(images.decode_image(one, min_side=1), [[[9, 9, 9]]])
  assert _reason(one, min_side=1, min_bytes=len(one) + 1) == "image_too_small"


def test_huge_declared_size_rejected_from_the_header(monkeypatch):
  decoded = []
  real_load = ImageFile.ImageFile.load
  monkeypatch.setattr(ImageFile.ImageFile, "load", lambda self: decoded.append(self.size)
                      or real_load(self))
  huge = _png_header_only(20000, 20000)
  assert len(huge) < 200
  # 4e8 pixels: above 2x PIL's limit, so PIL's DecompressionBombError fires inside open().
  assert _reason(huge) == "image_too_large"
  # 1e8 pixels: PIL only warns; our max_pixels check rejects it before any pixel is decoded.
  mid = _png_header_only(10000, 10000)
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", Image.DecompressionBombWarning)
    assert _reason(mid) == "image_too_large"
  with warnings.catch_warnings():
    warnings.simplefilter("error")  # a run with -W error: the warning arrives as an exception
    assert _reason(mid) == "image_too_large"
  # Our own budget, well under PIL's.
  assert _reason(_png_header_only(100, 100), max_pixels=5000) == "image_too_large"
  assert decoded == []  # every verdict came from the header: no pixels were decoded
  images.decode_image(_png_header_only(100, 100), max_pixels=10000)
  assert decoded and set(decoded) == {(100, 100)}  # the spy does see decoding


def test_unsupported_type_and_bad_array():
  assert _reason(12345) == "image_undecodable"
  assert _reason(np.zeros((16, 16, 2), np.uint8)) == "image_undecodable"


# ----------------------------------------------------------------------------- converted kinds


def test_cmyk_jpeg_and_tiff():
  pil = Image.new("CMYK", (8, 8), (0, 255, 255, 0))  # pure red
  out = _decode(_encode(pil, "JPEG", quality=100))
  assert out.shape == (8, 8, 3) and out.dtype == np.uint8
  np.testing.assert_allclose(out[4, 4], [255, 0, 0], atol=8)
  # Lossless CMYK: exact.
  np.testing.assert_array_equal(_decode(_encode(pil, "TIFF")),
                                np.broadcast_to([255, 0, 0], (8, 8, 3)))


@pytest.mark.parametrize("transparent", [False, True])
def test_palette_png(transparent):
  pil = Image.new("P", (3, 2))
  pil.putpalette([10, 20, 30, 200, 100, 50] + [0] * 762)
  pil.putpixel((1, 1), 1)
  data = _encode(pil, transparency=0) if transparent else _encode(pil)
  first = [255, 255, 255] if transparent else [10, 20, 30]  # palette entry 0 is the transparent one
  expected = np.array([[first] * 3, [first, [200, 100, 50], first]], np.uint8)
  np.testing.assert_array_equal(_decode(data), expected)


def test_la_png():
  la = np.array([[[100, 0], [100, 255], [100, 128]]] * 2, np.uint8)
  out = _decode(_encode(Image.fromarray(la, "LA")))
  # 100 * 128/255 + 255 * 127/255 = 177.2
  np.testing.assert_array_equal(out, _gray3([[255, 100, 177]] * 2))


def test_rgba_png():
  rgba = np.array([[[255, 0, 0, 0], [0, 0, 255, 255], [0, 0, 0, 128]]] * 2, np.uint8)
  out = _decode(_encode(Image.fromarray(rgba, "RGBA")))
  np.testing.assert_array_equal(out, [[[255, 255, 255], [0, 0, 255], [127, 127, 127]]] * 2)


def test_16bit_png_is_rescaled_not_clipped():
  arr16 = np.array([[0, 32768, 65535], [257, 1000, 65280]], np.uint16)
  data = _encode(Image.fromarray(arr16))
  assert Image.open(io.BytesIO(data)).mode.startswith("I")  # really stored as 16-bit
  out = _decode(data)
  # 65535 -> 255, 32768 -> 127.5 -> 128, 257 -> 1, 1000 -> 3.9 -> 4, 65280 -> 254; PIL's own
  # convert("RGB") would give 255 for every non-zero value.
  np.testing.assert_array_equal(out, _gray3([[0, 128, 255], [1, 4, 254]]))


def test_grayscale_and_1bit_png():
  gray = np.array([[0, 77, 255], [1, 2, 3]], np.uint8)
  np.testing.assert_array_equal(_decode(_encode(Image.fromarray(gray, "L"))),
                                _gray3(gray))
  bits = Image.fromarray(np.array([[True, False], [False, True]]))
  assert bits.mode == "1"
  np.testing.assert_array_equal(_decode(_encode(bits)), _gray3([[255, 0], [0, 255]]))


def test_exif_orientation_6_rotates_clockwise():
  # Stored 32 wide x 16 high, quadrants red | green over blue | white.
  stored = np.zeros((16, 32, 3), np.uint8)
  stored[:8, :16], stored[:8, 16:] = (255, 0, 0), (0, 255, 0)
  stored[8:, :16], stored[8:, 16:] = (0, 0, 255), (255, 255, 255)
  exif = Image.Exif()
  exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
  data = _encode(Image.fromarray(stored), "JPEG", quality=100, subsampling=0, exif=exif)
  raw = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))  # as stored, JPEG loss included
  out = _decode(data)
  assert out.shape == (32, 16, 3)  # width and height swapped
  np.testing.assert_array_equal(out, np.rot90(raw, k=-1))  # exact: same decoded pixels, rotated
  # Clockwise: the stored bottom-left (blue) is now top-left, the stored top-left (red) top-right.
  np.testing.assert_allclose(out[4, 4], [0, 0, 255], atol=6)
  np.testing.assert_allclose(out[4, 12], [255, 0, 0], atol=6)
  np.testing.assert_allclose(out[28, 4], [255, 255, 255], atol=6)
  np.testing.assert_allclose(out[28, 12], [0, 255, 0], atol=6)


def test_path_items(tmp_path):
  arr = np.random.default_rng(2).integers(0, 256, (5, 6, 3), dtype=np.uint8)
  path = tmp_path / "ok.png"
  path.write_bytes(_encode(Image.fromarray(arr)))
  for item in (path, str(path), pathlib.PurePath(path)):
    np.testing.assert_array_equal(_decode(item), arr)


# ----------------------------------------------------------------------------- whole record dropped


def test_one_bad_image_drops_the_whole_record():
  good = np.full((16, 16, 3), 200, np.uint8)
  truncated = _encode(Image.fromarray(good), "JPEG")[:100]
  with pytest.raises(BadRecord) as info:
    images.stack_images([good, truncated], 3, 8)
  assert info.value.reason == "image_undecodable"

  transform = interleaved.InterleavedTransform(tok_lib.synthetic_tokenizer(), 16, 2, 8)
  record = {"id": "doc-7", "images": [good, b""],
            "text": "<image>A red circle.<|endofchunk|><image>A blue square.<|endofchunk|>"}
  skip = skipping(transform)(record)
  assert isinstance(skip, Skip) and skip.reason == "image_empty" and "doc-7" in skip.detail
  record["images"][1] = np.zeros((1, 16, 3), np.uint8)
  assert skipping(transform)(record).reason == "image_too_small"
  record["images"][1] = good
  assert not isinstance(skipping(transform)(record), Skip)
