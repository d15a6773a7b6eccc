"""Flamingo (Alayrac et al. 2022) as composed by OpenFlamingo (Awadalla et al. 2023).

  vision_x float[B, T_img, H, W, 3]
    -> vision (frozen CLIP ViT): patch tokens float[B * T_img, P, Dv]   (CLS dropped)
    -> resampler (Perceiver): latents float[B, T_img, R, Dv]
  input_ids int32[B, T_txt]
    -> lm (frozen decoder) where before decoder layer i, for every i with
       (i + 1) % cross_attn_every_n_layers == 0, a tanh-gated xattn-dense block `xattn_{i}` lets each
       text token attend to the latents of image cumsum(<image>)[t]   (vlm_jax.layers.gated_xattn)
    -> logits float32[B, T_txt, V]

There is no projection between vision width and LM width: the resampler runs at the vision width and each
xattn block maps Dv to its own inner width (8 heads x 64 in OpenFlamingo). Submodule names are fixed
(`vision`, `resampler`, `lm`, `xattn_{i}`) so freezing, sharding and conversion regexes stay stable.

`vision_tokens` picks the patch tokens fed to the resampler: "pre_ln_post" (the ViT's last hidden state,
what the released OpenFlamingo models were trained with) or "post_ln_post" (LN_post applied to every
token, what open_clip >= 2.23 returns).

Packed rows (`vlm_jax.data.packing`): `segment_ids` int[B, T_txt] keeps packed examples apart in
the LM's self-attention (`vlm_jax.models.llama`). The xattn needs no mask of its own: a text token
sees image cumsum(<image>)[t], its own example's image as long as every packed example starts with
its `<image>` (the packer checks that). Attending to all earlier images would reach into earlier
examples, so packing requires `only_attend_immediate_media=True`.
"""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from vlm_jax.layers.gated_xattn import GatedCrossAttentionBlock, media_text_time
from vlm_jax.layers.resampler import PerceiverResampler
from vlm_jax.models import model_class, vit

Dtype = Any
LM_FAMILIES = ("llama", "gpt_neox", "mpt")


def xattn_layer_ids(num_layers: int, every: int) -> list[int]:
  """Decoder layers preceded by an xattn block: i with (i + 1) % every == 0 (OpenFlamingo)."""
  if every < 1:
    raise ValueError(f"model.cross_attn_every_n_layers must be >= 1, got {every}")
  return [i for i in range(num_layers) if (i + 1) % every == 0]


class Model(nn.Module):
  """(vision_x, input_ids, attention_mask) -> (logits float32[B, T_txt, V], aux)."""

  vision: Any = None
  lm: Any = None
  resampler: Any = None
  xattn: Any = None
  lm_family: str = "llama"
  cross_attn_every_n_layers: int = 1
  media_token_id: int = 3
  only_attend_immediate_media: bool = True
  vision_tokens: str = "pre_ln_post"
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  def __post_init__(self):
    if self.lm_family not in LM_FAMILIES:
      raise ValueError(f"model.lm_family {self.lm_family!r} is not one of {LM_FAMILIES}")
    if self.vision_tokens not in ("pre_ln_post", "post_ln_post"):
      raise ValueError(f"model.vision_tokens must be 'pre_ln_post' or 'post_ln_post', "
                       f"got {self.vision_tokens!r}")
    super().__post_init__()

  @nn.compact
  def __call__(
    self,
    vision_x: jax.Array,
    input_ids: jax.Array,
    attention_mask: jax.Array | None = None,
    *,
    text_time: jax.Array | None = None,
    segment_ids: jax.Array | None = None,
  ) -> tuple[jax.Array, dict]:
    """vision_x: float[B, T_img, H, W, 3]; input_ids: int32[B, T_txt]; attention_mask: int[B, T_txt].

    text_time: optional int[B, T_txt] overriding cumsum(<image>) (decoding with cached media).
    segment_ids: optional int32[B, T_txt] of a packed batch (0 = padding, 1..k = example).
    """
    if vision_x.ndim != 5:
      raise ValueError(f"vision_x must be float[B, T_img, H, W, 3], got shape {vision_x.shape}")
    if segment_ids is not None and not self.only_attend_immediate_media:
      raise ValueError("packed rows (segment_ids) need model.only_attend_immediate_media=True: "
                       "attending to all earlier images would cross into earlier packed examples")
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    b, t_img = vision_x.shape[:2]
    lm_cfg = dict(self.lm or {})
    vision = vit.Model(name="vision", **kw, **dict(self.vision or {}))
    last, vaux = vision(vision_x.reshape((b * t_img,) + vision_x.shape[2:]))
    tokens = last if self.vision_tokens == "pre_ln_post" else vaux["post_norm_tokens"]
    tokens = tokens[:, 1:]  # drop CLS
    tokens = tokens.reshape(b, t_img, 1, tokens.shape[1], tokens.shape[2])
    media, _ = PerceiverResampler(name="resampler", **kw, **dict(self.resampler or {}))(tokens)
    if text_time is None:
      text_time = media_text_time(input_ids == self.media_token_id)
    xattn_cfg = dict(self.xattn or {})
    blocks = {
      i: GatedCrossAttentionBlock(
        only_attend_immediate_media=self.only_attend_immediate_media, name=f"xattn_{i}", **kw,
        **xattn_cfg)
      for i in xattn_layer_ids(lm_cfg.get("num_layers", 1), self.cross_attn_every_n_layers)
    }

    def before_layer(i: int, h: jax.Array) -> jax.Array:
      return blocks[i](h, media, text_time)[0] if i in blocks else h

    lm_module = model_class(self.lm_family, "model.lm_family")
    logits, laux = lm_module(name="lm", **kw, **lm_cfg)(input_ids, attention_mask,
                                                        before_layer=before_layer,
                                                        segment_ids=segment_ids)
    return logits, {"media": media, "text_time": text_time, "lm": laux}
