"""MPT decoder LM (MosaicML 2023; HF `MptForCausalLM`, mosaicml's remote-code MPT and its MosaicGPT
predecessor), the backbone of OpenFlamingo-3B (MPT-1B) and OpenFlamingo-9B (MPT-7B).

  h_0 = E[input_ids]                                                    (no position embedding)
  h = h + Attn(LN_1(h), causal & padding mask, ALiBi bias);  h = h + W_down GELU(W_up LN_2(h))
  logits = LN_f(h_L) E^T                                                (tied output embedding)

Attention adds ALiBi (Press et al. 2022): head h adds m_h * (j - i) to the logit of query i, key j,
with MPT's slopes m_h = 2^(-h * alibi_bias_max / n) (`vlm_jax.layers.attention.alibi_slopes`).
Options: `use_bias` (MPT's `no_bias` is its negation; it covers every LayerNorm and Linear, the qk
norms included), `qk_norm` (LayerNorm of q and of k over all heads' features before the head split;
MPT-1B has it), `clip_qkv` (clamp q, k, v to [-c, c], before the qk norm).

Everything else, including the `before_layer` hook Flamingo's gated xattn uses, KV caches and
`init_caches`, is `vlm_jax.models.llama.Model`. `positions` is accepted and unused: ALiBi works on
query and key indices in the (left-padded, cached) buffer, as MPT and HF do.
"""

import functools

import flax.linen as nn
import jax.numpy as jnp

from vlm_jax.layers.attention import SelfAttention, alibi_bias, alibi_slopes
from vlm_jax.layers.mlp import Mlp
from vlm_jax.layers.norms import LayerNorm
from vlm_jax.models import llama


class DecoderLayer(nn.Module):
  """Pre-norm MPT block.  x: float[B, T, D], mask: bool[B, 1, T, S] -> (float[B, T, D], aux)."""

  num_heads: int
  num_kv_heads: int
  head_dim: int
  mlp_dim: int
  norm_eps: float
  use_bias: bool
  qk_norm: bool
  clip_qkv: float | None
  alibi_bias_max: float
  dtype: object = jnp.float32
  param_dtype: object = jnp.float32

  @nn.compact
  def __call__(self, x, mask, positions, cache=None, return_probs=False):
    del positions  # ALiBi uses buffer indices (see the module docstring)
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    offset = 0 if cache is None else cache.index
    num_keys = x.shape[1] if cache is None else cache.max_len
    # [1, N, T, S]: one batch row's worth of attention logits, which XLA's attention materialises
    # anyway. Built here, not in Model, so the layer keeps LLaMA's signature; under jit XLA shares
    # the identical computation across layers.
    bias = alibi_bias(alibi_slopes(self.num_heads, self.alibi_bias_max), x.shape[1], num_keys,
                      q_offset=offset)
    norm = dict(epsilon=self.norm_eps, use_bias=self.use_bias, **kw)
    attn = SelfAttention(
      self.num_heads, self.head_dim, self.num_kv_heads, qkv_bias=self.use_bias,
      out_bias=self.use_bias, rope_theta=None, qk_norm=self.qk_norm, qk_norm_eps=self.norm_eps,
      qk_norm_bias=self.use_bias, clip_qkv=self.clip_qkv, name="attn", **kw)
    h, aux = attn(LayerNorm(name="input_norm", **norm)(x), mask, None, cache, bias=bias,
                  return_probs=return_probs)
    x = x + h
    h = LayerNorm(name="post_attn_norm", **norm)(x)
    x = x + Mlp(self.mlp_dim, "gelu", use_bias=self.use_bias, name="mlp", **kw)(h)
    x = nn.with_logical_constraint(x, ("activation_batch", "activation_length", "activation_embed"))
    return x, aux


class Model(llama.Model):
  """input_ids: int32[B, T], attention_mask: int[B, T] -> (logits float32[B, T, V], aux).

  Defaults are MPT-7B's (OpenFlamingo-9B); MPT-1B is hidden_size 2048, num_layers 24, num_heads 16,
  mlp_dim 8192, use_bias True, qk_norm True.
  """

  vocab_size: int = 50432
  hidden_size: int = 4096
  num_layers: int = 32
  num_heads: int = 32
  mlp_dim: int = 16384
  norm_eps: float = 1e-5
  tie_embeddings: bool = True
  use_bias: bool = False
  qk_norm: bool = False
  clip_qkv: float | None = None
  alibi_bias_max: float = 8.0

  def __post_init__(self):
    if self.clip_qkv is not None and self.clip_qkv <= 0:
      raise ValueError(f"lm.clip_qkv must be positive or None, got {self.clip_qkv}")
    super().__post_init__()

  @nn.nowrap
  def decoder_layer(self, kw: dict):
    return functools.partial(DecoderLayer, self.num_heads, self.kv_heads, self.dim_per_head,
                             self.mlp_dim, self.norm_eps, self.use_bias, self.qk_norm,
                             self.clip_qkv, self.alibi_bias_max, **kw)

  def final_norm(self, kw: dict) -> nn.Module:
    return LayerNorm(self.norm_eps, self.use_bias, name="norm", **kw)
