"""Rotary position embeddings (RoFormer), in HF LLaMA's `rotate_half` layout.

For position p and pair index i < d/2 with inv_freq_i = theta^(-2i/d):
  x'[i]       = x[i] cos(p w_i) - x[i + d/2] sin(p w_i)
  x'[i + d/2] = x[i + d/2] cos(p w_i) + x[i] sin(p w_i)
`rotary_dim < head_dim` rotates only the first `rotary_dim` features (GPT-NeoX `rotary_pct`).

`rope_tables` computes the cos/sin rows once per call (q and k share them); `apply_rope_table`
rotates with given rows (also FlexAttention's interpolated HR tables); `apply_rope` is both.
"""

import jax
import jax.numpy as jnp


def rope_tables(positions: jax.Array, rotary_dim: int, theta: float = 10000.0
                ) -> tuple[jax.Array, jax.Array]:
  """(cos, sin) float32[B, T, rotary_dim] of positions int[B, T], the half-size rows repeated
  twice (rotate_half layout): cos(p w_i) at i and i + rotary_dim / 2."""
  if rotary_dim % 2:
    raise ValueError(f"rotary_dim must be even, got {rotary_dim}")
  inv_freq = 1.0 / (theta ** (jnp.arange(0, rotary_dim, 2, dtype=jnp.float32) / rotary_dim))
  angles = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, T, rd/2]
  cos, sin = jnp.cos(angles), jnp.sin(angles)
  return jnp.concatenate([cos, cos], -1), jnp.concatenate([sin, sin], -1)


def apply_rope_table(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
  """RoPE with given per-token rows: x float[B, T, H, D]; cos, sin float[B, T, rd], rd <= D, even
  (`rope_tables`, or FlexAttention's interpolated HR tables); features past rd pass unchanged.
  Computed in float32, returned in x's dtype."""
  rd = cos.shape[-1]
  xf = x.astype(jnp.float32)
  rot, rest = xf[..., :rd], xf[..., rd:]
  half = rd // 2
  rotated_half = jnp.concatenate([-rot[..., half:], rot[..., :half]], -1)
  out = (rot * cos[:, :, None].astype(jnp.float32)
         + rotated_half * sin[:, :, None].astype(jnp.float32))
  return jnp.concatenate([out, rest], -1).astype(x.dtype)


def apply_rope(
  x: jax.Array, positions: jax.Array, *, theta: float = 10000.0, rotary_dim: int | None = None
) -> jax.Array:
  """x: float[B, T, H, D]; positions: int[B, T] -> float[B, T, H, D] (computed in float32)."""
  rd = x.shape[-1] if rotary_dim is None else rotary_dim
  return apply_rope_table(x, *rope_tables(positions, rd, theta))
