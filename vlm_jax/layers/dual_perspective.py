"""INF-LLaVA's dual-perspective layers (arXiv 2407.16198, "INF-LLaVA: Dual-perspective Perception
for High-Resolution Multimodal Large Language Model"): the Dual-perspective Cropping Module (DCM),
the Dual-perspective Enhancement Module (DEM), and the PyTorch-exact bicubic resize they need.

DCM (Sec. 4.2), on an image I: float[B, nH, nW, C] split into an n x n grid of H x W crops:

  local   I^loc_k[u, v] = I[i H + u, j W + v],   k = i n + j  (row-major: i over rows)
  strided I^glo_k[u, v] = I[n u + p, n v + q],   k = p n + q  (phase p over rows, outer)
  resized I^res = bicubic(I, (H, W))                             (torch semantics, no antialias)

`dual_perspective_crops` stacks the 2n^2 + 1 views of every image on one batch axis, batch-major
(row b V + v, V = 2n^2 + 1, views in the order [n^2 local, n^2 strided, resized]), so one CLIP call
encodes all of them and sharding the batch axis keeps an image's views on one device.

DEM (Sec. 4.3), on the CLIP patch features of those views (S x S tokens per view, width D). With
Stitch_loc / Stitch_glo the exact inverses of the two crops (tokens go back by 2-D position):

  F^loc = Stitch_loc(local features),  F^glo = Stitch_glo(strided features)       [B, nS, nS, D]
  A(q, kv) = LN(W_o MHA(q W_q, kv W_k, kv W_v) + q)        (Eqs. 20-25; one module, every window)
  V^glo = Stitch_loc_k A(Crop_loc(F^glo)_k, Crop_loc(F^loc)_k)    "local-enhanced global"
  V^loc = Stitch_glo_k A(Crop_glo(F^loc)_k, Crop_glo(F^glo)_k)    "global-enhanced local"
  F = LN_fuse([FFN_crop(V^loc), FFN_stride(V^glo)] + V^glo + V^loc)   (Eqs. 26-27)
  F_pool = F[:, c::n, c::n],  c = (n - 1) / 2                            (F_pool)
  out = (CLIP(I^res) + F_pool) / 2                        float[B, S^2, D], the projector's input

Fidelity (the differences are listed in `reference/flex_inf.md` 2.6; the default is the authors'
code, `WeihuangLin/INF-LLaVA` `SpatialEmbed`, whose weights the checkpoints hold):
- Window pairing: the code queries with the global map over contiguous windows and with the local
  map over strided windows (as the paper's introduction reads); Secs. 4.3.2-4.3.3 pair them the
  other way round: `window_pairing="paper"`. In the code pairing the key/value windows are exactly
  the original crops' features (Crop_loc(F^loc)_k is local crop k, Crop_glo(F^glo)_k strided crop
  k).
- Attention: the paper is silent on sharing, heads and normalisation; the code has ONE post-LN
  multi-head attention (8 heads, biases, output projection, residual = the raw query) for both
  directions and all windows. That is the only attention here; both directions and all n^2 windows
  go through it as one [2 B n^2, S^2, D] batch.
- Fusion: the code's FFNs are bottleneck MLPs D -> D/16 -> D/2 (exact GELU) plus the residual of
  both enhanced maps and `ln_fuse`; the paper's Eqs. 26-27 are a linear D -> D/2 per branch and the
  concat only: `fusion="linear_concat"` (params `proj_crop`, `proj_stride`).
- Pooling: the code resizes F bilinearly (align_corners=False) by the exact factor n, which reads
  the centre token of every n x n block (for even n, the mean of the 2 x 2 centre); the paper says
  average pooling: `pooling="average"`.
- Consequence of the code's centre pick (derived, and tested): for odd n, F_pool reads only the
  fused tokens (n i + c, n j + c). Each depends on all local crops, but the strided features enter
  only through phase (c, c): in V^glo as the query token (Stitch_glo puts phase (c, c) at the block
  centres), in V^loc as the keys/values of the one strided window whose queries are kept. The other
  n^2 - 1 strided views get exactly zero gradient and do not change the output, so a model running
  the default may skip their CLIP forwards (19 -> 11 at n = 3). The paper's pairing or pooling uses
  all views.
- Combination: the code takes the mean of the resized view's tokens and F_pool; the paper says
  element-wise addition: `combine="add"`.

Bicubic (`layers.resize.resize_bicubic`): torch.nn.functional.interpolate(mode="bicubic", align_corners=False):
source coordinate x = (o + 1/2) in/out - 1/2 (not clamped), Keys' cubic with a = -0.75 on the 4 taps
floor(x) - 1 .. floor(x) + 2, indices clamped to the border. Without antialias an exact 3x
downsample lands on x = 3 o + 1 with weights (0, 1, 0, 0): pure subsampling, so the DCM's resized
view of a 1008 image IS its strided crop (1, 1), and with the DEM note above the default's output
needs 10 distinct CLIP forwards per image, not 19 (derived, and tested). `antialias=True` gives
torch's antialiased kernel (a = -0.5, support widened by the scale, taps cut at the border and
renormalised). `jax.image.resize` uses
a = -0.5 and antialiases downsampling, so it does not reproduce the checkpoints' inputs. The
weights depend only on the shapes: they are built once in numpy as [out, in] matrices, and the
resize is two matmuls at HIGHEST precision (accelerators would otherwise round them to bf16/tf32).
"""

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from vlm_jax.layers.attention import dot_product_attention
from vlm_jax.layers.linear import dense
from vlm_jax.layers.mlp import Mlp
from vlm_jax.layers.norms import LayerNorm
from vlm_jax.layers.resize import resize_bicubic

Dtype = Any
WINDOW_PAIRINGS = ("code", "paper")
FUSIONS = ("mlp_residual", "linear_concat")
POOLINGS = ("center", "average")
COMBINES = ("mean", "add")
_TOKENS_AXES = ("activation_batch", "activation_length", "activation_embed")


def num_views(n: int) -> int:
  """Views per image: n^2 local crops, n^2 strided crops and the resized whole image."""
  return 2 * n * n + 1


# ---------------------------------------------------------------------------------------------
# DCM: crops and their inverses. All four are permutations (reshape + transpose): exact, any dtype.


def _grid_dims(fn: str, x: jax.Array, n: int) -> tuple[int, int]:
  if x.ndim != 4:
    raise ValueError(f"{fn}: expected float[B, H, W, C], got shape {x.shape}")
  if n < 1 or x.shape[1] % n or x.shape[2] % n:
    raise ValueError(f"{fn}: height and width {x.shape[1:3]} must be multiples of n={n}")
  return x.shape[1] // n, x.shape[2] // n


def _crop_dims(fn: str, crops: jax.Array, n: int) -> None:
  if crops.ndim != 5 or crops.shape[1] != n * n:
    raise ValueError(f"{fn}: expected float[B, n*n={n * n}, h, w, C], got shape {crops.shape}")


def crop_local(x: jax.Array, n: int) -> jax.Array:
  """Contiguous tiles (`crop_pixels_N`).  x: [B, nH, nW, C] -> [B, n*n, H, W, C].

  Crop k = i n + j is x[:, i H:(i+1) H, j W:(j+1) W].
  """
  h, w = _grid_dims("crop_local", x, n)
  b, c = x.shape[0], x.shape[-1]
  x = x.reshape(b, n, h, n, w, c)  # row i H + u, column j W + v -> [B, i, u, j, v, C]
  return x.transpose(0, 1, 3, 2, 4, 5).reshape(b, n * n, h, w, c)


def crop_strided(x: jax.Array, n: int) -> jax.Array:
  """Dilated sub-images (`extract_pixels_N`).  x: [B, nH, nW, C] -> [B, n*n, H, W, C].

  Crop k = p n + q is x[:, p::n, q::n]: every n-th pixel at phase (p, q).
  """
  h, w = _grid_dims("crop_strided", x, n)
  b, c = x.shape[0], x.shape[-1]
  x = x.reshape(b, h, n, w, n, c)  # row n u + p, column n v + q -> [B, u, p, v, q, C]
  return x.transpose(0, 2, 4, 1, 3, 5).reshape(b, n * n, h, w, c)


def stitch_local(crops: jax.Array, n: int) -> jax.Array:
  """Inverse of `crop_local` (`combine_crop_features_N`).

  crops: [B, n*n, h, w, C] -> [B, nh, nw, C]; crop k = i n + j fills rows i h.., columns j w..
  """
  _crop_dims("stitch_local", crops, n)
  b, _, h, w, c = crops.shape
  x = crops.reshape(b, n, n, h, w, c)  # [B, i, j, u, v, C]
  return x.transpose(0, 1, 3, 2, 4, 5).reshape(b, n * h, n * w, c)


def stitch_strided(crops: jax.Array, n: int) -> jax.Array:
  """Inverse of `crop_strided` (`combine_stride_features_N`): token (u, v) of crop p n + q goes to
  (n u + p, n v + q).  crops: [B, n*n, h, w, C] -> [B, nh, nw, C]."""
  _crop_dims("stitch_strided", crops, n)
  b, _, h, w, c = crops.shape
  x = crops.reshape(b, n, n, h, w, c)  # [B, p, q, u, v, C]
  return x.transpose(0, 3, 1, 4, 2, 5).reshape(b, h * n, w * n, c)


def dual_perspective_crops(images: jax.Array, n: int = 3, crop_size: int = 336) -> jax.Array:
  """DCM: images float[B, H, W, C] -> views float[B * (2n^2 + 1), crop_size, crop_size, C].

  The image is first resized (bicubic, torch semantics) to n * crop_size square, as the authors'
  `encode_images` does (a no-op for 1008 input); local and strided crops then come from that image
  and the resized view is its bicubic downsample to crop_size (no antialias). Views are batch-major:
  row b V + v, v in [0, n^2) local, [n^2, 2n^2) strided, 2n^2 the resized view.
  """
  if images.ndim != 4:
    raise ValueError(f"dual_perspective_crops: expected float[B, H, W, C], got {images.shape}")
  hr = n * crop_size
  images = resize_bicubic(images, (hr, hr))
  b, c = images.shape[0], images.shape[-1]
  resized = resize_bicubic(images, (crop_size, crop_size))[:, None]
  views = jnp.concatenate([crop_local(images, n), crop_strided(images, n), resized], axis=1)
  return views.reshape(b * num_views(n), crop_size, crop_size, c)


def split_views(features: jax.Array, n: int) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Undo the batch-major stacking of `dual_perspective_crops` on per-view features.

  features: float[B * (2n^2 + 1), ...] -> (local [B, n^2, ...], strided [B, n^2, ...],
  resized [B, ...]).
  """
  v = num_views(n)
  if features.shape[0] % v:
    raise ValueError(f"split_views: the batch axis ({features.shape[0]}) must be a multiple of "
                     f"2n^2+1 = {v} views per image (n={n})")
  x = features.reshape(features.shape[0] // v, v, *features.shape[1:])
  return x[:, :n * n], x[:, n * n:2 * n * n], x[:, 2 * n * n]


def center_subsample(x: jax.Array, n: int) -> jax.Array:
  """Bilinear resize (torch, align_corners=False) by the exact factor 1/n.  x: [B, nS, nS, D] ->
  [B, S, S, D].

  Output o reads input n o + (n - 1) / 2: the centre token of each n x n block for odd n, the
  equal-weight mean of the 2 x 2 centre for even n.
  """
  c = (n - 1) // 2
  if n % 2:
    return x[:, c::n, c::n]
  x = 0.5 * x[:, :, c::n] + 0.5 * x[:, :, c + 1::n]  # width, then height, as torch does
  return 0.5 * x[:, c::n] + 0.5 * x[:, c + 1::n]


# ---------------------------------------------------------------------------------------------
# DEM.


class WindowCrossAttention(nn.Module):
  """The authors' `MultiHeadedAttention`: out = LN(W_o softmax(Q K^T / sqrt(d_k)) V + q_in),
  post-LN, the residual being the raw query input; no mask, no dropout.

  q_in: float[N, T, D]; kv_in: float[N, S, D] -> float[N, T, D]. Params q, k, v: [embed, heads, kv]
  (+ bias), o: [heads, kv, embed] (+ bias), ln (torch `linears.0..3`, `ln`).
  """

  num_heads: int = 8
  epsilon: float = 1e-5
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, q_in: jax.Array, kv_in: jax.Array) -> jax.Array:
    d = q_in.shape[-1]
    if d % self.num_heads:
      raise ValueError(f"WindowCrossAttention: width {d} is not divisible by num_heads="
                       f"{self.num_heads}")
    hd = d // self.num_heads
    kw = dict(use_bias=True, dtype=self.dtype, param_dtype=self.param_dtype)
    q = dense((self.num_heads, hd), ("embed", "heads", "kv"), name="q", **kw)(q_in)
    k = dense((self.num_heads, hd), ("embed", "heads", "kv"), name="k", **kw)(kv_in)
    v = dense((self.num_heads, hd), ("embed", "heads", "kv"), name="v", **kw)(kv_in)
    out, _ = dot_product_attention(q, k, v)
    out = dense(d, ("heads", "kv", "embed"), axis=(-2, -1), name="o", **kw)(out)
    return LayerNorm(self.epsilon, dtype=self.dtype, param_dtype=self.param_dtype,
                     name="ln")(out + q_in.astype(self.dtype))


class DualPerspectiveEnhancement(nn.Module):
  """DEM plus the final combination with the resized view (the module docstring has the equations).

  __call__(features: float[B * (2n^2 + 1), S^2, D]) -> (tokens float[B, S^2, D], aux) with
  aux = {"dem": F_pool float[B, S^2, D]}. `features` are the CLIP patch features (CLS dropped) of
  `dual_perspective_crops`' views in its batch-major order. Params: `attention`
  (`WindowCrossAttention`), `ffn_crop`/`ffn_stride` (`Mlp` fc1, fc2) and `ln_fuse`; or
  `proj_crop`/`proj_stride` with fusion="linear_concat". `ffn_crop` acts on V^loc (the strided
  re-stitch, the code's `scale_crop_img_feat`), `ffn_stride` on V^glo.
  """

  num_crops: int = 3
  num_heads: int = 8
  bottleneck_div: int = 16
  window_pairing: str = "code"
  fusion: str = "mlp_residual"
  pooling: str = "center"
  combine: str = "mean"
  epsilon: float = 1e-5
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  def _check(self, features: jax.Array) -> int:
    for field, value, allowed in (("window_pairing", self.window_pairing, WINDOW_PAIRINGS),
                                  ("fusion", self.fusion, FUSIONS),
                                  ("pooling", self.pooling, POOLINGS),
                                  ("combine", self.combine, COMBINES)):
      if value not in allowed:
        raise ValueError(f"DualPerspectiveEnhancement.{field}={value!r}; expected one of {allowed}")
    if features.ndim != 3:
      raise ValueError(f"DualPerspectiveEnhancement: expected features float[B*(2n^2+1), S^2, D], "
                       f"got shape {features.shape}")
    p, d = features.shape[1:]
    s = math.isqrt(p)
    if s * s != p:
      raise ValueError(f"DualPerspectiveEnhancement: {p} tokens per view is not a square grid "
                       "(drop the CLS token first)")
    if d % 2 or d < 2 * self.bottleneck_div:
      raise ValueError(f"DualPerspectiveEnhancement: width {d} must be even and at least "
                       f"2 * bottleneck_div = {2 * self.bottleneck_div}")
    return s

  @nn.compact
  def __call__(self, features: jax.Array) -> tuple[jax.Array, dict]:
    s = self._check(features)
    n, d = self.num_crops, features.shape[-1]
    local, strided, resized = split_views(features, n)
    b = resized.shape[0]
    f_loc = stitch_local(local.reshape(b, n * n, s, s, d), n)  # [B, nS, nS, D]
    f_glo = stitch_strided(strided.reshape(b, n * n, s, s, d), n)
    if self.window_pairing == "code":
      crop_g, stitch_g, crop_l, stitch_l = crop_local, stitch_local, crop_strided, stitch_strided
    else:
      crop_g, stitch_g, crop_l, stitch_l = crop_strided, stitch_strided, crop_local, stitch_local
    # Both directions and all windows in one call: they share the attention's weights, and one
    # [2 B n^2, S^2, D] batch is one kernel launch instead of 2 n^2.
    q = jnp.stack([crop_g(f_glo, n), crop_l(f_loc, n)])  # [2, B, n^2, S, S, D]
    kv = jnp.stack([crop_g(f_loc, n), crop_l(f_glo, n)])
    q = nn.with_logical_constraint(q.reshape(2 * b * n * n, s * s, d), _TOKENS_AXES)
    kv = nn.with_logical_constraint(kv.reshape(2 * b * n * n, s * s, d), _TOKENS_AXES)
    enh = WindowCrossAttention(self.num_heads, self.epsilon, self.dtype, self.param_dtype,
                               name="attention")(q, kv)
    enh = enh.reshape(2, b, n * n, s, s, d)
    tokens = (b, n * n * s * s, d)
    v_glo = stitch_g(enh[0], n).reshape(tokens)  # local-enhanced global
    v_loc = stitch_l(enh[1], n).reshape(tokens)  # global-enhanced local
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    if self.fusion == "mlp_residual":
      mlp = dict(hidden_dim=d // self.bottleneck_div, out_dim=d // 2, act="gelu", **kw)
      fused = jnp.concatenate([Mlp(name="ffn_crop", **mlp)(v_loc),
                               Mlp(name="ffn_stride", **mlp)(v_glo)], axis=-1)
      fused = LayerNorm(self.epsilon, name="ln_fuse", **kw)(fused + v_glo + v_loc)
    else:
      proj = dict(names=("embed", "mlp"), use_bias=True, **kw)
      fused = jnp.concatenate([dense(d // 2, name="proj_crop", **proj)(v_loc),
                               dense(d // 2, name="proj_stride", **proj)(v_glo)], axis=-1)
    fused = nn.with_logical_constraint(fused, _TOKENS_AXES)
    # The code pools in float32 (`.float()` before F.interpolate).
    grid = fused.astype(jnp.float32).reshape(b, n * s, n * s, d)
    if self.pooling == "center":
      pooled = center_subsample(grid, n)
    else:
      pooled = grid.reshape(b, s, n, s, n, d).mean(axis=(2, 4))
    pooled = pooled.reshape(b, s * s, d)
    total = resized.astype(jnp.float32) + pooled
    out = 0.5 * total if self.combine == "mean" else total
    out = nn.with_logical_constraint(out.astype(self.dtype), _TOKENS_AXES)
    return out, {"dem": pooled.astype(self.dtype)}
