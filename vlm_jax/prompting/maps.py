"""Attribution-map post-processing and the map -> image step of Attention Prompting on Image
(Yu et al., ECCV 2024; reference/lavit_api.md 2.4, 2.5).

Token-grid maps Psi: float[..., G, G], every normalisation per map (over the last two axes):

  minmax(x)   = (x - min) / (max - min)          inverted_minmax(x) = (max - x) / (max - min)
  enhance(x)  = clip(sigmoid(coe * (x - mean) / std), 0, 1)      std unbiased (ddof = 1, torch's)
  box(x, k)   = k x k mean filter, stride 1, (k - 1) / 2 edge ("replicate") padding; k = 1: identity
  soft_or(a, b) = a + b - a * b
  CLIP:  Psi = minmax(soft_or(box(enhance(minmax(Psi_cls))), box(inverted_minmax(Psi_comp))))
  LLaVA: Psi = box(enhance(minmax(Psi_attn)))                    (no complementary map, no minmax)

A constant map has max = min (and std = 0), where the authors' code divides by zero; here
minmax/inverted_minmax give 0 and enhance gives sigmoid(0) = 0.5 instead of NaN.

Map -> image (the authors' `toImg`, `invtrans`, `merge`): the map becomes a uint8 image
(x * 255 truncated, torchvision's ToPILImage), is resized to the original image size with a PIL
filter, and the image is blended over a gray level g with m = mask / 255 per pixel:

  I^a = I * m + (1 - m) * g,   then truncated to uint8            (g = 0: the paper's I * Phi)

`floor` (ours, default 0 = the reference) raises m to at least `floor`, so no region goes fully to
g (the "Cutoff API prompting" follow-up found a floor helps on hallucination benchmarks).

Geometry: the reference stretches the map over the whole original image, although the grid covers
only what the model saw (CLIP: the centre crop; LLaVA-1.5: the image padded to a square), so for
non-square images the map is misplaced. `geometry="aligned"` maps the grid back through that
`Box` (the model input's footprint in original pixels): resized to the box, cropped where the box
leaves the image (LLaVA's padding), edge-extended (or filled with `outside`) where the box does not
cover it (CLIP's crop).
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

PIL_FILTERS = {"nearest": Image.Resampling.NEAREST, "box": Image.Resampling.BOX,
               "bilinear": Image.Resampling.BILINEAR, "bicubic": Image.Resampling.BICUBIC,
               "lanczos": Image.Resampling.LANCZOS}
GEOMETRIES = ("reference", "aligned")


def _safe(d: jax.Array) -> jax.Array:
  return jnp.where(d > 0, d, 1.0)


def minmax(x: jax.Array) -> jax.Array:
  """(x - min) / (max - min) per map.  x: float[..., H, W]."""
  lo = x.min(axis=(-2, -1), keepdims=True)
  hi = x.max(axis=(-2, -1), keepdims=True)
  return (x - lo) / _safe(hi - lo)


def inverted_minmax(x: jax.Array) -> jax.Array:
  """(max - x) / (max - min) per map: high similarity -> 0 (the complementary map)."""
  lo = x.min(axis=(-2, -1), keepdims=True)
  hi = x.max(axis=(-2, -1), keepdims=True)
  return (hi - x) / _safe(hi - lo)


def enhance(x: jax.Array, coe: float) -> jax.Array:
  """clip(sigmoid(coe * zscore(x)), 0, 1) per map, with the unbiased std (torch's `Tensor.std`)."""
  x = x.astype(jnp.float32)
  mean = x.mean(axis=(-2, -1), keepdims=True)
  std = jnp.std(x, axis=(-2, -1), keepdims=True, ddof=1)
  return jnp.clip(jax.nn.sigmoid(coe * (x - mean) / _safe(std)), 0.0, 1.0)


def box_filter(x: jax.Array, k: int) -> jax.Array:
  """k x k mean filter with edge padding, same size out.  x: float[..., H, W]; k odd."""
  if k < 1 or k % 2 == 0:
    raise ValueError(f"kernel_size must be a positive odd number, got {k}")
  if k == 1:
    return x
  r = (k - 1) // 2
  pad = [(0, 0)] * (x.ndim - 2) + [(r, r), (r, r)]
  xp = jnp.pad(x, pad, mode="edge")
  window = (1,) * (x.ndim - 2) + (k, k)
  s = jax.lax.reduce_window(xp, 0.0, jax.lax.add, window, (1,) * x.ndim, "VALID")
  return s / (k * k)


def soft_or(a: jax.Array, b: jax.Array) -> jax.Array:
  return a + b - a * b


def clip_postprocess(cls_scores: jax.Array, comp_scores: jax.Array, *, enhance_coe: float,
                     kernel_size: int) -> jax.Array:
  """The authors' `merge_mask`: raw Psi_cls, Psi_comp float[..., G, G] -> Psi in [0, 1]."""
  c = box_filter(enhance(minmax(cls_scores), enhance_coe), kernel_size)
  p = box_filter(inverted_minmax(comp_scores), kernel_size)
  return minmax(soft_or(c, p))


def llava_postprocess(scores: jax.Array, *, enhance_coe: float, kernel_size: int) -> jax.Array:
  """The authors' `revise_mask`: raw LLaVA attention map float[..., G, G] -> Psi in [0, 1]."""
  return box_filter(enhance(minmax(scores), enhance_coe), kernel_size)


# -------------------------------------------------------------------------------------------------
# Map -> image.


@dataclasses.dataclass(frozen=True)
class Box:
  """The model input's footprint in original-image pixels (x right, y down; may exceed the image)."""

  left: float
  top: float
  width: float
  height: float


def crop_box(width: int, height: int, size: int) -> Box:
  """CLIP's eval transform (`data.images.clip_preprocess`): shortest side -> size, centre crop."""
  if height <= width:
    new_h, new_w = size, int(size * width / height)
  else:
    new_h, new_w = int(size * height / width), size
  top, left = round((new_h - size) / 2.0), round((new_w - size) / 2.0)
  sx, sy = width / new_w, height / new_h
  return Box(left * sx, top * sy, size * sx, size * sy)


def pad_box(width: int, height: int) -> Box:
  """LLaVA-1.5's `expand2square`: the image centred on a max(W, H) square (then resized)."""
  side = max(width, height)
  return Box(-((side - width) // 2), -((side - height) // 2), side, side)


def map_to_uint8(psi: np.ndarray) -> np.ndarray:
  """float[G, G] in [0, 1] -> uint8[G, G]: x * 255 truncated, as torchvision's ToPILImage."""
  return (np.clip(np.asarray(psi, np.float32), 0.0, 1.0) * 255.0).astype(np.uint8)


def mask_for_image(psi: np.ndarray, width: int, height: int, *, method: str = "lanczos",
                   geometry: str = "reference", box: Box | None = None,
                   outside: float | None = None) -> np.ndarray:
  """Token-grid map float[G, G] in [0, 1] -> mask uint8[height, width] over the original image.

  geometry "reference": resized to the whole image (the authors' code); "aligned": resized to
  `box` and placed there, the uncovered part edge-extended (or `outside` * 255 when given).
  """
  if method not in PIL_FILTERS:
    raise ValueError(f"interpolation {method!r} is not one of {sorted(PIL_FILTERS)}")
  if geometry not in GEOMETRIES:
    raise ValueError(f"geometry {geometry!r} is not one of {GEOMETRIES}")
  small = Image.fromarray(map_to_uint8(psi), mode="L")
  if geometry == "reference":
    return np.asarray(small.resize((width, height), PIL_FILTERS[method]))
  if box is None:
    raise ValueError("geometry='aligned' needs the box the model input covers (crop_box/pad_box)")
  bw, bh = max(1, round(box.width)), max(1, round(box.height))
  big = np.asarray(small.resize((bw, bh), PIL_FILTERS[method]))
  ys = np.arange(height) - round(box.top)
  xs = np.arange(width) - round(box.left)
  out = big[np.clip(ys, 0, bh - 1)][:, np.clip(xs, 0, bw - 1)]
  if outside is not None:
    inside = ((ys >= 0) & (ys < bh))[:, None] & ((xs >= 0) & (xs < bw))[None, :]
    out = np.where(inside, out, np.uint8(round(255 * float(outside))))
  return np.ascontiguousarray(out, np.uint8)


def blend(image: jax.Array, mask: jax.Array, *, gray: float = 0.0, floor: float = 0.0) -> jax.Array:
  """I * m + (1 - m) * gray, truncated to uint8.  image: uint8[..., H, W, 3]; mask: float[..., H, W]
  in [0, 1] (uint8 masks divide by 255 first); m = max(mask, floor). Jittable, batched."""
  m = jnp.maximum(jnp.asarray(mask, jnp.float32), floor)[..., None]
  out = jnp.asarray(image, jnp.float32) * m + (1.0 - m) * jnp.float32(gray)
  return jnp.clip(out, 0, 255).astype(jnp.uint8)


# Matplotlib's "jet" at five control points: a heat colouring without a plotting dependency.
_JET = np.array([[0, 0, 0.5], [0, 0.5, 1], [0.5, 1, 0.5], [1, 0.5, 0], [0.5, 0, 0]], np.float32)


def overlay(image: np.ndarray, mask: np.ndarray, alpha: float = 0.5) -> np.ndarray:
  """A heat-coloured view for people: (1 - alpha) * I + alpha * jet(m).  uint8[H, W, 3]."""
  m = np.asarray(mask, np.float32) / 255.0 if np.asarray(mask).dtype == np.uint8 else mask
  grid = np.linspace(0.0, 1.0, len(_JET))
  colour = np.stack([np.interp(m, grid, _JET[:, c]) for c in range(3)], -1) * 255.0
  out = (1.0 - alpha) * np.asarray(image, np.float32) + alpha * colour
  return np.clip(out, 0, 255).astype(np.uint8)
