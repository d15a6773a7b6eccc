"""Tanh-gated cross-attention dense block (Flamingo GATED XATTN-DENSE; OpenFlamingo
`GatedCrossAttentionBlock` / `MaskedCrossAttention`).

  y = y + tanh(alpha_attn) * XAttn(LN(y), media)
  y = y + tanh(alpha_ff)   * FFW(y)

with alpha initialised to 0, so a freshly inserted block is the identity and the frozen LM's outputs are
unchanged at initialisation.

Media masking (OpenFlamingo, `only_attend_immediate_media=True`): with
  text_time[t]  = cumsum(input_ids == <image>)[t]     (the <image> token itself sees its own image)
  media_time[m] = m + 1
text token t may attend to the R latents of image m iff text_time[t] == media_time[m] (`>=` with
`only_attend_immediate_media=False`, i.e. attend to all previous images). Tokens before the first <image>
(text_time = 0) get exactly zero attention output; they still pass through the gated FFW. Zero-padded image
slots beyond the number of <image> tokens have media_time > max(text_time) and are never attended.

For decoding after a cached prompt, `text_time` can be given directly (OpenFlamingo's cached-media mode:
every new token attends to the last prompt image), and so can the media's keys/values (`MediaKV`,
returned in aux["media_kv"] by every call): they depend only on the media, so a generation loop
computes them once per prompt instead of projecting the R * T_img latents again at every new token.
"""

from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp

from vlm_jax.layers.attention import dot_product_attention
from vlm_jax.layers.linear import dense
from vlm_jax.layers.mlp import FeedForward
from vlm_jax.layers.norms import LayerNorm

Dtype = Any


@flax.struct.dataclass
class MediaKV:
  """The media's cross-attention keys and values of one xattn block.

  k, v: float[B, H, T_img, R, D] (heads H of dim D; heads-major as `KVCache`, so that decode steps
  read them in place); a leading [G] axis when stacked per scanned group.
  """

  k: jax.Array
  v: jax.Array


def media_text_time(media_locations: jax.Array) -> jax.Array:
  """bool[B, T_txt] (True at <image> tokens) -> int32[B, T_txt]: index (1-based) of the latest image."""
  return jnp.cumsum(media_locations.astype(jnp.int32), axis=-1)


def media_attention_mask(
  text_time: jax.Array, num_media: int, only_attend_immediate_media: bool = True
) -> jax.Array:
  """text_time: int[B, T_txt] -> bool[B, T_txt, T_img]: which image each text token may attend to."""
  media_time = jnp.arange(num_media, dtype=text_time.dtype) + 1
  if only_attend_immediate_media:
    return text_time[..., None] == media_time
  return text_time[..., None] >= media_time


class MaskedCrossAttention(nn.Module):
  """x: float[B, T_txt, D] attends to media float[B, T_img, R, Dv] -> (float[B, T_txt, D], aux).

  With `media_kv` (a previous call's aux["media_kv"]) the media's k/v projections are not recomputed
  and `media` may be None. aux: {"media_mask": bool[B, T_txt, T_img * R], "media_kv": MediaKV}.
  """

  heads: int = 8
  dim_head: int = 64
  only_attend_immediate_media: bool = True
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, media: jax.Array | None, text_time: jax.Array,
               media_kv: MediaKV | None = None) -> tuple[jax.Array, dict]:
    b, t_txt, d = x.shape
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    hd = (self.heads, self.dim_head)
    x = LayerNorm(name="norm", **kw)(x)
    q = dense(hd, ("embed", "heads", "kv"), name="q", **kw)(x)
    if media_kv is None:
      if media is None:
        raise ValueError("MaskedCrossAttention needs media float[B, T_img, R, Dv] or media_kv")
      _, t_img, r, dv = media.shape
      media_flat = media.reshape(b, t_img * r, dv).astype(self.dtype)
      k = dense(hd, ("embed", "heads", "kv"), name="k", **kw)(media_flat)
      v = dense(hd, ("embed", "heads", "kv"), name="v", **kw)(media_flat)
      media_kv = MediaKV(*(jnp.swapaxes(a, 1, 2).reshape(b, self.heads, t_img, r, self.dim_head)
                           for a in (k, v)))
      heads_first = False
    else:
      t_img, r = media_kv.k.shape[2:4]
      k, v = (a.reshape(b, self.heads, t_img * r, self.dim_head).astype(self.dtype)
              for a in (media_kv.k, media_kv.v))
      heads_first = True
    allowed = media_attention_mask(text_time, t_img, self.only_attend_immediate_media)
    has_media = allowed.any(-1)  # [B, T_txt]; False before the first <image>
    # Rows that may see no image would be all-masked; let them attend anywhere (finite on every
    # backend, cuDNN included) and zero their output below, as OpenFlamingo zeroes their probs.
    allowed = allowed | ~has_media[..., None]
    mask = jnp.repeat(allowed, r, axis=-1)[:, None]  # [B, 1, T_txt, T_img * R]
    out, _ = dot_product_attention(q, k, v, mask, kv_heads_first=heads_first)
    out = jnp.where(has_media[..., None, None], out, jnp.zeros_like(out))
    out = dense(d, ("heads", "kv", "embed"), axis=(-2, -1), name="o", **kw)(out)
    return out, {"media_mask": allowed & has_media[..., None], "media_kv": media_kv}


class GatedCrossAttentionBlock(nn.Module):
  """y: float[B, T_txt, D], media: float[B, T_img, R, Dv] (or None with media_kv), text_time:
  int[B, T_txt], media_kv: optional MediaKV -> (y', aux) with aux as MaskedCrossAttention's."""

  heads: int = 8
  dim_head: int = 64
  ff_mult: int = 4
  act: str = "gelu"
  only_attend_immediate_media: bool = True
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, y: jax.Array, media: jax.Array | None, text_time: jax.Array,
               media_kv: MediaKV | None = None) -> tuple[jax.Array, dict]:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    gate_init = nn.with_logical_partitioning(nn.initializers.zeros_init(), (None,))
    attn_gate = self.param("attn_gate", gate_init, (1,), self.param_dtype)
    ff_gate = self.param("ff_gate", gate_init, (1,), self.param_dtype)
    attn_out, aux = MaskedCrossAttention(
      self.heads, self.dim_head, self.only_attend_immediate_media, name="attn", **kw
    )(y, media, text_time, media_kv)
    y = y + attn_out * jnp.tanh(attn_gate).astype(self.dtype)
    y = y + FeedForward(self.ff_mult, self.act, name="ff", **kw)(y) * jnp.tanh(ff_gate).astype(self.dtype)
    return y, aux
