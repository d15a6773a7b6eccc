"""CLIP-style Vision Transformer (Radford et al. 2021; HF `CLIPVisionModel`, open_clip `VisionTransformer`).

  x0 = [cls; patchify(img) W_patch] + pos        (patch conv without bias)
  h0 = LN_pre(x0)
  h_l = h_{l-1} + Attn(LN_1(h_{l-1}));  h_l = h_l + MLP(LN_2(h_l))
  pooled = LN_post(h_L[:, 0])

Images are NHWC floats already normalised (`vlm_jax.data.images.clip_preprocess`). The call returns the last
hidden state (before `LN_post`, like HF's `last_hidden_state`) first and, in aux, every hidden state (HF's
`hidden_states`: the pre-LN'd embeddings then each layer's output), the pooled output, and the last
hidden state with `LN_post` applied to all tokens (what open_clip >= 2.23 returns as tokens).
OpenAI CLIP weights use QuickGELU (`act="quick_gelu"`, the default); `act="gelu"` for others.

`scan_layers` runs the encoder layers as one `nn.scan` (params `layers/...` with a leading layer
axis; the hidden states come back as the scan's per-layer outputs, the same tuple), `remat_policy`
rematerialises each layer (`vlm_jax.layers.scan`).
"""

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from vlm_jax.layers.attention import SelfAttention
from vlm_jax.layers.embeddings import learned_positions
from vlm_jax.layers.mlp import Mlp
from vlm_jax.layers.norms import LayerNorm
from vlm_jax.layers.scan import check_remat_policy, remat_call, scan_layers
from vlm_jax.param_paths import LayerStack

Dtype = Any
# OpenAI CLIP pixel statistics, for uint8 input (equal to vlm_jax.data.images'; models import no data).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class EncoderLayer(nn.Module):
  """Pre-LN transformer encoder layer.  x: float[B, N, D] -> float[B, N, D]."""

  heads: int
  mlp_dim: int
  act: str
  norm_eps: float
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    d = x.shape[-1]
    h = LayerNorm(self.norm_eps, name="norm1", **kw)(x)
    h, _ = SelfAttention(self.heads, d // self.heads, qkv_bias=True, out_bias=True, rope_theta=None,
                         name="attn", **kw)(h, None)
    x = x + h
    h = LayerNorm(self.norm_eps, name="norm2", **kw)(x)
    x = x + Mlp(self.mlp_dim, self.act, name="mlp", **kw)(h)
    return nn.with_logical_constraint(x, ("activation_batch", "activation_length", "activation_embed"))


class Model(nn.Module):
  """images: float[B, H, W, 3] -> (last_hidden_state float[B, 1 + P, D], aux)."""

  image_size: int = 224
  patch_size: int = 14
  width: int = 1024
  depth: int = 24
  heads: int = 16
  mlp_dim: int | None = None
  act: str = "quick_gelu"
  norm_eps: float = 1e-5
  scan_layers: bool = False
  remat_policy: str = "none"
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  def __post_init__(self):
    check_remat_policy(self.remat_policy, "vision.remat_policy")
    if self.width % self.heads:
      raise ValueError(f"vision.width ({self.width}) must be divisible by vision.heads ({self.heads})")
    if self.image_size % self.patch_size:
      raise ValueError(f"vision.image_size ({self.image_size}) must be divisible by "
                       f"vision.patch_size ({self.patch_size})")
    super().__post_init__()

  @property
  def num_patches(self) -> int:
    return (self.image_size // self.patch_size) ** 2

  @nn.compact
  def __call__(self, images: jax.Array) -> tuple[jax.Array, dict]:
    """images: NHWC float[B, H, W, 3] already normalised, or uint8[B, H, W, 3] raw pixels, normalised
    here with the CLIP mean/std ((x / 255 - mean) / std), as `data.images.clip_preprocess` would."""
    if images.dtype == jnp.uint8:
      mean = jnp.asarray(CLIP_MEAN, jnp.float32)
      std = jnp.asarray(CLIP_STD, jnp.float32)
      images = (images.astype(jnp.float32) / 255.0 - mean) / std
    if images.ndim != 4 or images.shape[-1] != 3:
      raise ValueError(f"vision input must be NHWC float[B, H, W, 3], got shape {images.shape}")
    if images.shape[1:3] != (self.image_size, self.image_size):
      raise ValueError(f"vision input is {images.shape[1]}x{images.shape[2]} but "
                       f"vision.image_size is {self.image_size}")
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    p = self.patch_size
    x = nn.Conv(
      self.width, (p, p), strides=(p, p), padding="VALID", use_bias=False, name="patch_embed",
      kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(),
                                               (None, None, None, "embed")), **kw,
    )(images.astype(self.dtype))
    b = x.shape[0]
    x = x.reshape(b, -1, self.width)
    cls = self.param("cls", nn.with_logical_partitioning(nn.initializers.normal(0.02), ("embed",)),
                     (self.width,), self.param_dtype)
    x = jnp.concatenate([jnp.broadcast_to(cls.astype(self.dtype), (b, 1, self.width)), x], axis=1)
    x = x + learned_positions(self, "pos_embed", x.shape[1], self.width, self.param_dtype).astype(
      self.dtype)
    x = LayerNorm(self.norm_eps, name="pre_norm", **kw)(x)
    hidden_states = [x]
    mlp_dim = self.mlp_dim or 4 * self.width
    layer = functools.partial(EncoderLayer, self.heads, mlp_dim, self.act, self.norm_eps, **kw)
    if self.scan_layers:
      def body(mdl, h, _):
        h = remat_call(mdl, self.remat_policy, h, scanned=True)
        return h, h
      x, per_layer = scan_layers(body, layer(name="layers"), x, None, length=self.depth)
      hidden_states += list(per_layer)
    else:
      for i in range(self.depth):
        x = remat_call(layer(name=f"layers_{i}"), self.remat_policy, x)
        hidden_states.append(x)
    post_norm = LayerNorm(self.norm_eps, name="post_norm", **kw)
    post_tokens = post_norm(x)
    aux = {"hidden_states": tuple(hidden_states), "pooled": post_tokens[:, 0],
           "post_norm_tokens": post_tokens}
    return x, aux

  @nn.nowrap
  def layer_stacks(self) -> tuple[LayerStack, ...]:
    """The scanned stacks of this model's param layout (none unless scan_layers)."""
    if not self.scan_layers:
      return ()
    return (LayerStack("layers_{i}", "layers", tuple(range(self.depth))),)
