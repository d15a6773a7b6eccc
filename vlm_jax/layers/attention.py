"""Multi-head self-attention: GQA, RoPE or ALiBi, causal/padding masks, a functional KV cache,
optional qk-LayerNorm and qkv clipping (MPT), optional probs out.

  Attention(Q, K, V) = softmax(Q K^T / sqrt(d) + B + mask) V

B is an additive bias, e.g. ALiBi (Press et al. 2022, "Train Short, Test Long"): head h adds
m_h * (j - i) to the logit of query i and key j, m_h a fixed geometric sequence of slopes
(`alibi_slopes`, `alibi_bias`).

`dot_product_attention` is the one attention kernel of the library: it calls
`jax.nn.dot_product_attention` (cuDNN/flash on GPU) unless the caller needs the attention probabilities,
in which case it computes the logits explicitly (softmax in float32). Masks are boolean, True = may attend.

The KV cache is explicit state (`KVCache`) passed in and returned, so modules stay pure: a call with a
cache writes this call's keys/values at `cache.index` and attends over the whole preallocated buffer.
"""

import math
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.ad_checkpoint import checkpoint_name

from vlm_jax.layers.linear import dense
from vlm_jax.layers.norms import LayerNorm
from vlm_jax.layers.rope import apply_rope_table, rope_tables

Dtype = Any


@flax.struct.dataclass
class KVCache:
  """Preallocated keys/values of one attention layer.

  k, v: float[B, K, S_max, D] (heads before positions, as HF's cache); index: int32[] = number of
  positions already written. Why heads-major: a decode step's q.k and p.v are dots batched over
  (B, K) that contract over D and S; XLA:CPU wants those batch axes leading, and with [B, S, K, D]
  it copied every layer's whole cache into that layout on every token (half of a batch-16 decode
  step; `benchmarks/generate.py`).
  """

  k: jax.Array
  v: jax.Array
  index: jax.Array

  @classmethod
  def zeros(cls, batch: int, max_len: int, num_kv_heads: int, head_dim: int, dtype=jnp.float32):
    shape = (batch, num_kv_heads, max_len, head_dim)
    return cls(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype), jnp.zeros((), jnp.int32))

  @property
  def max_len(self) -> int:
    return self.k.shape[-2]

  def update(self, k: jax.Array, v: jax.Array) -> "KVCache":
    """Write this call's k, v: float[B, T, K, D] at positions index .. index+T-1."""
    start = (0, 0, self.index, 0)
    ck = jax.lax.dynamic_update_slice(self.k, jnp.swapaxes(k, 1, 2).astype(self.k.dtype), start)
    cv = jax.lax.dynamic_update_slice(self.v, jnp.swapaxes(v, 1, 2).astype(self.v.dtype), start)
    return KVCache(ck, cv, self.index + k.shape[1])


def causal_padding_mask(
  attention_mask: jax.Array, *, q_offset: jax.Array | int = 0, num_queries: int | None = None,
  sliding_window: int | None = None,
) -> jax.Array:
  """Causal AND key-padding mask, optionally banded to a sliding window.

  attention_mask: int/bool[B, S] (1 = real key). Queries are positions q_offset .. q_offset+T-1 of the
  key axis (T = num_queries, default S). Returns bool[B, 1, T, S]: query i may attend key j iff
  j <= i, key j is real and, with `sliding_window` W, i - W < j (W keys including i itself; the
  convention of transformers' `sliding_window_overlay` used by Mistral and Qwen2). i and j index the
  (padded, cached) key buffer as in HF; with left padding a row's real tokens are contiguous, so i - j
  is their true distance.
  """
  s = attention_mask.shape[-1]
  t = s if num_queries is None else num_queries
  q_pos = jnp.arange(t)[:, None] + q_offset
  k_pos = jnp.arange(s)[None, :]
  allowed = k_pos <= q_pos  # [T, S]
  if sliding_window is not None:
    allowed = allowed & (k_pos > q_pos - sliding_window)
  return allowed[None, None] & attention_mask.astype(bool)[:, None, None, :]


def alibi_slopes(num_heads: int, bias_max: float = 8.0) -> np.ndarray:
  """ALiBi slopes float32[num_heads] by MPT's `gen_slopes` rule (= HF `build_mpt_alibi_tensor`).

  With n = num_heads rounded up to a power of two, m_h = 2^(-h * bias_max / n) for h = 1..n; the
  paper's slopes are the case bias_max = 8. When num_heads is not a power of two MPT keeps the
  odd-indexed slopes first, then the even-indexed ones, and takes the first num_heads (the paper's
  code mixes in slopes of the next power of two instead; MPT checkpoints were trained with MPT's
  rule).
  """
  n = 2 ** math.ceil(math.log2(num_heads))
  slopes = 2.0 ** (-np.arange(1, n + 1, dtype=np.float64) * (bias_max / n))
  if n != num_heads:
    slopes = np.concatenate([slopes[1::2], slopes[::2]])[:num_heads]
  return slopes.astype(np.float32)


def alibi_bias(slopes: jax.Array | np.ndarray, num_queries: int, num_keys: int, *,
               q_offset: jax.Array | int = 0) -> jax.Array:
  """ALiBi bias float32[1, N, T, S]: m_h * (j - i), queries i = q_offset .. q_offset+T-1, keys
  j = 0 .. S-1.

  Indices are positions in the (padded, cached) key buffer, as in MPT and HF: with left padding the
  real tokens of a row are contiguous, so j - i is their true distance. Softmax is shift-invariant
  per row, so this equals MPT's m_h * (j - (S-1)) form; the relative form keeps the values near the
  diagonal small, which matters when the bias is added in low precision.
  """
  q_pos = jnp.arange(num_queries, dtype=jnp.int32)[:, None] + q_offset
  k_pos = jnp.arange(num_keys, dtype=jnp.int32)[None, :]
  rel = (k_pos - q_pos).astype(jnp.float32)  # [T, S]
  return (jnp.asarray(slopes, jnp.float32)[:, None, None] * rel)[None]


def dot_product_attention(
  q: jax.Array,
  k: jax.Array,
  v: jax.Array,
  mask: jax.Array | None = None,
  *,
  bias: jax.Array | None = None,
  scale: float | None = None,
  return_probs: bool = False,
  kv_heads_first: bool = False,
) -> tuple[jax.Array, jax.Array | None]:
  """q: float[B, T, N, D]; k, v: float[B, S, K, D], or float[B, K, S, D] with `kv_heads_first` (the
  KVCache layout), N % K == 0 (GQA); mask: bool[B, 1|N, T, S]; bias: float[B|1, N, T, S] added to
  the logits (ALiBi). Returns (out float[B, T, N, D], probs float32[B, N, T, S] or None). Masked
  logits get the most negative finite value (never -inf, so all-masked rows stay finite; callers
  zero them where the method says so).

  softmax(s * q k^T + bias) v, computed heads-first: q, k, v are transposed to [B, K, (G,) T|S, D]
  before the two dots, so each (B, K) pair is one contiguous matmul; without probs the row sums
  divide the output instead of the probabilities (exp(l - max l) v / sum exp(l - max l), the same
  function; the max is a constant to autodiff, as softmax is shift-invariant). On a 2-core Zen 4,
  a CLIP ViT-S layer's attention ([8, 197, 6, 64] with projections) runs forward in 5.0 ms this way
  and 8.3 ms through `jax.nn.dot_product_attention` (forward + backward 17.6 vs 21.8 ms).
  """
  b, t, n, d = q.shape
  kh = k.shape[1 if kv_heads_first else 2]
  if n % kh:
    raise ValueError(f"query heads ({n}) must be a multiple of key/value heads ({kh})")
  scale = d**-0.5 if scale is None else scale
  g = n // kh
  qh = q.reshape(b, t, kh, g, d).transpose(0, 2, 3, 1, 4)  # [B, K, G, T, D]
  kh_, vh = (k, v) if kv_heads_first else (k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3))
  logits = jnp.einsum("bkgtd,bksd->bkgts", qh, kh_, preferred_element_type=jnp.float32) * scale
  s = logits.shape[-1]
  logits = logits.reshape(b, n, t, s)
  if bias is not None:
    logits = logits + bias.astype(jnp.float32)
  if mask is not None:
    logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
  if return_probs:
    probs = jax.nn.softmax(logits, axis=-1)
    weights, denom = probs, None
  else:
    e = jnp.exp(logits - jax.lax.stop_gradient(logits.max(-1, keepdims=True)))
    weights, denom = e, e.sum(-1, keepdims=True)
  out = jnp.einsum("bkgts,bksd->bkgtd", weights.reshape(b, kh, g, t, s).astype(v.dtype), vh)
  out = out.reshape(b, n, t, d)
  if denom is not None:
    out = out / denom
  out = out.astype(q.dtype).transpose(0, 2, 1, 3)
  return out, probs if return_probs else None


class SelfAttention(nn.Module):
  """Multi-head self-attention with grouped KV heads and optional RoPE.

  Params: q: [embed, heads, kv], k/v: [embed, kv_heads, kv], o: [heads, kv, embed]; with `qk_norm`
  also q_norm, k_norm: LayerNorm params [heads * kv] ([kv_heads * kv] for k).
  `clip_qkv` clamps the projected q, k, v to [-c, c]; `qk_norm` then LayerNorms q (and k) over all
  heads' features at once, before the head split (MPT `attn_config.qk_ln`, MosaicGPT `attn_qk_ln`).
  Both act before RoPE and before the KV cache, so the cache holds normalised keys. Pass ALiBi (or
  any additive bias) as `bias: float[B|1, N, T, S]`.
  __call__(x: float[B, T, E], mask: bool[B, 1, T, S], positions: int[B, T], cache: KVCache | None)
    -> (out float[B, T, E], aux) with aux = {"cache": updated cache or None, "probs": float32[B, N, T, S]
    when return_probs}. Without a cache S = T.
  """

  num_heads: int
  head_dim: int
  num_kv_heads: int | None = None
  qkv_bias: bool = False
  out_bias: bool = False
  rope_theta: float | None = 10000.0
  rotary_dim: int | None = None
  qk_norm: bool = False
  qk_norm_eps: float = 1e-5
  qk_norm_bias: bool = True
  clip_qkv: float | None = None
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(
    self,
    x: jax.Array,
    mask: jax.Array | None,
    positions: jax.Array | None = None,
    cache: KVCache | None = None,
    *,
    bias: jax.Array | None = None,
    return_probs: bool = False,
  ) -> tuple[jax.Array, dict]:
    kvh = self.num_kv_heads or self.num_heads
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    q = dense((self.num_heads, self.head_dim), ("embed", "heads", "kv"), use_bias=self.qkv_bias,
              name="q", **kw)(x)
    k = dense((kvh, self.head_dim), ("embed", "kv_heads", "kv"), use_bias=self.qkv_bias, name="k",
              **kw)(x)
    v = dense((kvh, self.head_dim), ("embed", "kv_heads", "kv"), use_bias=self.qkv_bias, name="v",
              **kw)(x)
    # Named for the "save_qkv_proj" remat policy (vlm_jax.layers.scan); a no-op otherwise.
    q, k, v = (checkpoint_name(a, n) for a, n in zip((q, k, v), ("query_proj", "key_proj",
                                                                "value_proj")))
    if self.clip_qkv is not None:
      q, k, v = (jnp.clip(a, -self.clip_qkv, self.clip_qkv) for a in (q, k, v))
    if self.qk_norm:
      norm = dict(epsilon=self.qk_norm_eps, use_bias=self.qk_norm_bias, **kw)
      q = _norm_across_heads(LayerNorm(name="q_norm", **norm), q)
      k = _norm_across_heads(LayerNorm(name="k_norm", **norm), k)
    if self.rope_theta is not None:
      if positions is None:
        offset = 0 if cache is None else cache.index
        positions = jnp.broadcast_to(jnp.arange(x.shape[1]) + offset, x.shape[:2])
      cos, sin = rope_tables(positions, self.rotary_dim or self.head_dim, self.rope_theta)
      q, k = apply_rope_table(q, cos, sin), apply_rope_table(k, cos, sin)
    new_cache = None
    if cache is not None:
      new_cache = cache.update(k, v)
      k, v = new_cache.k.astype(q.dtype), new_cache.v.astype(q.dtype)
    out, probs = dot_product_attention(q, k, v, mask, bias=bias, return_probs=return_probs,
                                       kv_heads_first=cache is not None)
    out = dense(x.shape[-1], ("heads", "kv", "embed"), axis=(-2, -1), use_bias=self.out_bias,
                name="o", **kw)(out)
    return out, {"cache": new_cache, "probs": probs}


def _norm_across_heads(norm: nn.Module, x: jax.Array) -> jax.Array:
  """Apply a last-axis norm over the flattened (heads, head_dim) axes.  x: float[B, T, H, D]."""
  return norm(x.reshape(*x.shape[:-2], -1)).reshape(x.shape)
