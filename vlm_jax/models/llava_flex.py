"""LLaVA-FlexAttn (Li et al., ECCV 2024): LLaVA-1.5 that also sees its image at zoom x resolution
through FlexAttention (reference/flex_inf.md §1.2-1.6; the layers in `models.llama_flex` and
`layers.hierarchical`).

  images float[B, zS, zS, 3] (CLIP-normalised, z = zoom, S = the tower's image size: 3 x 336 = 1008)
    LR view:  resize to S (torch bilinear, antialias)                     -> [B, S, S, 3]
    HR view:  z x z non-overlapping S-crops, row-major                    -> [B * z^2, S, S, 3]
    one CLIP call on both, layer -2 patch tokens, the same projector      -> P = (S/p)^2 tokens each
    LR tokens replace the image-token run of input_ids (as LLaVA-1.5);
    HR tokens are stitched into one (z * sqrt(P))^2 grid (72 x 72 = 5184), row-major, with no
    gradient (the authors encode them under torch.no_grad), and feed `llama_flex` as keys/values.
  margins: from each image's original (w, h) (`ori_sizes`), the padded strips `expand2square`
    added are never selected.

One sample = one image (the authors' FlexAttention path): every row of input_ids holds exactly one
run of P image tokens. Param paths equal `models.llava`'s (`vision`, `projector`, `lm`) plus the LM's
`attn/k_hd`, `attn/v_hd`, so a LLaVA-1.5 checkpoint (converted) loads, then `llama_flex.hd_from_kv`.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from vlm_jax.layers import hierarchical as hl
from vlm_jax.layers.mlp import Mlp
from vlm_jax.layers.resize import resize
from vlm_jax.models import llama_flex, llava, vit

Dtype = Any


def split_crops(images: jax.Array, zoom: int) -> jax.Array:
  """[B, zS, zS, C] -> [B * zoom^2, S, S, C]: the zoom x zoom tiles, row-major per image (the
  authors' `crop_images_to_subimages`)."""
  b, h, w, c = images.shape
  s = h // zoom
  x = images.reshape(b, zoom, s, zoom, w // zoom, c).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b * zoom * zoom, s, w // zoom, c)


def stitch_crops(tokens: jax.Array, zoom: int) -> jax.Array:
  """[B * zoom^2, g*g, D] per-crop token grids -> [B, (zoom*g)^2, D], one row-major grid (the
  authors' `combine_subimages_to_images`). Inverse of `split_crops` at token level."""
  n, p, d = tokens.shape
  g = int(round(p ** 0.5))
  b = n // (zoom * zoom)
  x = tokens.reshape(b, zoom, zoom, g, g, d).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b, (zoom * g) ** 2, d)


def margins_from_sizes(ori_sizes: jax.Array, grid: int) -> jax.Array:
  """int[B, 2] original (w, h) -> float[B, grid, grid] keep-mask (`hierarchical.margin_patches`)."""
  w = ori_sizes[:, 0].astype(jnp.float32)
  h = ori_sizes[:, 1].astype(jnp.float32)
  margin = jnp.floor(jnp.abs(w - h) / 2)
  num = jnp.floor(margin / jnp.maximum(w, h) * grid).astype(jnp.int32)
  return hl.margin_mask(num, jnp.where(w > h, 0, 1), grid)


class Model(llava.Model):
  """(images [B, zS, zS, 3], input_ids, attention_mask, *, ori_sizes, select_row, alpha,
  answer_rows, step) -> (logits float32[B, T, V], aux{"image_features", "hr_features", "lm"}).

  lm: kwargs of `models.llama_flex.Model` (its num_image_tokens / hr_grid / flex_blocks must fit
  this tower: P image tokens, hr_grid = zoom * sqrt(P)).

  Training (`answer_rows` bool[B, T] from the data, `data.llava.answer_rows`): the authors'
  training path (`llama_flex.Model` train_rows: every answer-predicting row selects its own HR
  blocks over all HR keys), with the blend ramp alpha = min(1, step / alpha_ramp_steps) (the
  authors' min(1, 10 * epoch): `alpha_ramp_steps` = a tenth of an epoch in steps; 0 = alpha 1).
  The train step passes `step` to models whose `takes_step` is True.
  Every sample must have its image (row b reads images[b]); text-only samples are not supported."""

  lm_family: str = "llama_flex"
  zoom: int = 3
  alpha_ramp_steps: int = 0
  takes_step = True

  def __post_init__(self):
    if self.lm_family != "llama_flex":
      raise ValueError(f"llava_flex: model.lm_family must be 'llama_flex', got {self.lm_family!r}")
    if self.vision_feature_select_strategy != "default":
      raise ValueError("llava_flex: the HR grid needs patch tokens only (select strategy 'default')")
    super().__post_init__()

  @staticmethod
  def complete_loaded(loaded: dict, targets: dict) -> dict:
    """Initial weights (`train.init`): k_hd / v_hd params that the source (a LLaVA-1.5 checkpoint
    or stage) lacks start as copies of the loaded k / v (`llama_flex.hd_from_kv`, the authors'
    prepare_model.py). Flat "lm/layers_3/attn/k_hd/kernel" paths."""
    out = dict(loaded)
    for path in targets:
      for hd, base in (("/attn/k_hd/", "/attn/k/"), ("/attn/v_hd/", "/attn/v/")):
        src = path.replace(hd, base)
        if hd in path and path not in loaded and src in loaded:
          # A copy: one buffer in two params would be donated twice by the train step.
          out[path] = jnp.array(loaded[src], copy=True)
    return out

  @nn.compact
  def __call__(self, images, input_ids, attention_mask=None, *, ori_sizes=None, select_row=None,
               alpha=None, positions=None, caches=None, last_logits_only=False, hr_cache=None,
               answer_rows=None, step=None):
    """images None = a decoding step: the LM reads the prefill's cached HR keys/values (`hr_cache`,
    from aux["lm"]["hr_cache"] of the prefill), no vision tower runs. alpha None: 1, or the ramp
    at `step` when both step and alpha_ramp_steps are given."""
    if alpha is None:
      alpha = 1.0
      if step is not None and self.alpha_ramp_steps > 0:
        alpha = jnp.minimum(1.0, jnp.asarray(step, jnp.float32) / self.alpha_ramp_steps)
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    lm = llama_flex.Model(name="lm", **kw, **dict(self.lm or {}))
    if images is None:
      logits, laux = lm(input_ids, attention_mask, positions, caches, hr_cache=hr_cache,
                        alpha=alpha)
      return logits, {"image_features": None, "hr_features": None, "lm": laux}
    tower = vit.Model(name="vision", **kw, **dict(self.vision or {}))
    s, p = tower.image_size, self.num_image_tokens
    g = int(round(p ** 0.5))
    if lm.num_image_tokens != p or lm.hr_grid != self.zoom * g:
      raise ValueError(f"llava_flex: lm.num_image_tokens ({lm.num_image_tokens}) and lm.hr_grid "
                       f"({lm.hr_grid}) must be {p} and {self.zoom * g} for this vision tower")
    b = images.shape[0]
    if images.shape[1:3] != (self.zoom * s, self.zoom * s):
      raise ValueError(f"llava_flex: images must be {self.zoom * s} px square (zoom x "
                       f"vision.image_size), got {images.shape}")
    lr = resize(images, (s, s), "bilinear_aa")
    views = jnp.concatenate([lr, split_crops(images, self.zoom)], axis=0)  # one CLIP call
    _, vaux = tower(views)
    z = self._select(vaux["hidden_states"])
    feats = Mlp(lm.hidden_size, self.projector_act, self.projector_bias, out_dim=lm.hidden_size,
                name="projector", **kw)(z)                                   # [B + B z^2, P, D]
    lr_feats = feats[:b]
    hr = jax.lax.stop_gradient(stitch_crops(feats[b:], self.zoom))          # [B, (z g)^2, D]
    is_image = input_ids == self.image_token_id
    image_start = jnp.argmax(is_image, axis=1).astype(jnp.int32)
    # RoPE phases of the image span: its position ids (left-padded prompts shift them).
    image_pos = image_start if positions is None else jnp.take_along_axis(
      positions, image_start[:, None], axis=1)[:, 0]
    hr_cos, hr_sin = hl.hr_rope_tables(image_pos, p, lm.dim_per_head, lm.rope_theta, lm.hr_grid)
    margins = None if ori_sizes is None else margins_from_sizes(jnp.asarray(ori_sizes), g)
    if select_row is None:  # the last real token of each row (left or right padding)
      t = input_ids.shape[1]
      real = jnp.ones_like(input_ids) if attention_mask is None else attention_mask[:, :t]
      select_row = jnp.max(jnp.where(real > 0, jnp.arange(t), 0), axis=1).astype(jnp.int32)

    def hook(x):
      return llava.scatter_image_features(x, is_image, lr_feats.reshape(-1, lr_feats.shape[-1]))

    logits, laux = lm(jnp.where(is_image, 0, input_ids), attention_mask, positions, caches,
                      hr=hr, hr_cos=hr_cos, hr_sin=hr_sin, image_start=image_start,
                      margins=margins, select_row=select_row, alpha=alpha, embed_hook=hook,
                      last_logits_only=last_logits_only, train_rows=answer_rows)
    return logits, {"image_features": lr_feats, "hr_features": hr, "lm": laux}
