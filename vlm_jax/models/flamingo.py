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

LaViT tower (`vision_family="lavit"`, `vision` = kwargs of `vlm_jax.models.lavit.Model`, its head
dropped): the resampler reads the last stage's tokens float[B * T_img, N_last, D_last] (row-major,
no CLS to drop; N_last = (S / (patch * 8))^2) and runs at width D_last = dims[-1]. LaViT has no
per-token final norm (its head LN sees the pooled mean only), so `vision_tokens` must be
"pre_ln_post" (the last stage output as is, the analogue of the ViT's last hidden state).

Scale: `lm.scan_layers` scans the LM over groups of `cross_attn_every_n_layers` decoder layers, each
group running its xattn block before its last layer (the placement above; num_layers must be a
multiple of n). Params: the decoder layers as the scanned LM's `lm/layers/...` [L, ...] and the
xattn blocks stacked as `lm/layers/xattn/...` [L / n, ...] (row g = `xattn_{g * n + n - 1}`), so
freezing and weight-decay regexes written for `xattn_{i}/` need `lm/layers/xattn/`. `lm.remat_policy`
rematerialises the decoder layers and the xattn blocks alike; `vision.scan_layers` /
`vision.remat_policy` do the same for the ViT. `layer_stacks()` lists the scanned stacks for the
converters (`vlm_jax.param_paths`).

Packed rows (`vlm_jax.data.packing`): `segment_ids` int[B, T_txt] keeps packed examples apart in
the LM's self-attention (`vlm_jax.models.llama`). The xattn needs no mask of its own: a text token
sees image cumsum(<image>)[t], its own example's image as long as every packed example starts with
its `<image>` (the packer checks that). Attending to all earlier images would reach into earlier
examples, so packing requires `only_attend_immediate_media=True`.

Decoding (`vlm_jax.eval.generate`): `caches` (from `init_caches`) make the LM append this call's
keys/values, with `attention_mask` covering the whole cache and `positions` the new tokens' position
ids. Every call returns the xattn blocks' media keys/values in aux["media_kv"]; passed back as
`media_kv`, they replace `vision_x` (which may then be None): the vision tower, the resampler and
the xattn k/v projections do not run again. With `text_time` the new tokens attend to the last
prompt image (OpenFlamingo's cached-media mode). Works unscanned and with `lm.scan_layers` (the
caches and media keys/values are then stacked per layer / per group).
"""

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from vlm_jax.layers.gated_xattn import GatedCrossAttentionBlock, media_text_time
from vlm_jax.layers.resampler import PerceiverResampler
from vlm_jax.layers.scan import remat_call
from vlm_jax.models import llama, lm_spec, model_class, vision_tower
from vlm_jax.param_paths import LayerStack

Dtype = Any
LM_FAMILIES = ("llama", "gpt_neox", "mpt")


def xattn_layer_ids(num_layers: int, every: int) -> list[int]:
  """Decoder layers preceded by an xattn block: i with (i + 1) % every == 0 (OpenFlamingo)."""
  if every < 1:
    raise ValueError(f"model.cross_attn_every_n_layers must be >= 1, got {every}")
  return [i for i in range(num_layers) if (i + 1) % every == 0]


class Model(nn.Module):
  """(vision_x, input_ids, attention_mask) -> (logits float32[B, T_txt, V], aux)."""

  vision: Any = None  # kwargs of models.vit.Model, or models.lavit.Model with vision_family="lavit"
  vision_family: str = "vit"
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
    if self.vision_family != "vit":
      self._tower(parent=None)  # an unknown family fails here, naming model.vision_family
      if self.vision_tokens != "pre_ln_post":
        raise ValueError(f"model.vision_tokens must be 'pre_ln_post' with vision_family "
                         f"{self.vision_family!r} (no per-token LN_post), got "
                         f"{self.vision_tokens!r}")
    lm = lm_spec(self.lm_family, self.lm)
    every = self.cross_attn_every_n_layers
    if lm.scan_layers and (every < 1 or lm.num_layers % every):
      raise ValueError(f"model.lm.scan_layers scans groups of model.cross_attn_every_n_layers "
                       f"({every}) decoder layers, one xattn block each: model.lm.num_layers "
                       f"({lm.num_layers}) must be a multiple of it (or scan_layers=False)")
    super().__post_init__()

  @nn.nowrap
  def layer_stacks(self) -> tuple[LayerStack, ...]:
    """The scanned stacks of this model's param layout (vision, LM and xattn; none by default)."""
    lm_cfg = dict(self.lm or {})
    lm = lm_spec(self.lm_family, lm_cfg)
    out = [s.prefixed("vision/") for s in self._tower(parent=None).layer_stacks()]
    out += [s.prefixed("lm/") for s in lm.layer_stacks()]
    if lm.scan_layers:
      ids = xattn_layer_ids(lm.num_layers, self.cross_attn_every_n_layers)
      out.append(LayerStack("xattn_{i}", "lm/layers/xattn", tuple(ids)))
    return tuple(out)

  @nn.nowrap
  def _tower(self, **module_kw) -> nn.Module:
    """The `vision_family` tower from `vision` (`models.vision_tower`)."""
    return vision_tower(self.vision_family, self.vision, **module_kw)

  @nn.nowrap
  def init_caches(self, batch: int, max_len: int, dtype=None):
    """The LM's empty KV caches for decoding (`llama.Model.init_caches`); dtype defaults to the
    compute dtype."""
    lm = lm_spec(self.lm_family, self.lm)
    return lm.init_caches(batch, max_len, self.dtype if dtype is None else dtype)

  @nn.compact
  def __call__(
    self,
    vision_x: jax.Array,
    input_ids: jax.Array,
    attention_mask: jax.Array | None = None,
    *,
    text_time: jax.Array | None = None,
    segment_ids: jax.Array | None = None,
    positions: jax.Array | None = None,
    caches: Any = None,
    media_kv: Any = None,
    last_logits_only: bool = False,
  ) -> tuple[jax.Array, dict]:
    """vision_x: float[B, T_img, H, W, 3] (None with media_kv); input_ids: int32[B, T_txt];
    attention_mask: int[B, T_txt], or int[B, S_max] over the whole cache with `caches`.

    text_time: optional int[B, T_txt] overriding cumsum(<image>) (decoding with cached media).
    segment_ids: optional int32[B, T_txt] of a packed batch (0 = padding, 1..k = example).
    positions: optional int[B, T_txt] position ids for the LM (default 0.., or after the cache).
    caches: the LM's KV caches (`init_caches`); updated ones come back in aux["lm"]["caches"].
    last_logits_only: logits of the last position only, float32[B, 1, V] (a generation prefill).
    media_kv: aux["media_kv"] of an earlier call on the same images: {"xattn_{i}": MediaKV} or, with
      lm.scan_layers, one MediaKV stacked [G, ...] per group.

    aux: {"media": float[B, T_img, R, Dv] (None with media_kv), "text_time", "media_kv", "lm"}.
    """
    if media_kv is None and (vision_x is None or vision_x.ndim != 5):
      raise ValueError(f"vision_x must be float[B, T_img, H, W, 3] (or pass media_kv), got "
                       f"{None if vision_x is None else vision_x.shape}")
    if segment_ids is not None and not self.only_attend_immediate_media:
      raise ValueError("packed rows (segment_ids) need model.only_attend_immediate_media=True: "
                       "attending to all earlier images would cross into earlier packed examples")
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    lm_cfg = dict(self.lm or {})
    media = None if media_kv is not None else self._media(vision_x, kw)
    if text_time is None:
      text_time = media_text_time(input_ids == self.media_token_id)
    block = functools.partial(
      GatedCrossAttentionBlock, only_attend_immediate_media=self.only_attend_immediate_media, **kw,
      **dict(self.xattn or {}))
    lm = model_class(self.lm_family, "model.lm_family")(name="lm", **kw, **lm_cfg)
    hooks = {}
    if lm.scan_layers:
      hooks["layer_group"] = llama.LayerGroup(
        self.cross_attn_every_n_layers, block, (media, text_time),
        xs=() if media_kv is None else (media_kv,), collect=("media_kv",))
    else:
      blocks = {i: block(name=f"xattn_{i}")
                for i in xattn_layer_ids(lm.num_layers, self.cross_attn_every_n_layers)}
      new_kv = {}  # filled while the LM runs its layers, within this one call

      def before_layer(i: int, h: jax.Array) -> jax.Array:
        if i not in blocks:
          return h
        name = f"xattn_{i}"
        h, baux = remat_call(blocks[i], lm.remat_policy, h, media, text_time,
                             None if media_kv is None else media_kv[name])
        new_kv[name] = baux["media_kv"]
        return h
      hooks["before_layer"] = before_layer
    logits, laux = lm(input_ids, attention_mask, positions, caches, segment_ids=segment_ids,
                      last_logits_only=last_logits_only, **hooks)
    out_kv = laux["group_outputs"]["media_kv"] if lm.scan_layers else new_kv
    return logits, {"media": media, "text_time": text_time, "media_kv": out_kv, "lm": laux}

  def _media(self, vision_x: jax.Array, kw: dict) -> jax.Array:
    """vision_x float[B, T_img, H, W, 3] -> resampled latents float[B, T_img, R, Dv] (Dv = D_last
    for a LaViT tower)."""
    b, t_img = vision_x.shape[:2]
    last, vaux = self._tower(name="vision", **kw)(
      vision_x.reshape((b * t_img,) + vision_x.shape[2:]))
    if self.vision_family == "lavit":
      tokens = vaux["hidden_states"][-1]  # the last stage, [B * T_img, N_last, D_last]; no CLS
    else:
      tokens = last if self.vision_tokens == "pre_ln_post" else vaux["post_norm_tokens"]
      tokens = tokens[:, 1:]  # drop CLS
    tokens = tokens.reshape(b, t_img, 1, tokens.shape[1], tokens.shape[2])
    media, _ = PerceiverResampler(name="resampler", **kw, **dict(self.resampler or {}))(tokens)
    return media
