"""Perceiver Resampler (Flamingo, Alayrac et al. 2022, Sec. 2.1; OpenFlamingo `PerceiverResampler`).

A fixed set of R learned latents cross-attends to the patch features of each image (independently per
image) and returns R visual tokens per image:

  x_f  = x + frame_emb[f]                       (optional, video frames)
  X    = flatten_{frames, patches}(x_f) + time_emb[t]   (optional, media index)
  for each layer:
    L = L + Attn(q = LN_l(L), kv = concat[LN_m(X), LN_l(L)])   # latents also attend to themselves
    L = L + FFW(L)
  out = LN(L)

OpenFlamingo's released models use no time or frame embeddings (`max_num_media=None`,
`max_num_frames=None`), 6 layers, 8 heads of 64, 64 latents, exact-GELU FFW (mult 4), bias-free Linears,
LayerNorm eps 1e-5; those are the defaults here. The paper's squared ReLU is `act="sqrelu"`.
"""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from vlm_jax.layers.attention import dot_product_attention
from vlm_jax.layers.linear import dense
from vlm_jax.layers.mlp import FeedForward
from vlm_jax.layers.norms import LayerNorm

Dtype = Any


class PerceiverAttention(nn.Module):
  """latents: float[N, R, D] attend to concat(media float[N, M, D], latents) -> float[N, R, D]."""

  heads: int = 8
  dim_head: int = 64
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, media: jax.Array, latents: jax.Array) -> jax.Array:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    media = LayerNorm(name="norm_media", **kw)(media)
    latents = LayerNorm(name="norm_latents", **kw)(latents)
    kv_input = jnp.concatenate([media, latents], axis=-2)
    hd = (self.heads, self.dim_head)
    q = dense(hd, ("embed", "heads", "kv"), name="q", **kw)(latents)
    k = dense(hd, ("embed", "heads", "kv"), name="k", **kw)(kv_input)
    v = dense(hd, ("embed", "heads", "kv"), name="v", **kw)(kv_input)
    out, _ = dot_product_attention(q, k, v)
    return dense(latents.shape[-1], ("heads", "kv", "embed"), axis=(-2, -1), name="o", **kw)(out)


class PerceiverLayer(nn.Module):
  """One resampler layer: L = L + Attn(media, L); L = L + FFW(L)."""

  heads: int
  dim_head: int
  ff_mult: int
  act: str
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, media: jax.Array, latents: jax.Array) -> jax.Array:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    latents = PerceiverAttention(self.heads, self.dim_head, name="attn", **kw)(media, latents) + latents
    return FeedForward(self.ff_mult, self.act, name="ff", **kw)(latents) + latents


class PerceiverResampler(nn.Module):
  """x: float[B, T_img, F, P, D] patch features -> (latents float[B, T_img, R, D], aux {})."""

  depth: int = 6
  dim_head: int = 64
  heads: int = 8
  num_latents: int = 64
  max_num_media: int | None = None
  max_num_frames: int | None = None
  ff_mult: int = 4
  act: str = "gelu"
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> tuple[jax.Array, dict]:
    if x.ndim != 5:
      raise ValueError(f"resampler input must be float[B, T_img, F, P, D], got shape {x.shape}")
    b, t, f, p, d = x.shape
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    x = x.astype(self.dtype)
    if self.max_num_frames is not None:
      frame_embs = self.param(
        "frame_embs", nn.with_logical_partitioning(nn.initializers.normal(1.0), (None, "embed")),
        (self.max_num_frames, d), self.param_dtype)
      x = x + frame_embs[:f][None, None, :, None, :].astype(self.dtype)
    x = x.reshape(b, t, f * p, d)
    if self.max_num_media is not None:
      time_embs = self.param(
        "media_time_embs",
        nn.with_logical_partitioning(nn.initializers.normal(1.0), (None, None, "embed")),
        (self.max_num_media, 1, d), self.param_dtype)
      x = x + time_embs[:t][None].astype(self.dtype)
    latents = self.param(
      "latents", nn.with_logical_partitioning(nn.initializers.normal(1.0), (None, "embed")),
      (self.num_latents, d), self.param_dtype)
    # Each image is resampled independently: fold the media axis into the batch.
    media = x.reshape(b * t, f * p, d)
    lat = jnp.broadcast_to(latents.astype(self.dtype), (b * t, self.num_latents, d))
    for i in range(self.depth):
      lat = PerceiverLayer(self.heads, self.dim_head, self.ff_mult, self.act, name=f"layers_{i}",
                           **kw)(media, lat)
    lat = LayerNorm(name="norm", **kw)(lat)
    return lat.reshape(b, t, self.num_latents, d), {}
