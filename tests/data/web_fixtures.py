"""Small files for the web-corpus reader tests: images that tell themselves apart, tar shards."""

from __future__ import annotations

import io
import tarfile

import numpy as np
from PIL import Image


def noise_png(seed: int, side: int = 64) -> bytes:
  """A PNG of uniform noise: incompressible, so 64x64 is ~12.4 KB (over OF's 11,000-byte floor),
  and every seed gives different bytes."""
  pixels = np.random.default_rng(seed).integers(0, 256, (side, side, 3), dtype=np.uint8)
  out = io.BytesIO()
  Image.fromarray(pixels).save(out, "PNG")
  return out.getvalue()


def small_jpeg(colour=(220, 35, 35)) -> bytes:
  """A flat 8x8 JPEG: a valid image of a few hundred bytes (under OF's size floor)."""
  out = io.BytesIO()
  Image.new("RGB", (8, 8), colour).save(out, "JPEG")
  return out.getvalue()


def write_tar(path, members: list[tuple[str, bytes]]) -> None:
  """A tar of the (name, data) members in order, as webdataset's ShardWriter lays them out."""
  with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
    for name, data in members:
      info = tarfile.TarInfo(name)
      info.size = len(data)
      tar.addfile(info, io.BytesIO(data))
