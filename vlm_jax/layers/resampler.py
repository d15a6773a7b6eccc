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

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from vlm_jax.layers.attention import dot_product_attention
from vlm_jax.layers.linear import dense
from vlm_jax.layers.mlp import FeedForward
from vlm_jax.layers.norms import LayerNorm, LayerNormAffine, standardize

Dtype = Any


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def norm_project(xhat: jax.Array, scale: jax.Array, bias: jax.Array, kernel: jax.Array,
                 dtype: Dtype = jnp.float32) -> jax.Array:
  """(xhat * scale + bias) @ kernel: a LayerNorm's affine and a bias-free projection, the matmuls in
  `dtype` accumulated in float32.

  xhat: float32[N, D] standardized; scale, bias: float[D]; kernel: float[D, F] -> float32[N, F].
  The VJP reassociates, with M = xhat^T g (float[D, F]) and c = sum_n g[n] (float[F]):

    dkernel = scale[:, None] * M + bias[:, None] * c[None, :]
    dscale_j = sum_f kernel[j, f] M[j, f]        dbias = kernel @ c
    dxhat = (g @ kernel^T) * scale

  Autodiff would form dxhat (an [N, F] x [F, D] matmul) just to reduce it into dscale and dbias; here
  M, which dkernel needs anyway, serves both, and dxhat is dead code when xhat needs no gradient (the
  resampler's media come from a frozen vision tower), so XLA drops that matmul: 1.2 of the
  resampler's 10.6 GFLOPs per layer of forward + backward in the OpenFlamingo train step.
  """
  return _norm_project_fwd(xhat, scale, bias, kernel, dtype)[0]


def _matmul(a: jax.Array, b: jax.Array, dtype: Dtype) -> jax.Array:
  return jnp.dot(a.astype(dtype), b.astype(dtype), preferred_element_type=jnp.float32)


def _norm_project_fwd(xhat, scale, bias, kernel, dtype):
  y = _matmul(xhat * scale.astype(jnp.float32) + bias.astype(jnp.float32), kernel, dtype)
  return y, (xhat, scale, bias, kernel)


def _norm_project_bwd(dtype, res, g):
  xhat, scale, bias, kernel = res
  k32 = kernel.astype(jnp.float32)
  m = _matmul(xhat.T, g, dtype)  # [D, F]
  c = g.sum(0)  # [F]
  s32, b32 = scale.astype(jnp.float32), bias.astype(jnp.float32)
  dkernel = s32[:, None] * m + b32[:, None] * c[None, :]
  dscale = (k32 * m).sum(1)
  dbias = k32 @ c
  dxhat = _matmul(g, kernel.T, dtype) * s32
  return (dxhat, dscale.astype(scale.dtype), dbias.astype(bias.dtype), dkernel.astype(kernel.dtype))


norm_project.defvjp(_norm_project_fwd, _norm_project_bwd)


class PerceiverAttention(nn.Module):
  """latents: float[N, R, D] attend to concat(media float[N, M, D], latents) -> float[N, R, D].

  k and v of the media rows are `norm_project(standardize(media), norm_media, W)`, of the latent rows
  the usual LayerNorm + projection; same params and values as projecting LN(concat(...)), with the
  media's weight gradients reassociated (see `norm_project`).
  """

  heads: int = 8
  dim_head: int = 64
  eps: float = 1e-5
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, media: jax.Array, latents: jax.Array) -> jax.Array:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    n, m, d = media.shape
    scale, bias = LayerNormAffine(name="norm_media", param_dtype=self.param_dtype)(d)
    media_hat = standardize(media, self.eps).reshape(n * m, d)
    latents = LayerNorm(self.eps, name="norm_latents", **kw)(latents)
    hd = (self.heads, self.dim_head)
    q = dense(hd, ("embed", "heads", "kv"), name="q", **kw)(latents)

    def keys_or_values(name):
      proj = dense(hd, ("embed", "heads", "kv"), name=name, **kw)
      of_latents = proj(latents)
      kernel = nn.unbox(proj.variables["params"]["kernel"]).reshape(d, -1)
      of_media = norm_project(media_hat, scale, bias, kernel, self.dtype).astype(self.dtype)
      return jnp.concatenate([of_media.reshape(n, m, *hd), of_latents], axis=1)

    out, _ = dot_product_attention(q, keys_or_values("k"), keys_or_values("v"))
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
