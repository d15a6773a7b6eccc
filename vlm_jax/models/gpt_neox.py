"""GPT-NeoX decoder LM (Black et al. 2022; HF `GPTNeoXForCausalLM`; RedPajama-INCITE, Pythia), the
backbone of OpenFlamingo-4B.

Differences from LLaMA (everything else, including the `before_layer` hook and KV caches, is
`vlm_jax.models.llama.Model`): LayerNorm with bias, biased q/k/v/o projections, a GELU MLP with biases,
RoPE on only the first `rotary_pct * head_dim` features of each head, and the parallel residual
  h = x + Attn(LN_1(x)) + MLP(LN_2(x))         (use_parallel_residual, the default)
  h = x + Attn(LN_1(x));  h = h + MLP(LN_2(h))  (otherwise)
"""

import functools

import flax.linen as nn
import jax.numpy as jnp

from vlm_jax.layers.attention import SelfAttention
from vlm_jax.layers.mlp import Mlp
from vlm_jax.layers.norms import LayerNorm
from vlm_jax.models import llama


class DecoderLayer(nn.Module):
  """x: float[B, T, D] -> (float[B, T, D], aux)."""

  num_heads: int
  head_dim: int
  mlp_dim: int
  rope_theta: float
  rotary_dim: int
  norm_eps: float
  parallel_residual: bool
  dtype: object = jnp.float32
  param_dtype: object = jnp.float32

  @nn.compact
  def __call__(self, x, mask, positions, cache=None, return_probs=False):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    h, aux = SelfAttention(self.num_heads, self.head_dim, qkv_bias=True, out_bias=True,
                           rope_theta=self.rope_theta, rotary_dim=self.rotary_dim, name="attn", **kw)(
      LayerNorm(self.norm_eps, name="input_norm", **kw)(x), mask, positions, cache,
      return_probs=return_probs)
    mlp = Mlp(self.mlp_dim, "gelu", use_bias=True, name="mlp", **kw)
    post_norm = LayerNorm(self.norm_eps, name="post_attn_norm", **kw)
    if self.parallel_residual:
      x = x + h + mlp(post_norm(x))
    else:
      x = x + h
      x = x + mlp(post_norm(x))
    x = nn.with_logical_constraint(x, ("activation_batch", "activation_length", "activation_embed"))
    return x, aux


class Model(llama.Model):
  """input_ids: int32[B, T], attention_mask: int[B, T] -> (logits float32[B, T, V], aux)."""

  rotary_pct: float = 0.25
  use_parallel_residual: bool = True
  norm_eps: float = 1e-5

  def __post_init__(self):
    if self.num_kv_heads not in (None, self.num_heads):
      raise ValueError("lm.num_kv_heads: GPT-NeoX has no grouped-query attention")
    super().__post_init__()

  @nn.nowrap
  def decoder_layer(self, kw: dict):
    rotary_dim = int(self.dim_per_head * self.rotary_pct)
    return functools.partial(DecoderLayer, self.num_heads, self.dim_per_head, self.mlp_dim,
                             self.rope_theta, rotary_dim - rotary_dim % 2, self.norm_eps,
                             self.use_parallel_residual, **kw)

  def final_norm(self, kw: dict) -> nn.Module:
    return LayerNorm(self.norm_eps, name="norm", **kw)
