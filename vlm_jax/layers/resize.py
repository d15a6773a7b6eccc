"""Image / grid resizing with PyTorch's `F.interpolate` semantics, as separable matrices.

The methods' released code resizes with torch, and parity needs its exact kernels, which
`jax.image.resize` does not all share (its cubic is Keys a = -0.5; torch's bicubic is a = -0.75):

  bicubic (align_corners=False, antialias=False): source x = (i + 0.5) * in/out - 0.5,
      taps floor(x)-1 .. floor(x)+2 clamped to the border, weights W(t) with the cubic
      convolution kernel W(d) = (a+2)|d|^3 - (a+3)|d|^2 + 1 (|d| <= 1),
      a|d|^3 - 5a|d|^2 + 8a|d| - 4a (1 < |d| < 2), a = -0.75;
  bicubic_aa (antialias=True): torch's a = -0.5 kernel stretched by the scale when downsampling;
  bilinear_aa (antialias=True, the downsampling FlexAttention uses for its 336 px view): centre
      c = (i + 0.5) * s with s = in/out, support = max(s, 1), taps j in [int(c - support + 0.5),
      int(c + support + 0.5)), weights tri((j - c + 0.5) / max(s, 1)), normalised to sum 1.

`bicubic_matrix` / `resize_bicubic` reproduce torch's float32 arithmetic (one rounding of the
source coordinate), `resize_matrix` / `resize(x, (h, w), method)` apply the [out, in] matrix of each axis (two small matmuls: static
shapes, any batch, runs on TPU/GPU as dense contractions).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

METHODS = ("bicubic", "bicubic_aa", "bilinear_aa")


def _cubic_near(x: np.ndarray, a: float) -> np.ndarray:
  """Keys' cubic W(x) for |x| <= 1 (torch `cubic_convolution1`), in float32 like torch."""
  a = np.float32(a)
  return ((a + 2) * x - (a + 3)) * x * x + 1


def _cubic_far(x: np.ndarray, a: float) -> np.ndarray:
  """Keys' cubic W(x) for 1 <= |x| <= 2 (torch `cubic_convolution2`)."""
  a = np.float32(a)
  return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a


def _cubic_filter(x: np.ndarray, a: float) -> np.ndarray:
  """Keys' cubic W(x) on the whole line (torch `aa_filter`): 0 for |x| >= 2."""
  x = np.abs(x).astype(np.float32)
  return np.where(x < 1, _cubic_near(x, a), np.where(x < 2, _cubic_far(x, a), 0)).astype(np.float32)


@functools.lru_cache(maxsize=64)
def bicubic_matrix(in_size: int, out_size: int, antialias: bool = False) -> np.ndarray:
  """float32[out_size, in_size]: row o holds the weights torch's bicubic kernel gives the input
  samples for output o along one axis (align_corners=False, size given, no scale_factor)."""
  if in_size < 1 or out_size < 1:
    raise ValueError(f"bicubic_matrix: sizes must be positive, got {in_size} -> {out_size}")
  mat = np.zeros((out_size, in_size), np.float32)
  scale = np.float32(in_size) / np.float32(out_size)
  o = np.arange(out_size, dtype=np.float32)
  if not antialias:
    # upsample_bicubic2d: x = scale (o + 0.5) - 0.5, unclamped for cubic; floor index kept <= in-1
    # and the fraction in [0, 1] (`guard_index_and_lambda`); taps clamped to the border. torch's
    # CPU kernel rounds x once (a fused multiply-add); rounding the product first moves x by an ulp,
    # which near x = 256 is 3e-5 and changes the weights by 2e-5 (e.g. 336 -> 1008, column 768).
    src = (np.float64(scale) * (o.astype(np.float64) + 0.5) - 0.5).astype(np.float32)
    i0 = np.minimum(np.floor(src).astype(np.int64), in_size - 1)
    t = np.clip(src - i0.astype(np.float32), 0, 1).astype(np.float32)
    w = np.stack([_cubic_far(t + 1, -0.75), _cubic_near(t, -0.75), _cubic_near(1 - t, -0.75),
                  _cubic_far(2 - t, -0.75)], axis=1).astype(np.float32)
    idx = np.clip(i0[:, None] + np.arange(-1, 3)[None, :], 0, in_size - 1)
    np.add.at(mat, (np.repeat(np.arange(out_size), 4), idx.reshape(-1)), w.reshape(-1))
  else:
    # _upsample_bicubic2d_aa: a -0.5 kernel stretched by the scale when downsampling, taps cut at
    # the border and the row renormalised (`_compute_indices_min_size_weights_aa`).
    support = np.float32(2.0) * scale if scale >= 1 else np.float32(2.0)
    invscale = np.float32(1.0) / scale if scale >= 1 else np.float32(1.0)
    max_taps = int(math.ceil(float(support))) * 2 + 1
    for i in range(out_size):
      center = scale * np.float32(i + 0.5)
      xmin = max(int(center - support + np.float32(0.5)), 0)
      xsize = min(int(center + support + np.float32(0.5)), in_size) - xmin
      xsize = min(max(xsize, 0), max_taps)
      j = np.arange(xsize, dtype=np.float32)
      w = _cubic_filter((j + np.float32(xmin) - center + np.float32(0.5)) * invscale, -0.5)
      total = w.sum(dtype=np.float32)
      mat[i, xmin:xmin + xsize] = w / total if total != 0 else w
  mat.setflags(write=False)  # cached and shared
  return mat


def resize_bicubic(x: jax.Array, size: tuple[int, int], *, antialias: bool = False) -> jax.Array:
  """torch `F.interpolate(x, size, mode="bicubic", align_corners=False, antialias=...)`, NHWC.

  x: float[B, H, W, C] -> float[B, size[0], size[1], C] in x's dtype (computed in float32). Values
  are not clamped (torch does not clamp float images either).
  """
  if x.ndim != 4:
    raise ValueError(f"resize_bicubic: expected float[B, H, W, C], got shape {x.shape}")
  if not jnp.issubdtype(x.dtype, jnp.floating):
    raise TypeError(f"resize_bicubic: expected a floating image, got {x.dtype}")
  (h, w), (oh, ow) = x.shape[1:3], size
  if (h, w) == (oh, ow) and not antialias:
    return x  # the weights are exactly one-hot at scale 1
  ah = jnp.asarray(bicubic_matrix(h, oh, antialias))
  aw = jnp.asarray(bicubic_matrix(w, ow, antialias))
  hi = jax.lax.Precision.HIGHEST
  y = jnp.einsum("pw,bhwc->bhpc", aw, x.astype(jnp.float32), precision=hi)  # width first, like
  y = jnp.einsum("oh,bhpc->bopc", ah, y, precision=hi)  # torch's separable antialiased path
  return y.astype(x.dtype)


@functools.lru_cache(maxsize=64)
def resize_matrix(size_in: int, size_out: int, method: str = "bicubic") -> np.ndarray:
  """[size_out, size_in]: row i holds the weights of output sample i."""
  if method not in METHODS:
    raise ValueError(f"resize method {method!r} is not one of {METHODS}")
  if method.startswith("bicubic"):
    return bicubic_matrix(size_in, size_out, antialias=method == "bicubic_aa")
  scale = size_in / size_out
  m = np.zeros((size_out, size_in))
  for i in range(size_out):
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
