"""LLaMA with FlexAttention's hierarchical layers (the LM of LLaVA-FlexAttn; reference/flex_inf.md
§1.3-1.6, the equations in `vlm_jax.layers.hierarchical`).

Layers 0 .. flex_start-1 are plain LLaMA layers; from layer flex_start-1 on, every layer reads one
query row's attention over the low-resolution image keys and selects HR blocks for the NEXT layer;
layers flex_start .. L-1 attend to the HR tokens their predecessor selected as extra keys/values:

    k_hd = RoPE_HR(W'_K f_HR[sel]),  v_hd = W'_V f_HR[sel]       (f_HR: projector output, not normed)

with separate projections `attn/k_hd`, `attn/v_hd` in every layer (the released checkpoint has them
in all 32; only layers >= flex_start use them; `hd_from_kv` initialises them as copies of k / v, as
the authors' prepare_model.py did). The 32-layer Vicuna-7B uses flex_start = 9 (the code's
hard-coded split: layer 8 selects first, layers 9..31 are FlexAttention layers).

Static shapes: each layer gathers `flex_budget` blocks (default all) of (hr_grid / flex_blocks)^2 HR tokens per
sample (81 = all possible blocks, the authors' set exactly; fewer = the best-scoring ones), and only
the selecting row (`select_row`, default the last token: the authors' inference path) sees them.
Param paths equal `llama.Model`'s plus `layers_{i}/attn/{k_hd,v_hd}`, so a LLaVA-1.5 LM loads as is.
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from vlm_jax.layers import hierarchical as hl
from vlm_jax.layers.attention import causal_padding_mask
from vlm_jax.layers.embeddings import token_embed
from vlm_jax.layers.linear import dense
from vlm_jax.layers.mlp import SwiGlu
from vlm_jax.layers.norms import RMSNorm
from vlm_jax.layers.rope import apply_rope_table, rope_tables
from vlm_jax.models import llama

Dtype = Any
_ACT = ("activation_batch", "activation_length", "activation_embed")


class FlexAttention(nn.Module):
  """LLaMA self-attention (q, k, v, o as `layers.attention.SelfAttention`) plus HR keys/values.

  __call__(x [B, T, E], bias [B, 1, T, T] additive, positions [B, T], hr: [B, M, E] gathered HR
  features or None, hr_cos/hr_sin [B, M, Dh], hd_valid bool[B, T, M], select_row int[B] or None,
  image_start int[B], margins float[B, G, G] | None) -> (out [B, T, E], selection or None):
  selection = (selected bool[B, blocks^2], score float[B, blocks^2]) from row `select_row`'s
  plain attention over the `num_image_tokens` image keys.
  """

  num_heads: int
  num_kv_heads: int
  head_dim: int
  rope_theta: float
  qkv_bias: bool = False
  num_image_tokens: int = 576
  threshold: float = 48.0
  blocks: int = 9
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, bias, positions, hr, hr_cos, hr_sin, hd_valid, select_row, image_start,
               margins, alpha, cache=None, hr_kv=None, train_rows=None):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    kv_shape, kv_axes = (self.num_kv_heads, self.head_dim), ("embed", "kv_heads", "kv")
    q = dense((self.num_heads, self.head_dim), ("embed", "heads", "kv"), use_bias=self.qkv_bias,
              name="q", **kw)(x)
    k = dense(kv_shape, kv_axes, use_bias=self.qkv_bias, name="k", **kw)(x)
    v = dense(kv_shape, kv_axes, use_bias=self.qkv_bias, name="v", **kw)(x)
    cos, sin = rope_tables(positions, self.head_dim, self.rope_theta)
    q, k = apply_rope_table(q, cos, sin), apply_rope_table(k, cos, sin)
    new_cache = None
    if cache is not None:  # append this call's keys/values (as layers.attention.SelfAttention)
      new_cache = cache.update(k, v)
      # hierarchical_attention takes [B, S, K, D] (the cache is [B, K, S, D]).
      k, v = (jnp.swapaxes(a, 1, 2).astype(q.dtype) for a in (new_cache.k, new_cache.v))
    k_hd_proj = dense(kv_shape, kv_axes, use_bias=self.qkv_bias, name="k_hd", **kw)
    v_hd_proj = dense(kv_shape, kv_axes, use_bias=self.qkv_bias, name="v_hd", **kw)
    if hr_kv is not None:  # decoding: the prefill's HR keys/values, cached
      k_hd, v_hd = hr_kv
    elif hr is None:  # a plain layer (or init): no HR keys; the projections still own params
      if self.is_initializing():
        k_hd_proj(x[:, :1]), v_hd_proj(x[:, :1])
      m = 1
      k_hd = jnp.zeros((x.shape[0], m) + kv_shape, q.dtype)
      v_hd, hd_valid = k_hd, jnp.zeros((x.shape[0], x.shape[1], m), bool)
    else:
      k_hd = apply_rope_table(k_hd_proj(hr), hr_cos, hr_sin)
      v_hd = v_hd_proj(hr)
    out = hl.hierarchical_attention(q, k, v, bias, k_hd, v_hd, hd_valid, alpha)
    out = dense(x.shape[-1], ("heads", "kv", "embed"), axis=(-2, -1), name="o", **kw)(out)
    selection = None
    if train_rows is not None:  # training path: every row's own selection (only answer rows use it)
      attn = hl.image_attention_rows(q, k, bias[:, 0], image_start, self.num_image_tokens)
      selection = hl.select_blocks(attn, threshold=self.threshold, blocks=self.blocks,
                                   margins=None if margins is None else margins[:, None])
    elif select_row is not None:
      q_row = jnp.take_along_axis(q, select_row[:, None, None, None], axis=1)[:, 0]
      bias_row = jnp.take_along_axis(bias[:, 0], select_row[:, None, None], axis=1)[:, 0]
      attn = hl.image_attention_row(q_row, k, bias_row, image_start, self.num_image_tokens)
      selection = hl.select_blocks(attn, threshold=self.threshold, blocks=self.blocks,
                                   margins=margins)
    return out, selection, new_cache, (k_hd, v_hd)


class FlexDecoderLayer(nn.Module):
  """llama.DecoderLayer with `FlexAttention`: (x, ...) -> (x, selection)."""

  num_heads: int
  num_kv_heads: int
  head_dim: int
  mlp_dim: int
  rope_theta: float
  norm_eps: float
  qkv_bias: bool = False
  num_image_tokens: int = 576
  threshold: float = 48.0
  blocks: int = 9
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, bias, positions, hr=None, hr_cos=None, hr_sin=None, hd_valid=None,
               select_row=None, image_start=None, margins=None, alpha=1.0, cache=None,
               hr_kv=None, train_rows=None):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    h = RMSNorm(self.norm_eps, name="input_norm", **kw)(x)
    h, selection, new_cache, kv_hd = FlexAttention(
      self.num_heads, self.num_kv_heads, self.head_dim, self.rope_theta, self.qkv_bias,
      self.num_image_tokens, self.threshold, self.blocks, name="attn", **kw)(
      h, bias, positions, hr, hr_cos, hr_sin, hd_valid, select_row, image_start, margins, alpha,
      cache, hr_kv, train_rows)
    x = x + h
    h = RMSNorm(self.norm_eps, name="post_attn_norm", **kw)(x)
    x = x + SwiGlu(self.mlp_dim, name="mlp", **kw)(h)
    return nn.with_logical_constraint(x, _ACT), (selection, new_cache, kv_hd)


class Model(llama.Model):
  """LLaMA whose layers >= flex_start attend to selected HR tokens.

  __call__(input_ids int32[B, T], attention_mask int[B, T], *, hr float[B, hr_grid^2, E] (the HR
  features: projector output of the 3 x 3 crops, stitched row-major), hr_cos / hr_sin
  float[B, hr_grid^2, Dh] (their RoPE tables), image_start int[B] (first LR image token),
  margins float[B, G, G] (`hierarchical.margin_mask`, or None), select_row int[B] (default: the
  last position of each row), alpha, embed_hook, train_rows bool[B, T]) -> (logits float32[B, T, V],
  aux) with aux["selections"]: per FlexAttention layer the (block index [B, budget], valid
  [B, budget]) it used.

  Training path (`train_rows`, the rows that predict answer tokens; reference/flex_inf.md 1.4-1.5):
  as the authors' `self.training` branch, every FlexAttention layer keeps all hr_grid^2 HR keys and
  each train row sees the blocks selected from ITS OWN attention row in the previous layer
  (`hd_valid[b, t] = train_rows[b, t] & blocks(sel[b, t])`); other rows see no HR key. Then
  aux["selections"] holds (selected bool[B, T, blocks^2], train_rows) per layer.
  Without `hr` every layer is plain LLaMA (equal to `llama.Model` on the same params).
  """

  flex_start: int = 9
  flex_threshold: float = 48.0
  flex_blocks: int = 9
  flex_budget: int | None = None   # HR blocks per row and layer; None = all flex_blocks^2
  hr_grid: int = 72
  num_image_tokens: int = 576
  hr_rows: str = "select_row"   # or "from_select_row" (see __call__)

  def __post_init__(self):
    if self.hr_rows not in ("select_row", "from_select_row"):
      raise ValueError(f"lm.hr_rows {self.hr_rows!r} is not 'select_row' or 'from_select_row'")
    if self.scan_layers or self.sliding_window is not None:
      raise ValueError("llama_flex: scan_layers and sliding_window are not supported")
    if not 1 <= self.flex_start < self.num_layers:
      raise ValueError(f"lm.flex_start ({self.flex_start}) must be in [1, num_layers="
                       f"{self.num_layers}): layer flex_start-1 selects for layer flex_start")
    if not 1 <= self.budget <= self.flex_blocks ** 2 or self.hr_grid % self.flex_blocks:
      raise ValueError(f"lm.flex_budget ({self.budget}) must be in [1, flex_blocks^2] and "
                       f"hr_grid ({self.hr_grid}) a multiple of flex_blocks ({self.flex_blocks})")
    super().__post_init__()

  @property
  def budget(self) -> int:
    return self.flex_blocks ** 2 if self.flex_budget is None else self.flex_budget

  @nn.nowrap
  def decoder_layer(self, kw: dict):
    return functools.partial(FlexDecoderLayer, self.num_heads, self.kv_heads, self.dim_per_head,
                             self.mlp_dim, self.rope_theta, self.norm_eps, self.qkv_bias,
                             self.num_image_tokens, self.flex_threshold, self.flex_blocks, **kw)

  @nn.compact
  def __call__(self, input_ids, attention_mask=None, positions=None, caches=None, *, hr=None,
               hr_cos=None, hr_sin=None, image_start=None, margins=None, select_row=None,
               alpha=1.0, embed_hook=None, last_logits_only=False, hr_cache=None, train_rows=None):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    b, t = input_ids.shape
    offset = 0 if caches is None else caches[0].index
    if attention_mask is None:
      attention_mask = jnp.ones((b, t if caches is None else caches[0].max_len), jnp.int32)
    if positions is None:
      positions = jnp.broadcast_to(jnp.arange(t) + offset, (b, t))
    mask = causal_padding_mask(attention_mask, q_offset=offset, num_queries=t)
    bias = jnp.where(mask, 0.0, hl.NEG_INF).astype(jnp.float32)
    if select_row is None:
      select_row = jnp.full((b,), t - 1, jnp.int32)
    embed = token_embed(self.vocab_size, self.hidden_size, name="embed", **kw)
    x = embed(input_ids)
    if embed_hook is not None:
      x = embed_hook(x)
    x = nn.with_logical_constraint(x, _ACT)
    layer = self.decoder_layer(kw)
    selection, used, new_caches, new_hr_cache = None, [], [], []
    # Which rows see the HR keys: the selecting row ("select_row", the authors' inference) or every
    # row from it on ("from_select_row": what decoding with the prefill's selection amounts to).
    rows = jnp.arange(t)[None, :]
    row_sees = (rows >= select_row[:, None]) if self.hr_rows == "from_select_row" else (
      rows == select_row[:, None])
    tokens_per_block = (self.hr_grid // self.flex_blocks) ** 2
    for i in range(self.num_layers):
      args = dict(cache=None if caches is None else caches[i])
      if hr is not None and train_rows is not None and i >= self.flex_start:
        used.append((selection[0], train_rows))
        seen = hl.blocks_to_tokens(selection[0], self.flex_blocks, self.hr_grid)   # [B, T, M]
        slot_valid = jnp.ones(hr.shape[:2], bool)
        args.update(hr=hr, hr_cos=hr_cos, hr_sin=hr_sin, alpha=alpha,
                    hd_valid=seen & train_rows[:, :, None].astype(bool))
      elif hr is not None and i >= self.flex_start:
        index, valid = hl.budget_blocks(*selection, self.budget)
        used.append((index, valid))
        slot_valid = jnp.repeat(valid, tokens_per_block, axis=1)              # [B, M]
        args.update(hr=hl.gather_blocks(hr, index, self.flex_blocks),
                    hr_cos=hl.gather_blocks(hr_cos, index, self.flex_blocks),
                    hr_sin=hl.gather_blocks(hr_sin, index, self.flex_blocks),
                    hd_valid=row_sees[:, :, None] & slot_valid[:, None, :], alpha=alpha)
      elif hr_cache is not None and i >= self.flex_start:  # decoding: every new row sees them
        k_hd, v_hd, slot_valid = hr_cache[i - self.flex_start]
        args.update(hr_kv=(k_hd, v_hd), alpha=alpha,
                    hd_valid=jnp.broadcast_to(slot_valid[:, None, :], (b, t, slot_valid.shape[1])))
      emit = hr is not None and i >= self.flex_start - 1 and i < self.num_layers - 1
      if emit:
        args.update(image_start=image_start, margins=margins,
                    **({"select_row": select_row} if train_rows is None else
                       {"train_rows": train_rows}))
      x, (sel, cache, kv_hd) = layer(name=f"layers_{i}")(x, bias, positions, **args)
      new_caches.append(cache)
      if hr is not None and i >= self.flex_start:
        new_hr_cache.append((*kv_hd, slot_valid))
      selection = sel if emit else selection
    x = self.final_norm(kw)(x)
    if last_logits_only:
      x = x[:, -1:]
    if self.tie_embeddings:
      logits = embed.attend(x)
    else:
      logits = dense(self.vocab_size, ("embed", "vocab"), name="lm_head", **kw)(x)
    aux = {"hidden": x, "selections": used, "caches": None if caches is None else new_caches,
           "hr_cache": new_hr_cache if hr is not None else hr_cache}
    return logits.astype(jnp.float32), aux


def hd_from_kv(params: dict) -> dict:
  """A copy of `params` (an LM's tree: layers_{i}/attn/...) with k_hd / v_hd set to copies of k / v
  (W'_K = W_K, W'_V = W_V: the FlexAttention starting point from a trained LLaVA-1.5)."""
  out = {}
  for name, sub in params.items():
    if isinstance(sub, dict) and "attn" in sub and "k" in sub["attn"]:
      attn = dict(sub["attn"], k_hd=sub["attn"]["k"], v_hd=sub["attn"]["v"])
      out[name] = dict(sub, attn=attn)
    else:
      out[name] = sub
  return out
