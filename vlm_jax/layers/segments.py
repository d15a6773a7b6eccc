"""Packed sequences: several examples in one row, kept apart by `segment_ids`.

A packed row holds examples 1..k back to back, then padding:

  segment_ids int32[B, T]:  1 1 1 1 2 2 2 3 3 0 0      (0 = padding)

For the row to compute exactly what each example computes alone, self-attention is block-diagonal
causal (query i sees key j iff j <= i and seg[j] == seg[i]) and positions restart at 0 in every
segment; relative schemes (RoPE on those positions, ALiBi on buffer indices) then see the same
distances as in the example's own row. This module gives both; `vlm_jax.data.packing` packs rows.
"""

import jax
import jax.numpy as jnp


def segment_mask(segment_ids: jax.Array) -> jax.Array:
  """int[B, T] -> bool[B, 1, T, T]: True where query i and key j are in the same segment.

  AND it with `causal_padding_mask` for the block-diagonal causal mask. Padding queries (segment 0)
  keep their whole row: their outputs are never trained or read, and a row that may attend nowhere
  is not finite on every backend (cuDNN), so they see what an unpacked padding query would see.
  """
  same = segment_ids[:, :, None] == segment_ids[:, None, :]
  return (same | (segment_ids == 0)[:, :, None])[:, None]


def segment_positions(segment_ids: jax.Array) -> jax.Array:
  """int[B, T] -> int32[B, T]: each token's index within its segment (restarting at 0).

  A segment starts where the id changes, so segments must be contiguous (as packers write them).
  """
  t = segment_ids.shape[-1]
  idx = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), segment_ids.shape)
  changed = jnp.concatenate(
    [jnp.ones_like(segment_ids[:, :1], bool), segment_ids[:, 1:] != segment_ids[:, :-1]], axis=1)
  start = jax.lax.cummax(jnp.where(changed, idx, 0), axis=1)
  return idx - start
