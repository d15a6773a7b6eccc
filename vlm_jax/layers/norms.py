"""Normalisation layers: LayerNorm (CLIP, Perceiver, xattn; torch default eps 1e-5) and RMSNorm (LLaMA).

Both compute in float32 regardless of the compute dtype (statistics in bf16 lose too much precision) and
cast back. Params carry the logical axis name `embed`.
"""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any


def _vector_param(module: nn.Module, name: str, init, d: int, dtype) -> jax.Array:
  """A per-feature param float[D] with logical axis `embed`."""
  return module.param(name, nn.with_logical_partitioning(init, ("embed",)), (d,), dtype)


def _affine_params(module: nn.Module, d: int, use_bias: bool, dtype
                   ) -> tuple[jax.Array, jax.Array | None]:
  """A LayerNorm's (scale float[D] = 1, bias float[D] = 0 or None)."""
  scale = _vector_param(module, "scale", nn.initializers.ones_init(), d, dtype)
  bias = _vector_param(module, "bias", nn.initializers.zeros_init(), d, dtype) if use_bias else None
  return scale, bias


def standardize(x: jax.Array, epsilon: float) -> jax.Array:
  """float32 (x - mean) / sqrt(var + eps) over the last axis: LayerNorm before its affine."""
  xf = x.astype(jnp.float32)
  mean = xf.mean(-1, keepdims=True)
  var = jnp.square(xf - mean).mean(-1, keepdims=True)
  return (xf - mean) * jax.lax.rsqrt(var + epsilon)


class LayerNormAffine(nn.Module):
  """Only the params of a `LayerNorm` (same names, init and axis names): -> (scale, bias or None),
  float[D] each, for a layer that applies the affine itself (`resampler.norm_project`)."""

  use_bias: bool = True
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, d: int) -> tuple[jax.Array, jax.Array | None]:
    return _affine_params(self, d, self.use_bias, self.param_dtype)


class LayerNorm(nn.Module):
  """y = (x - mean) / sqrt(var + eps) * scale + bias over the last axis.  x: float[..., D]."""

  epsilon: float = 1e-5
  use_bias: bool = True
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    scale, bias = _affine_params(self, x.shape[-1], self.use_bias, self.param_dtype)
    y = standardize(x, self.epsilon) * scale.astype(jnp.float32)
    if bias is not None:
      y = y + bias.astype(jnp.float32)
    return y.astype(self.dtype)


class RMSNorm(nn.Module):
  """y = x / sqrt(mean(x^2) + eps) * scale (LLaMA; HF `LlamaRMSNorm`).  x: float[..., D]."""

  epsilon: float = 1e-6
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    scale = _vector_param(self, "scale", nn.initializers.ones_init(), x.shape[-1], self.param_dtype)
    xf = x.astype(jnp.float32)
    y = xf * jax.lax.rsqrt(jnp.mean(jnp.square(xf), -1, keepdims=True) + self.epsilon)
    return (y * scale.astype(jnp.float32)).astype(self.dtype)

