"""FlexAttention's hierarchical self-attention (Li et al., ECCV 2024, "FlexAttention for Efficient
High-Resolution Vision-Language Models"), with static shapes.

A LLaVA-1.5 LM sees a 1008 px image twice: 576 low-resolution (LR) tokens in its sequence, and
5184 high-resolution (HR) tokens (a 72 x 72 grid: 3 x 3 crops of 336 px through CLIP + projector)
that never enter the residual stream. From decoder layer N_SA on, each layer

1. **selects** HR regions from one query row's attention over the LR image keys (`select_blocks`):
       a = sum_heads softmax(q_r K^T / sqrt(d) + mask)[image span]        [24, 24]
       a[padding margins] = 0;  a = (a - min a) / (max a - min a);  keep a * 255 > threshold
       block_b = max over the (overlapping) adaptive-max-pool window b of the kept cells   [9, 9]
   each of the 81 blocks is 8 x 8 HR tokens (nearest upsampling 9 -> 72 is an exact x8 repeat);
2. **attends hierarchically** (`hierarchical_attention`): the selected HR tokens become extra keys
   and values, k_hd = RoPE_HR(W'_K f_HR), v_hd = W'_V f_HR, after the sequence's own keys:
       out_a = Softmax(q K^T / sqrt(d) + causal) V                         (plain attention)
       out_b = Softmax(q [K; k_hd]^T / sqrt(d) + [causal; sel]) [V; v_hd]
       out   = (1 - alpha) out_a + alpha out_b   on the rows that select,  out_a elsewhere
   alpha ramps from 0 to 1 in the authors' training (min(1, epoch * warmup)); it is 1 at inference.

Where this departs from the authors' code (reference/flex_inf.md §1.4-1.7), on purpose:
- The authors run batch 1 with a variable-size boolean gather `hd[mask]`. Here the selection is a
  fixed budget of `budget` blocks per row (`budget_blocks`: the selected blocks, highest pooled
  score first, padded with masked-out slots), so a layer jits once and shards over the batch.
  With `budget >= ` the number of selected blocks (81 always is) the result equals the gather
  exactly (`tests/layers/test_hierarchical.py` checks row by row); with fewer, the lowest-scoring
  selected blocks are dropped.
- HR keys/values are computed for the gathered blocks only (`gather_blocks` before the k/v_hd
  projections), never for all 5184 tokens, and the selection reads one query row's probabilities
  over the 576 image keys (`image_attention_row`), never an N x N map.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from vlm_jax.layers.rope import rope_tables

NEG_INF = -1e30  # finite: a row whose selected slots are all invalid stays plain attention, no NaN


def pool_windows(size: int, out: int) -> list[tuple[int, int]]:
  """`torch.nn.functional.adaptive_max_pool2d`'s windows along one axis: [floor(i*size/out),
  ceil((i+1)*size/out)) for i < out. They overlap when out does not divide size (24 -> 9)."""
  return [(i * size // out, -(-(i + 1) * size // out)) for i in range(out)]


def margin_patches(width: int, height: int, grid: int = 24) -> tuple[int, int]:
  """(patches to zero on each side, axis) for an image padded to a square by `expand2square`:
  margin = |w - h| // 2 pixels, int(margin / max(w, h) * grid) patches; axis 0 (top and bottom
  rows) when w > h, else axis 1 (left and right columns)."""
  margin = abs(width - height) // 2
  return int(margin / max(width, height) * grid), 0 if width > height else 1


def margin_mask(num: jax.Array, axis: jax.Array, grid: int = 24) -> jax.Array:
  """float[..., grid, grid]: 0 on the `num` outer rows (axis 0) or columns (axis 1), 1 elsewhere.
  num, axis: int[...] (one per image)."""
  idx = jnp.arange(grid)
  num = jnp.asarray(num)[..., None]
  outer = (idx < num) | (idx >= grid - num)  # [..., grid]
  rows = jnp.where(jnp.asarray(axis)[..., None, None] == 0, outer[..., :, None], False)
  cols = jnp.where(jnp.asarray(axis)[..., None, None] == 1, outer[..., None, :], False)
  return 1.0 - (rows | cols).astype(jnp.float32)


def select_blocks(attn: jax.Array, *, threshold: float = 48.0, blocks: int = 9,
                  margins: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
  """The authors' selection, block level.

  Args:
    attn: float[..., G*G]: head-summed attention probabilities of one query row over the G x G LR
      image tokens (row-major), e.g. [B, 576].
    threshold: keep cells with min-max-normalised value * 255 > threshold (strict; 48 released).
    blocks: the adaptive max pool's output side (9 -> 81 blocks of 8 x 8 HR tokens at 72).
    margins: float[..., G, G] from `margin_mask` (1 = keep), or None.
  Returns:
    (selected bool[..., blocks*blocks], score float[..., blocks*blocks]): a block is selected when
    any kept cell lies in its pooling window; its score is the window's max normalised value
    (used to rank blocks for a budget). A flat map (max == min) selects nothing (the authors'
    code divides by zero there and gets NaN, which compares false: the same outcome).
  """
  g = math.isqrt(attn.shape[-1])
  a = attn.astype(jnp.float32).reshape(*attn.shape[:-1], g, g)
  if margins is not None:
    a = a * margins
  lo = a.min(axis=(-2, -1), keepdims=True)
  hi = a.max(axis=(-2, -1), keepdims=True)
  span = hi - lo
  norm = jnp.where(span > 0, (a - lo) / jnp.where(span > 0, span, 1.0), 0.0)
  kept = (norm * 255.0 > threshold) & (span > 0)
  value = jnp.where(kept, norm, -1.0)
  wins = pool_windows(g, blocks)
  # Windows are static: blocks^2 small max-reductions, unrolled at trace time.
  rows = jnp.stack([value[..., r0:r1, :].max(axis=-2) for r0, r1 in wins], axis=-2)  # [..., b, G]
  pooled = jnp.stack([rows[..., c0:c1].max(axis=-1) for c0, c1 in wins], axis=-1)    # [..., b, b]
  pooled = pooled.reshape(*pooled.shape[:-2], blocks * blocks)
  return pooled >= 0, pooled


def blocks_to_tokens(selected: jax.Array, blocks: int = 9, hr_grid: int = 72) -> jax.Array:
  """bool[..., blocks^2] -> bool[..., hr_grid^2]: nearest upsampling, each block an s x s square
  (s = hr_grid // blocks), row-major over the HR grid (the authors' `F.interpolate(nearest)`)."""
  s = hr_grid // blocks
  m = selected.reshape(*selected.shape[:-1], blocks, blocks)
  m = jnp.repeat(jnp.repeat(m, s, axis=-2), s, axis=-1)
  return m.reshape(*selected.shape[:-1], hr_grid * hr_grid)


def budget_blocks(selected: jax.Array, score: jax.Array, budget: int
                  ) -> tuple[jax.Array, jax.Array]:
  """A fixed number of block slots: (index int[..., budget], valid bool[..., budget]).

  Selected blocks come first, highest score first (ties: lower index first); the remaining slots
  hold unselected blocks and are marked invalid. Attention over a set of keys does not depend on
  their order, so with budget >= the selected count this is the authors' set exactly.
  """
  key = jnp.where(selected, score, -2.0)
  _, index = jax.lax.top_k(key, budget)
  valid = jnp.take_along_axis(selected, index, axis=-1)
  return index, valid


def block_token_index(index: jax.Array, blocks: int = 9, hr_grid: int = 72) -> jax.Array:
  """int[..., K] block ids -> int[..., K * s * s] HR token ids (row-major grid), block by block."""
  s = hr_grid // blocks
  br, bc = index // blocks, index % blocks
  dr, dc = np.divmod(np.arange(s * s), s)
  tok = (br[..., None] * s + dr) * hr_grid + bc[..., None] * s + dc  # [..., K, s*s]
  return tok.reshape(*index.shape[:-1], index.shape[-1] * s * s)


def gather_blocks(hr: jax.Array, index: jax.Array, blocks: int = 9) -> jax.Array:
  """hr: [B, hr_grid^2, ...] HR tokens (features, or their RoPE cos/sin rows); index: int[B, K]
  -> [B, K * s * s, ...], the tokens of the chosen blocks (what k/v_hd are then computed on)."""
  hr_grid = math.isqrt(hr.shape[1])
  tok = block_token_index(index, blocks, hr_grid)
  return jnp.take_along_axis(hr, tok.reshape(tok.shape + (1,) * (hr.ndim - 2)), axis=1)


def image_attention_rows(q: jax.Array, k: jax.Array, bias: jax.Array, image_start: jax.Array,
                         num_image_tokens: int) -> jax.Array:
  """Head-summed attention probabilities of R query rows over the image keys.

  q: float[B, R, H, D] (the rows' queries, RoPE applied); k: float[B, T, KV, D]; bias: float[B, R, T]
  additive mask of those rows (0 / -inf: causal + padding); image_start: int[B].
  Returns float32[B, R, num_image_tokens] = sum_h softmax_T(q k^T / sqrt(D) + bias)[image span]:
  O(B R H T D); R = 1 at inference (never a T x T map), R = T on the training path.
  """
  b, r, h, d = q.shape
  kv = k.shape[2]
  qg = q.reshape(b, r, kv, h // kv, d).astype(jnp.float32)
  s = jnp.einsum("brgnd,btgd->brgnt", qg, k.astype(jnp.float32)) / math.sqrt(d)
  p = jax.nn.softmax(s + bias[:, :, None, None, :].astype(jnp.float32), axis=-1)
  p = p.reshape(b, r, h, -1).sum(axis=2)  # [B, R, T]
  return jax.vmap(lambda rows, s0: jax.lax.dynamic_slice_in_dim(rows, s0, num_image_tokens, 1))(
    p, image_start.astype(jnp.int32))


def image_attention_row(q: jax.Array, k: jax.Array, bias: jax.Array, image_start: jax.Array,
                        num_image_tokens: int) -> jax.Array:
  """`image_attention_rows` for ONE row: q float[B, H, D], bias float[B, T] -> float32[B, n]."""
  return image_attention_rows(q[:, None], k, bias[:, None], image_start, num_image_tokens)[:, 0]


def hierarchical_attention(q: jax.Array, k: jax.Array, v: jax.Array, bias: jax.Array,
                           k_hd: jax.Array, v_hd: jax.Array, hd_valid: jax.Array,
                           alpha: jax.Array | float = 1.0) -> jax.Array:
  """Attention over the sequence keys plus (for selecting rows) the selected HR keys.

  q: [B, Tq, H, D]; k, v: [B, Tk, KV, D] (GQA: H a multiple of KV); bias: [B, 1 or H, Tq, Tk]
  additive (causal + padding); k_hd, v_hd: [B, M, KV, D] the gathered HR keys (RoPE_HR applied) and
  values; hd_valid: bool[B, Tq, M]: which HR keys each query row sees (all False = a row that does
  not select: it gets plain attention). Returns [B, Tq, H, D]:
      out = (1 - alpha) out_a + alpha out_b  on rows with any valid HR key, out_a elsewhere.
  """
  b, tq, h, d = q.shape
  kv = k.shape[2]
  r = h // kv
  qg = q.reshape(b, tq, kv, r, d).astype(jnp.float32) / math.sqrt(d)
  s_base = jnp.einsum("bqgrd,btgd->bgrqt", qg, k.astype(jnp.float32))
  bias = bias.astype(jnp.float32)
  s_base = s_base + (bias[:, :, None] if bias.shape[1] == 1 else bias.reshape(b, kv, r, tq, -1))
  s_hd = jnp.einsum("bqgrd,bmgd->bgrqm", qg, k_hd.astype(jnp.float32))
  s_hd = jnp.where(hd_valid[:, None, None], s_hd, NEG_INF)
  vf, vhf = v.astype(jnp.float32), v_hd.astype(jnp.float32)
  out_a = jnp.einsum("bgrqt,btgd->bqgrd", jax.nn.softmax(s_base, axis=-1), vf)
  # out_b: one softmax over [base; HR], split back to weigh each value set.
  p = jax.nn.softmax(jnp.concatenate([s_base, s_hd], axis=-1), axis=-1)
  tk = k.shape[1]
  out_b = (jnp.einsum("bgrqt,btgd->bqgrd", p[..., :tk], vf)
           + jnp.einsum("bgrqm,bmgd->bqgrd", p[..., tk:], vhf))
  selects = hd_valid.any(axis=-1)[:, :, None, None, None]  # [B, Tq, 1, 1, 1]
  alpha = jnp.asarray(alpha, jnp.float32)
  out = jnp.where(selects, (1.0 - alpha) * out_a + alpha * out_b, out_a)
  return out.reshape(b, tq, h, d).astype(q.dtype)


def hr_rope_tables(image_start: jax.Array, num_image_tokens: int, head_dim: int,
                   theta: float = 10000.0, hr_grid: int = 72) -> tuple[jax.Array, jax.Array]:
  """The HR keys' RoPE tables (reference/flex_inf.md §1.6): the cos / sin rows of the LR image
  span's positions, as a G x G grid per channel, bicubic-resized (torch kernel, a = -0.75) to
  hr_grid x hr_grid. The values are interpolated, not the positions (so cos^2 + sin^2 != 1), as
  the authors do; each HR token's phase lies between those of the LR tokens over its region.
  image_start: int[B] -> (cos, sin) float32[B, hr_grid^2, head_dim]. (The authors take the span of
  the batch's first image for every sample; per-sample spans agree with that when they coincide.)
  """
  from vlm_jax.layers.resize import resize  # pylint: disable=g-import-not-at-top

  g = math.isqrt(num_image_tokens)
  pos = image_start.astype(jnp.int32)[:, None] + jnp.arange(num_image_tokens)  # [B, P]
  tables = [resize(t.reshape(-1, g, g, head_dim), (hr_grid, hr_grid), "bicubic")
            .reshape(-1, hr_grid ** 2, head_dim) for t in rope_tables(pos, head_dim, theta)]
  return tables[0], tables[1]
