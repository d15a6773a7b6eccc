"""LLaMA-family decoder LM (Touvron et al. 2023; HF `LlamaForCausalLM`): RMSNorm, RoPE, GQA, SwiGLU.

  h_0 = E[input_ids]
  h = h + Attn(RMSNorm(h), causal & padding mask, RoPE(positions));  h = h + SwiGLU(RMSNorm(h))
  logits = RMSNorm(h_L) W_out            (W_out = E^T when tie_embeddings)

`before_layer(i, h) -> h` is a hook run before decoder layer i; Flamingo inserts its gated xattn blocks
through it (OpenFlamingo's `FlamingoLayer`: xattn first, then the LM's own decoder layer).
`embed_hook(h_0) -> h_0` rewrites the token embeddings float[B, T, D] before the first layer; LLaVA
scatters its projected image features into the image-token rows through it.
With `caches` (one `KVCache` per layer) the call appends this call's keys/values and `attention_mask`
covers the whole cache (`[B, S_max]`, 1 = a real key), as in HF generation.

Variants: `qkv_bias` adds biases to the q/k/v projections (Qwen2). `sliding_window` W bands the causal
mask so query i sees keys i - W < j <= i (Mistral, Qwen2 `use_sliding_window`); the first
`full_attention_layers` layers keep plain causal attention (Qwen2 `max_window_layers`). The window is a
mask only: the KV cache still holds every position, so decoding matches the full forward exactly.

Packed rows (`vlm_jax.data.packing`): `segment_ids` int[B, T] (0 = padding) makes self-attention
block-diagonal causal and restarts the default positions at 0 in each segment, so every packed
example gets the logits it gets alone (`vlm_jax.layers.segments`). Training only: not with `caches`.
"""

from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from vlm_jax.layers.attention import KVCache, SelfAttention, causal_padding_mask
from vlm_jax.layers.embeddings import token_embed
from vlm_jax.layers.linear import dense
from vlm_jax.layers.mlp import SwiGlu
from vlm_jax.layers.norms import RMSNorm
from vlm_jax.layers.segments import segment_mask, segment_positions

Dtype = Any


class DecoderLayer(nn.Module):
  """Pre-norm decoder layer.  x: float[B, T, D] -> (float[B, T, D], aux)."""

  num_heads: int
  num_kv_heads: int
  head_dim: int
  mlp_dim: int
  rope_theta: float
  norm_eps: float
  qkv_bias: bool = False
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, mask, positions, cache=None, return_probs=False):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    h = RMSNorm(self.norm_eps, name="input_norm", **kw)(x)
    h, aux = SelfAttention(self.num_heads, self.head_dim, self.num_kv_heads, qkv_bias=self.qkv_bias,
                           rope_theta=self.rope_theta, name="attn", **kw)(
      h, mask, positions, cache, return_probs=return_probs)
    x = x + h
    h = RMSNorm(self.norm_eps, name="post_attn_norm", **kw)(x)
    x = x + SwiGlu(self.mlp_dim, name="mlp", **kw)(h)
    x = nn.with_logical_constraint(x, ("activation_batch", "activation_length", "activation_embed"))
    return x, aux


class Model(nn.Module):
  """input_ids: int32[B, T], attention_mask: int[B, T] -> (logits float32[B, T, V], aux)."""

  vocab_size: int = 32000
  hidden_size: int = 4096
  num_layers: int = 32
  num_heads: int = 32
  num_kv_heads: int | None = None
  head_dim: int | None = None
  mlp_dim: int = 11008
  rope_theta: float = 10000.0
  norm_eps: float = 1e-6
  tie_embeddings: bool = False
  qkv_bias: bool = False
  sliding_window: int | None = None
  full_attention_layers: int = 0
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  def __post_init__(self):
    if self.sliding_window is not None and self.sliding_window < 1:
      raise ValueError(f"lm.sliding_window must be a positive number of keys or None, got "
                       f"{self.sliding_window}")
    if self.full_attention_layers and (self.sliding_window is None
                                       or not 0 <= self.full_attention_layers <= self.num_layers):
      raise ValueError(f"lm.full_attention_layers ({self.full_attention_layers}) needs a sliding_window "
                       f"and must be in [0, num_layers={self.num_layers}]")
    # Subclasses build their own decoder layers; refuse a field they would silently drop.
    if self.qkv_bias and type(self).decoder_layer is not Model.decoder_layer:
      raise ValueError(f"lm.qkv_bias is an option of the LLaMA decoder layer; "
                       f"{type(self).__module__}.{type(self).__name__} does not use it")
    if self.head_dim is None and self.hidden_size % self.num_heads:
      raise ValueError(f"lm.hidden_size ({self.hidden_size}) must be divisible by lm.num_heads "
                       f"({self.num_heads})")
    if self.num_kv_heads is not None and self.num_heads % self.num_kv_heads:
      raise ValueError(f"lm.num_heads ({self.num_heads}) must be a multiple of lm.num_kv_heads "
                       f"({self.num_kv_heads})")
    super().__post_init__()

  @property
  def kv_heads(self) -> int:
    return self.num_kv_heads or self.num_heads

  @property
  def dim_per_head(self) -> int:
    return self.head_dim or self.hidden_size // self.num_heads

  @nn.compact
  def __call__(
    self,
    input_ids: jax.Array,
    attention_mask: jax.Array | None = None,
    positions: jax.Array | None = None,
    caches: Sequence[KVCache] | None = None,
    before_layer: Callable[[int, jax.Array], jax.Array] | None = None,
    return_probs: bool = False,
    embed_hook: Callable[[jax.Array], jax.Array] | None = None,
    segment_ids: jax.Array | None = None,
  ) -> tuple[jax.Array, dict]:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    b, t = input_ids.shape
    if segment_ids is not None and caches is not None:
      raise ValueError("segment_ids (packed training rows) cannot be combined with KV caches")
    offset = 0 if caches is None else caches[0].index
    if attention_mask is None:
      s = t if caches is None else caches[0].k.shape[1]
      attention_mask = jnp.ones((b, s), jnp.int32)
    if positions is None and segment_ids is not None:
      positions = segment_positions(segment_ids)
    if positions is None:
      positions = jnp.broadcast_to(jnp.arange(t) + offset, (b, t))
    mask = causal_padding_mask(attention_mask, q_offset=offset, num_queries=t)
    window_mask = None
    if self.sliding_window is not None:
      window_mask = causal_padding_mask(attention_mask, q_offset=offset, num_queries=t,
                                        sliding_window=self.sliding_window)
    if segment_ids is not None:  # packed rows: no attention across examples
      same = segment_mask(segment_ids)
      mask = mask & same
      window_mask = None if window_mask is None else window_mask & same
    embed = token_embed(self.vocab_size, self.hidden_size, name="embed", **kw)
    x = embed(input_ids)
    if embed_hook is not None:
      x = embed_hook(x)
    x = nn.with_logical_constraint(x, ("activation_batch", "activation_length", "activation_embed"))
    new_caches, probs = [], []
    for i in range(self.num_layers):
      if before_layer is not None:
        x = before_layer(i, x)
      windowed = window_mask is not None and i >= self.full_attention_layers
      x, aux = self.decoder_layer(i, kw)(
        x, window_mask if windowed else mask, positions, None if caches is None else caches[i],
        return_probs)
      new_caches.append(aux["cache"])
      probs.append(aux["probs"])
    x = self.final_norm(kw)(x)
    if self.tie_embeddings:
      logits = embed.attend(x)
    else:
      logits = dense(self.vocab_size, ("embed", "vocab"), name="lm_head", **kw)(x)
    aux = {"hidden": x, "caches": None if caches is None else new_caches,
           "attention_probs": probs if return_probs else None}
    return logits.astype(jnp.float32), aux

  # The two places where decoder families differ; subclasses (vlm_jax.models.gpt_neox) override them.
  def decoder_layer(self, i: int, kw: dict) -> nn.Module:
    return DecoderLayer(self.num_heads, self.kv_heads, self.dim_per_head, self.mlp_dim,
                        self.rope_theta, self.norm_eps, self.qkv_bias, name=f"layers_{i}", **kw)

  def final_norm(self, kw: dict) -> nn.Module:
    return RMSNorm(self.norm_eps, name="norm", **kw)

  def init_caches(self, batch: int, max_len: int, dtype=jnp.float32) -> list[KVCache]:
    """Empty KV caches for generation: one per layer, float[B, max_len, K, D]."""
    return [KVCache.zeros(batch, max_len, self.kv_heads, self.dim_per_head, dtype)
            for _ in range(self.num_layers)]
