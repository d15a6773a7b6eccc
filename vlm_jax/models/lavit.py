"""Less-Attention Vision Transformer (Zhang, Liu, Lin, He, CVPR 2024, "You Only Need Less Attention at
Each Stage in Vision Transformers"): a hierarchical 4-stage ViT whose later layers in a stage re-use
the previous layer's attention scores instead of computing Q K^T (`vlm_jax.layers.less_attention`).

  stage 0:  X_0 = LN(Conv_{p x p, stride p}(img)) + pos                    (patch stem, no CLS)
  stage m:  X_m = LN(Conv_{2 x 2, stride 2}(X_{m-1}))                       (token merge, N_m = N_{m-1}/4)
            layers 1..L^VA_m:      VA,  A = Q K^T / sqrt(d) (+ AR(A^last_{m-1}) in the first)  (Eqs. 4, 6)
            layers L^VA_m+1..L_m:  LA,  A^l = Psi(Theta(A^{l-1})^T)^T                         (Eq. 5)
  head:     logits = Dense(LN(mean_tokens(X_last)))
  loss:     L = CE + lambda * L_DP over the LA layers (aux["dp_loss"]; the trainer adds it)     (Eq. 9)

`num_va[m]` is L^VA_m (>= 1: the first layer of a stage must compute attention, it is the one the
attention residual enters); `num_va[m] == depths[m]` makes stage m all-VA. Tokens are row-major
h_m x w_m grids throughout, the layout `AttentionResidual(mode="grid")` pools.

Fidelity (reference/lavit_api.md Part 1; the variant table, stem, position encoding and head were
not retrieved, so these are the notes' proposals): non-overlapping p x p conv stem (the seed's
patch embedding) + LN + a learned position table, 2 x 2 / stride-2 conv + LN between stages (the
seed's downsampling), global average pool + LN + linear head, no CLS token. Stages 1-2 use global
attention (no spatial reduction), which dominates the FLOPs at 224 px. `ar_mode="paper_flat"` runs
the flattened-map conv with stride 4 so its output matches the N / 4 tokens of the 2 x 2 merge (the
paper's N_m = N_{m-1} / 2 cannot match it; the third-party notebook used stride 4 too).
No dropout or stochastic depth.

Variable resolution. Theta/Psi are N_m x N_m, fixed by `image_size`: a model with LA layers asserts
the input is image_size x image_size unless `resolution_fallback=True`. Then, at another resolution,
LA layers fall back to vanilla attention: each skips Theta/Psi and attends with the scores it is
given, so every LA layer of a stage re-uses the stage's last VA layer's Q K^T, computed at the new
resolution (exactly an LA layer with identity Theta/Psi, their init). This uses only trained
params; the alternative, a fresh Q K^T per LA layer, would need Q/K weights that training at the
fixed resolution never updates. The position table is resized (bicubic) to the new stem grid, as
for ViT fine-tuning at a new resolution. Params must come from an init at `image_size`. A model
without LA layers (e.g. `vit_baseline`) accepts any resolution divisible by patch * 2^(stages-1).

Contract (used as a classifier or as a vision tower):
  images float[B, H, W, 3] (NHWC, normalised) -> (logits float[B, num_classes], aux), with
  aux["hidden_states"]: tuple over stages of float[B, N_m, D_m] (stage outputs, row-major tokens),
  aux["feature_maps"]:  the same as float[B, h_m, w_m, D_m],
  aux["pooled"]:        float[B, D_last] = LN(mean of the last stage's tokens) (the head's input),
  aux["dp_loss"]:       float32 scalar, `dp_loss_over_layers` of every LA layer's probabilities
                        (mean over layers for "hinge", sum for "paper_literal"; 0 without LA),
  aux["dp_losses"]:     float32[num LA layers], each layer's term,
  aux["attentions"]:    with output_attentions=True only, a tuple over stages of tuples over layers
                        of float32[B, H_m, N_m, N_m] softmax probabilities.
  num_classes=0 drops the head and returns aux["pooled"] as the first output. Unlike
  `models.vit.Model`, hidden states are per stage (widths differ) and carry no CLS token.
  As `models.vit.Model`, uint8[B, H, W, 3] raw pixels are normalised here with the CLIP mean/std
  (the evaluators feed uint8 to a composed model's tower; float input is used as given).
  As the vision tower of Flamingo / LLaVA: `model.vision_family="lavit"` (`models.vision_tower`).
"""

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from vlm_jax.layers.embeddings import learned_positions
from vlm_jax.layers.less_attention import (AR_MODES, DP_MODES, AttentionResidual, LABlock, VABlock,
                                           diagonality_preserving_loss, dp_loss_over_layers)
from vlm_jax.layers.linear import dense
from vlm_jax.layers.norms import LayerNorm
from vlm_jax.layers.scan import check_remat_policy, remat_call
from vlm_jax.models.vit import CLIP_MEAN, CLIP_STD
from vlm_jax.param_paths import LayerStack

Dtype = Any
_TOKENS_AXES = ("activation_batch", "activation_length", "activation_embed")

# PROPOSALS, not the paper's LaViT-T/S/B (reference 1.7: the variant table was not retrieved): the
# PVTv2-b1/b2/b3 pyramids with LA only where N <= 196 at 224 px (stages 3-4, one VA layer each).
PRESETS: dict[str, dict] = {
  "lavit_t_style": dict(patch_size=4, dims=(64, 128, 320, 512), heads=(1, 2, 5, 8),
                        depths=(2, 2, 2, 2), num_va=(2, 2, 1, 1), mlp_ratios=(8, 8, 4, 4)),
  "lavit_s_style": dict(patch_size=4, dims=(64, 128, 320, 512), heads=(1, 2, 5, 8),
                        depths=(3, 4, 6, 3), num_va=(3, 4, 1, 1), mlp_ratios=(8, 8, 4, 4)),
  "lavit_b_style": dict(patch_size=4, dims=(64, 128, 320, 512), heads=(1, 2, 5, 8),
                        depths=(3, 4, 18, 3), num_va=(3, 4, 1, 1), mlp_ratios=(8, 8, 4, 4)),
  # CPU-sized: 64 px -> grids 16, 8, 4, 2; LA in stages 2-4 (N = 64, 16, 4).
  "tiny": dict(image_size=64, patch_size=4, dims=(32, 48, 64, 96), heads=(1, 2, 2, 4),
               depths=(1, 2, 2, 2), num_va=(1, 1, 1, 1), mlp_ratios=(4, 4, 4, 4), num_classes=10),
}


def vit_baseline(kwargs: dict | str) -> dict:
  """The plain ViT of the same widths, depths and stem as a LaViT config (a `PRESETS` name or a
  kwargs dict): every layer VA, no attention residual, hence no DP loss. Same `Model` class, so
  params, FLOPs and speed compare like for like."""
  kw = dict(PRESETS[kwargs]) if isinstance(kwargs, str) else dict(kwargs)
  depths = tuple(kw.get("depths", Model.depths))
  return {**kw, "num_va": depths, "attention_residual": False}


class Stage(nn.Module):
  """One stage: token merge (conv, kernel = stride = `patch`) + LN (+ position table), then
  `num_va` VA blocks and depth - num_va LA blocks.

  x: float[B, H_in, W_in, C_in] (the image for stage 0, the previous stage's feature map after);
  prev_scores: float[B, H', N', N'], the previous stage's last pre-softmax scores (the attention
  residual's input) or None; fallback: LA layers skip Theta/Psi (the grid is not `grid`)
  -> (float[B, h, w, dim], {"scores": float32[B, heads, N, N] of the last layer,
  "probs": tuple over layers of float32[B, heads, N, N], "la_probs": those of the LA layers}).
  Params: merge, merge_norm, [pos_embed], [attn_residual], blocks_{l}.
  """

  dim: int
  heads: int
  depth: int
  num_va: int
  mlp_dim: int
  patch: int
  grid: tuple[int, int]  # the configured token grid: the position table and Theta/Psi size
  pos_embed: bool = False
  attention_residual: bool = False
  ar_mode: str = "grid"
  ar_layerscale_init: float = 1e-2
  per_head_transform: bool = False
  act: str = "gelu"
  norm_eps: float = 1e-6
  remat_policy: str = "none"
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, prev_scores: jax.Array | None = None,
               fallback: bool = False) -> tuple[jax.Array, dict]:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    b, h_in, w_in = x.shape[:3]
    p = self.patch
    x = nn.Conv(self.dim, (p, p), strides=(p, p), padding="VALID", name="merge",
                kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(),
                                                         (None, None, None, "embed")), **kw,
                )(x.astype(self.dtype))
    h, w = x.shape[1:3]
    x = LayerNorm(self.norm_eps, name="merge_norm", **kw)(x.reshape(b, h * w, self.dim))
    if self.pos_embed:
      pos = learned_positions(self, "pos_embed", self.grid[0] * self.grid[1], self.dim,
                              self.param_dtype)
      if (h, w) != tuple(self.grid):
        pos = jax.image.resize(pos.reshape(*self.grid, self.dim), (h, w, self.dim), "cubic")
      x = x + pos.reshape(h * w, self.dim).astype(self.dtype)
    x = nn.with_logical_constraint(x, _TOKENS_AXES)
    residual = None
    if self.attention_residual and prev_scores is not None:
      # the flat reading pools N'/stride entries; stride p^2 lands on the merge's N'/p^2 tokens
      stride = p if self.ar_mode == "grid" else p * p
      residual = AttentionResidual(self.heads, self.ar_mode, stride, (h_in, w_in),
                                   self.ar_layerscale_init, self.param_dtype,
                                   name="attn_residual")(prev_scores)
    block = dict(num_heads=self.heads, mlp_dim=self.mlp_dim, act=self.act, norm_eps=self.norm_eps,
                 **kw)
    scores, probs = None, []
    for i in range(self.depth):
      if i < self.num_va:
        x, a = remat_call(VABlock(**block, name=f"blocks_{i}"), self.remat_policy, x,
                          residual if i == 0 else None)
      else:
        la = LABlock(**block, per_head_transform=self.per_head_transform, reuse_scores=fallback,
                     name=f"blocks_{i}")
        x, a = remat_call(la, self.remat_policy, x, scores)
      scores = a["scores"]
      probs.append(a["probs"])
    aux = {"scores": scores, "probs": tuple(probs), "la_probs": tuple(probs[self.num_va:])}
    return x.reshape(b, h, w, self.dim), aux


class Model(nn.Module):
  """images: float[B, H, W, 3] -> (logits float[B, num_classes], aux); see the module docstring."""

  image_size: int = 224
  patch_size: int = 4
  dims: Sequence[int] = (64, 128, 320, 512)
  heads: Sequence[int] = (1, 2, 5, 8)
  depths: Sequence[int] = (2, 2, 2, 2)
  num_va: Sequence[int] = (2, 2, 1, 1)  # L^VA_m: VA layers first in each stage, LA after
  mlp_ratios: Sequence[float] = (8, 8, 4, 4)
  num_classes: int = 1000
  attention_residual: bool = True
  ar_mode: str = "grid"
  ar_layerscale_init: float = 1e-2
  per_head_transform: bool = False
  dp_mode: str = "hinge"
  resolution_fallback: bool = False
  pos_embed: bool = True
  act: str = "gelu"
  norm_eps: float = 1e-6
  remat_policy: str = "none"
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  def __post_init__(self):
    n = len(self.dims)
    for field in ("heads", "depths", "num_va", "mlp_ratios"):
      if len(getattr(self, field)) != n:
        raise ValueError(f"lavit.{field} has {len(getattr(self, field))} entries but lavit.dims "
                         f"has {n} (one per stage)")
    for m, (d, h, depth, va) in enumerate(zip(self.dims, self.heads, self.depths, self.num_va)):
      if d % h:
        raise ValueError(f"lavit.dims[{m}] ({d}) must be divisible by lavit.heads[{m}] ({h})")
      if not 1 <= va <= depth:
        raise ValueError(f"lavit.num_va[{m}] ({va}) must be in [1, depths[{m}] = {depth}]: the "
                         "first layer of a stage computes attention (LA layers transform it)")
    if self.image_size % self.reduction:
      raise ValueError(f"lavit.image_size ({self.image_size}) must be divisible by patch_size * "
                       f"2^(stages - 1) = {self.reduction}")
    if self.ar_mode not in AR_MODES:
      raise ValueError(f"lavit.ar_mode {self.ar_mode!r} is not one of {AR_MODES}")
    if self.dp_mode not in DP_MODES:
      raise ValueError(f"lavit.dp_mode {self.dp_mode!r} is not one of {DP_MODES}")
    check_remat_policy(self.remat_policy, "lavit.remat_policy")
    super().__post_init__()

  @property
  def reduction(self) -> int:
    """Pixels per token side in the last stage."""
    return self.patch_size * 2 ** (len(self.dims) - 1)

  @property
  def has_la(self) -> bool:
    return any(va < depth for va, depth in zip(self.num_va, self.depths))

  @nn.nowrap
  def stage_grids(self, height: int | None = None, width: int | None = None):
    """The (h_m, w_m) token grid of each stage for a height x width input (default image_size)."""
    height = height or self.image_size
    width = width or height
    return tuple((height // self.patch_size // 2**m, width // self.patch_size // 2**m)
                 for m in range(len(self.dims)))

  @nn.nowrap
  def num_tokens(self, m: int = -1) -> int:
    """N_m, the tokens of stage m (negative m counts from the last) at image_size."""
    if not -len(self.dims) <= m < len(self.dims):
      raise ValueError(f"lavit stage {m} out of range for {len(self.dims)} stages")
    h, w = self.stage_grids()[m]
    return h * w

  @nn.nowrap
  def layer_stacks(self) -> tuple[LayerStack, ...]:
    """The scanned stacks of this model's param layout: none (stages are unrolled)."""
    return ()

  @nn.nowrap
  def layer_types(self) -> tuple[tuple[str, ...], ...]:
    """Per stage, "va" or "la" for each layer."""
    return tuple(tuple("va" if i < va else "la" for i in range(depth))
                 for va, depth in zip(self.num_va, self.depths))

  @nn.nowrap
  def stage(self, m: int, **kw) -> Stage:
    """Stage m as built by this model (unbound unless `name`/`parent` are given in kw)."""
    grid = self.stage_grids()[m]
    return Stage(self.dims[m], self.heads[m], self.depths[m], self.num_va[m],
                 int(self.mlp_ratios[m] * self.dims[m]), self.patch_size if m == 0 else 2, grid,
                 pos_embed=self.pos_embed and m == 0,
                 attention_residual=self.attention_residual and m > 0, ar_mode=self.ar_mode,
                 ar_layerscale_init=self.ar_layerscale_init,
                 per_head_transform=self.per_head_transform, act=self.act, norm_eps=self.norm_eps,
                 remat_policy=self.remat_policy, dtype=self.dtype, param_dtype=self.param_dtype,
                 **kw)

  def _check_resolution(self, images: jax.Array) -> bool:
    """-> whether LA layers fall back (the input is not image_size x image_size)."""
    if images.ndim != 4 or images.shape[-1] != 3:
      raise ValueError(f"lavit input must be NHWC float[B, H, W, 3], got shape {images.shape}")
    hw = tuple(images.shape[1:3])
    if hw[0] % self.reduction or hw[1] % self.reduction:
      raise ValueError(f"lavit input is {hw[0]}x{hw[1]}; both sides must be divisible by "
                       f"patch_size * 2^(stages - 1) = {self.reduction}")
    other = hw != (self.image_size, self.image_size)
    if other and self.has_la:
      tokens = [gh * gw for gh, gw in self.stage_grids()]
      if not self.resolution_fallback:
        raise ValueError(
          f"lavit input is {hw[0]}x{hw[1]} but lavit.image_size is {self.image_size}: the LA "
          f"layers' Theta/Psi are N x N for the token counts at image_size (N per stage "
          f"{tokens}); feed {self.image_size}x{self.image_size} images or set "
          "lavit.resolution_fallback=True (LA layers then re-use the stage's vanilla attention)")
      if self.is_initializing():
        raise ValueError(f"lavit: initialise at lavit.image_size ({self.image_size}), not "
                         f"{hw[0]}x{hw[1]}: Theta/Psi are sized by the token count at image_size")
    return other

  @nn.compact
  def __call__(self, images: jax.Array, output_attentions: bool = False
               ) -> tuple[jax.Array, dict]:
    if images.dtype == jnp.uint8:
      mean, std = jnp.asarray(CLIP_MEAN, jnp.float32), jnp.asarray(CLIP_STD, jnp.float32)
      images = (images.astype(jnp.float32) / 255.0 - mean) / std
    fallback = self._check_resolution(images)
    x, prev, hidden, maps, attns, la_probs = images, None, [], [], [], []
    for m in range(len(self.dims)):
      x, saux = self.stage(m, name=f"stages_{m}")(x, prev, fallback and self.has_la)
      prev = saux["scores"]
      maps.append(x)
      hidden.append(x.reshape(x.shape[0], -1, x.shape[-1]))
      attns.append(saux["probs"])
      la_probs += list(saux["la_probs"])
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    pooled = LayerNorm(self.norm_eps, name="head_norm", **kw)(hidden[-1].mean(axis=1))
    dp_losses = jnp.stack([diagonality_preserving_loss(p, self.dp_mode) for p in la_probs]
                          ) if la_probs else jnp.zeros((0,), jnp.float32)
    aux = {"hidden_states": tuple(hidden), "feature_maps": tuple(maps), "pooled": pooled,
           "dp_loss": dp_loss_over_layers(la_probs, self.dp_mode), "dp_losses": dp_losses}
    if output_attentions:
      aux["attentions"] = tuple(attns)
    if not self.num_classes:
      return pooled, aux
    logits = dense(self.num_classes, ("embed", None), use_bias=True, name="head", **kw)(pooled)
    return logits.astype(jnp.float32), aux
