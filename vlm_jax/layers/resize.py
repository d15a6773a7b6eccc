"""Image / grid resizing with PyTorch's `F.interpolate` semantics, as separable matrices.

The methods' released code resizes with torch, and parity needs its exact kernels, which
`jax.image.resize` does not all share (its cubic is Keys a = -0.5; torch's bicubic is a = -0.75):

  bicubic (align_corners=False, antialias=False): source x = (i + 0.5) * in/out - 0.5,
      taps floor(x)-1 .. floor(x)+2 clamped to the border, weights W(t) with the cubic
      convolution kernel W(d) = (a+2)|d|^3 - (a+3)|d|^2 + 1 (|d| <= 1),
      a|d|^3 - 5a|d|^2 + 8a|d| - 4a (1 < |d| < 2), a = -0.75;
  bilinear_aa (antialias=True, the downsampling FlexAttention uses for its 336 px view): centre
      c = (i + 0.5) * s with s = in/out, support = max(s, 1), taps j in [int(c - support + 0.5),
      int(c + support + 0.5)), weights tri((j - c + 0.5) / max(s, 1)), normalised to sum 1.

`resize(x, (h, w), method)` applies the [out, in] matrix of each axis (two small matmuls: static
shapes, any batch, runs on TPU/GPU as dense contractions).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

METHODS = ("bicubic", "bilinear_aa")


def _cubic(d: np.ndarray, a: float = -0.75) -> np.ndarray:
  d = np.abs(d)
  near = ((a + 2) * d - (a + 3)) * d * d + 1
  far = ((a * d - 5 * a) * d + 8 * a) * d - 4 * a
  return np.where(d <= 1, near, np.where(d < 2, far, 0.0))


@functools.lru_cache(maxsize=64)
def resize_matrix(size_in: int, size_out: int, method: str = "bicubic") -> np.ndarray:
  """float64[size_out, size_in]: row i holds the weights of output sample i."""
  if method not in METHODS:
    raise ValueError(f"resize method {method!r} is not one of {METHODS}")
  scale = size_in / size_out
  m = np.zeros((size_out, size_in))
  for i in range(size_out):
    if method == "bicubic":
      x = (i + 0.5) * scale - 0.5
      x0 = math.floor(x)
      t = x - x0
      for k, w in zip(range(-1, 3), _cubic(np.array([1 + t, t, 1 - t, 2 - t]))):
        m[i, min(max(x0 + k, 0), size_in - 1)] += w
    else:
      centre = (i + 0.5) * scale
      support = max(scale, 1.0)
      lo = max(int(centre - support + 0.5), 0)
      hi = min(int(centre + support + 0.5), size_in)
      j = np.arange(lo, hi)
      w = np.maximum(0.0, 1.0 - np.abs((j - centre + 0.5) / support))
      m[i, lo:hi] = w / w.sum()
  return m


def resize(x: jax.Array, size: tuple[int, int], method: str = "bicubic", *,
           axes: tuple[int, int] = (-3, -2)) -> jax.Array:
  """x: float[..., H, W, C] (NHWC; `axes` picks the two spatial axes) -> float[..., h, w, C],
  computed in float32 and returned in x's dtype."""
  ah, aw = (a % x.ndim for a in axes)
  mh = jnp.asarray(resize_matrix(x.shape[ah], size[0], method), jnp.float32)
  mw = jnp.asarray(resize_matrix(x.shape[aw], size[1], method), jnp.float32)
  y = jnp.moveaxis(x.astype(jnp.float32), (ah, aw), (-2, -1))
  y = jnp.einsum("oh,...hw,pw->...op", mh, y, mw, precision=jax.lax.Precision.HIGHEST)
  return jnp.moveaxis(y, (-2, -1), (ah, aw)).astype(x.dtype)
