"""INF-LLaVA (Lin et al. 2024, arXiv 2407.16198, "INF-LLaVA: Dual-perspective Perception for
High-Resolution Multimodal Large Language Model"): LLaVA-1.5 whose image tokens come from an
n x n high-resolution image through the dual-perspective layers (`layers.dual_perspective`;
reference/flex_inf.md §2.2-2.4).

  images float[B, nS, nS, 3] (CLIP-normalised; S = the tower's image size, n = 3: 1008 px), any
    other size first resized to nS (torch bicubic, as the authors' `encode_images` does)
    DCM: n^2 local crops I^loc_k, n^2 strided crops I^glo_k, the resized view I^res   (2n^2 + 1)
    one CLIP call on the views it needs, layer -2 patch tokens Z_v             float[., P, Dv]
    DEM (`spatial_embed`): F_pool = DEM(Z^loc, Z^glo);  out = (Z^res + F_pool) / 2     [B, P, Dv]
    projector (mlp2x_gelu): H_v = W_2 GELU(W_1 out + b_1) + b_2                       [B, P, D]
  the P = (S/p)^2 = 576 rows of H_v replace each image's run of P image tokens (as LLaVA-1.5).

Views that the output does not depend on are not encoded (exact, not an approximation; derived in
`layers.dual_perspective`'s docstring and tested against the full 2n^2 + 1 view path):
- odd n: the resized view is a bicubic downsample by the exact factor n, whose taps land on
  source pixel n o + c (c = (n - 1) / 2) with weights (0, 1, 0, 0), so I^res IS strided crop
  (c, c) and its CLIP features are reused;
- the authors' DEM (window_pairing "code", pooling "center"): F_pool reads only the fused tokens at
  the block centres, which see the strided features of phase (c, c) alone ((c, c) .. (c+1, c+1)
  for even n), so the other strided crops never reach the output or its gradient.
With both, n = 3 takes n^2 + 1 = 10 CLIP forwards per image instead of the authors' 19; the
paper's pairing or average pooling uses every strided crop (18). `skip_dead_views=False` encodes
all 2n^2 + 1 views, as the authors' loop does. The DEM is fed all 2n^2 + 1 views' features either
way (a dead view gets a live view's features, which it cannot influence), so its own code and
aux are the layer's.

Params: `vision`, `projector`, `lm` as `models.llava`, plus `spatial_embed` (the DEM: `attention`
{q, k, v, o, ln}, `ffn_crop`, `ffn_stride` {fc1, fc2}, `ln_fuse`), the authors' module name.
Decoding (`eval.generate`) is LLaVA's: images go in with the prompt, decode steps pass
images=None and run no vision tower.
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vlm_jax.layers import dual_perspective as dp
from vlm_jax.layers.mlp import Mlp
from vlm_jax.layers.resize import resize_bicubic
from vlm_jax.models import llava, model_class, vit

Dtype = Any
_DEM_FIELDS = ("num_heads", "bottleneck_div", "window_pairing", "fusion", "pooling", "combine",
               "epsilon")


@functools.lru_cache(maxsize=None)
def view_plan(n: int, window_pairing: str = "code", pooling: str = "center",
              skip_dead_views: bool = True) -> tuple[tuple[int, ...], tuple[int, ...]]:
  """Which DCM views go through CLIP, and where each view's features come from.

  Views are numbered as in `dual_perspective_crops`: [0, n^2) local, n^2 + p n + q strided crop
  (p, q), 2n^2 the resized view. Returns (encoded, source): `encoded` the views encoded, in order;
  `source[v]` the row of `encoded` whose features view v takes (its own, or the identical strided
  crop (c, c) for the resized view at odd n, or any live row for a view the output never reads).
  """
  total, n2, c = dp.num_views(n), n * n, (n - 1) // 2
  stand_in: dict[int, int] = {}
  if skip_dead_views:
    if n % 2:  # exact factor-n bicubic downsample = subsampling at phase (c, c)
      stand_in[2 * n2] = n2 + c * n + c
    if window_pairing == "code" and pooling == "center":
      phases = (c,) if n % 2 else (c, c + 1)  # the rows/columns `center_subsample` reads
      live = sorted(n2 + p * n + q for p in phases for q in phases)
      stand_in.update({v: live[0] for v in range(n2, 2 * n2) if v not in live})
  encoded = tuple(v for v in range(total) if v not in stand_in)
  row = {v: i for i, v in enumerate(encoded)}
  return encoded, tuple(row[stand_in.get(v, v)] for v in range(total))


def dcm_views(images: jax.Array, n: int, crop_size: int, views: tuple[int, ...]) -> jax.Array:
  """The DCM views numbered `views` (`view_plan` numbering) of n * crop_size square images.

  images: float[B, nS, nS, C] -> float[B * len(views), S, S, C], batch-major (row b len(views) + i
  is view views[i] of image b); with every view, exactly `dual_perspective_crops`' output.
  """
  n2 = n * n
  parts = [dp.crop_local(images, n), dp.crop_strided(images, n)]
  if 2 * n2 in views:  # the resized view is only computed when some view needs it
    parts.append(resize_bicubic(images, (crop_size, crop_size))[:, None])
  x = jnp.concatenate(parts, axis=1)
  if tuple(views) != tuple(range(x.shape[1])):
    x = x[:, np.asarray(views)]
  return x.reshape(-1, *x.shape[2:])


class Model(llava.Model):
  """(images [B, H, W, 3], input_ids, attention_mask) -> (logits float32[B, T, V], aux).

  num_crops: n, the DCM grid (3 in the released checkpoints: 1008 px through a 336 px tower).
  dem: kwargs of `layers.dual_perspective.DualPerspectiveEnhancement` (num_heads, bottleneck_div,
    window_pairing, fusion, pooling, combine, epsilon); the defaults are the authors' code.
  skip_dead_views: encode only the views the output depends on (module docstring); False runs
    every one of the 2n^2 + 1 views through CLIP as the authors do (same output).
  Other fields as `models.llava.Model` (the image-token id -200 of the original code works).
  """

  num_crops: int = 3
  dem: Any = None
  skip_dead_views: bool = True

  def __post_init__(self):
    if self.lm_family == "llama_flex":
      raise ValueError("inf_llava: model.lm_family 'llama_flex' needs HR inputs; use 'llama'")
    if self.vision_feature_select_strategy != "default":
      raise ValueError("inf_llava: the DEM re-stitches patch-token grids; model."
                       "vision_feature_select_strategy must be 'default' (CLS dropped)")
    if self.num_crops < 1:
      raise ValueError(f"inf_llava: model.num_crops must be >= 1, got {self.num_crops}")
    unknown = sorted(set(dict(self.dem or {})) - set(_DEM_FIELDS))
    if unknown:
      raise ValueError(f"inf_llava: model.dem has unknown fields {unknown}; expected some of "
                       f"{list(_DEM_FIELDS)}")
    super().__post_init__()

  @nn.nowrap
  def view_plan(self) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(encoded views, source row of every view) for this model (`view_plan`)."""
    dem = dict(self.dem or {})
    return view_plan(self.num_crops, dem.get("window_pairing", "code"),
                     dem.get("pooling", "center"), self.skip_dead_views)

  @property
  def clip_forwards_per_image(self) -> int:
    """Views per image that go through the vision tower (10 for the released n = 3)."""
    return len(self.view_plan()[0])

  @nn.compact
  def __call__(
    self,
    images: jax.Array | None,
    input_ids: jax.Array,
    attention_mask: jax.Array | None = None,
    *,
    positions: jax.Array | None = None,
    caches: Any = None,
    last_logits_only: bool = False,
  ) -> tuple[jax.Array, dict]:
    """images: float[N, H, W, 3] (NHWC, CLIP-normalised, or uint8 pixels), one per image-token run
    in reading order, or None (text only, or a decoding step); input_ids: int32[B, T] holding N * P
    image tokens; the rest as `llava.Model.__call__`.

    aux: {"image_features": float[N, P, D] (projected), "dem": F_pool float[N, P, Dv] (before the
    mean with the resized view), "lm": the LM's aux}.
    """
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    lm = model_class(self.lm_family, "model.lm_family")(name="lm", **kw, **dict(self.lm or {}))
    is_image = input_ids == self.image_token_id
    n_tokens = None if isinstance(is_image, jax.core.Tracer) else int(is_image.sum())
    hook, feats, dem_out = None, None, None
    if images is None:
      if n_tokens:
        raise ValueError(f"input_ids hold {n_tokens} image tokens (id {self.image_token_id}) but "
                         "no images were given")
    else:
      if images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"images must be NHWC float[N, H, W, 3], got shape {images.shape}")
      b, p = images.shape[0], self.num_image_tokens
      if n_tokens is not None and n_tokens != b * p:
        raise ValueError(
          f"input_ids hold {n_tokens} image tokens (id {self.image_token_id}) but {b} image(s) "
          f"give {b * p} features ({p} per image); expand each image into its run of image tokens")
      tower = vit.Model(name="vision", **kw, **dict(self.vision or {}))
      n, s = self.num_crops, tower.image_size
      if images.dtype == jnp.uint8:  # normalise before resizing, as the processor would
        images = (images.astype(jnp.float32) / 255.0 - jnp.asarray(vit.CLIP_MEAN)) / jnp.asarray(
          vit.CLIP_STD)
      if images.shape[1:3] != (n * s, n * s):  # the authors' F.interpolate(images, (1008, 1008))
        images = resize_bicubic(images, (n * s, n * s))
      encoded, source = self.view_plan()
      _, vaux = tower(dcm_views(images, n, s, encoded))  # one CLIP call, [B * E, S, S, 3]
      z = self._select(vaux["hidden_states"])  # [B * E, P, Dv]
      z = z.reshape(b, len(encoded), *z.shape[1:])
      if source != tuple(range(len(source))):  # every view's features, dead ones stood in for
        z = jnp.take(z, np.asarray(source), axis=1)
      z = z.reshape(b * len(source), *z.shape[2:])
      z = nn.with_logical_constraint(
        z, ("activation_batch", "activation_length", "activation_embed"))
      tokens, daux = dp.DualPerspectiveEnhancement(num_crops=n, name="spatial_embed", **kw,
                                                   **dict(self.dem or {}))(z)
      dem_out = daux["dem"]
      feats = Mlp(lm.hidden_size, self.projector_act, self.projector_bias, out_dim=lm.hidden_size,
                  name="projector", **kw)(tokens)

      def hook(x: jax.Array) -> jax.Array:
        return llava.scatter_image_features(x, is_image, feats.reshape(-1, feats.shape[-1]))

    # As llava.Model: image-token ids may lie outside the vocabulary (-200); look them up as 0.
    text_ids = input_ids if images is None else jnp.where(is_image, 0, input_ids)
    logits, laux = lm(text_ids, attention_mask, positions, caches, embed_hook=hook,
                      last_logits_only=last_logits_only)
    return logits, {"image_features": feats, "dem": dem_out, "lm": laux}
