"""Rotary position embeddings (RoFormer), in HF LLaMA's `rotate_half` layout.

For position p and pair index i < d/2 with inv_freq_i = theta^(-2i/d):
  x'[i]       = x[i] cos(p w_i) - x[i + d/2] sin(p w_i)
  x'[i + d/2] = x[i + d/2] cos(p w_i) + x[i] sin(p w_i)
`rotary_dim < head_dim` rotates only the first `rotary_dim` features (GPT-NeoX `rotary_pct`).
"""

import jax
import jax.numpy as jnp


def apply_rope(
  x: jax.Array, positions: jax.Array, *, theta: float = 10000.0, rotary_dim: int | None = None
) -> jax.Array:
  """x: float[B, T, H, D]; positions: int[B, T] -> float[B, T, H, D] (computed in float32)."""
  d = x.shape[-1]
  rd = d if rotary_dim is None else rotary_dim
  if rd % 2:
    raise ValueError(f"rotary_dim must be even, got {rd}")
  inv_freq = 1.0 / (theta ** (jnp.arange(0, rd, 2, dtype=jnp.float32) / rd))
  angles = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, T, rd/2]
  cos = jnp.concatenate([jnp.cos(angles)] * 2, -1)[:, :, None, :]
  sin = jnp.concatenate([jnp.sin(angles)] * 2, -1)[:, :, None, :]
  xf = x.astype(jnp.float32)
  rot, rest = xf[..., :rd], xf[..., rd:]
  half = rd // 2
  rotated_half = jnp.concatenate([-rot[..., half:], rot[..., :half]], -1)
  out = rot * cos + rotated_half * sin
  return jnp.concatenate([out, rest], -1).astype(x.dtype)
