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

Scale (`vlm_jax.layers.scan`): `scan_layers` runs the L decoder layers as one `nn.scan` (params
`layers/...` with a leading layer axis instead of `layers_{i}/...`;
`vlm_jax.param_paths.stack_layers` converts, and the converters do it on load); `remat_policy`
rematerialises each layer. Scanned, the per-layer `before_layer` hook cannot run (the loop body is
traced once); Flamingo passes a `LayerGroup` instead: the scan then runs over groups of `size`
layers with the group's block before its last layer, which is OpenFlamingo's placement when
size = cross_attn_every_n_layers. Scanned KV caches are one `KVCache` with a leading layer axis
(`init_caches` builds it); grouped, each group takes its `size` rows of it.

Packed rows (`vlm_jax.data.packing`): `segment_ids` int[B, T] (0 = padding) makes self-attention
block-diagonal causal and restarts the default positions at 0 in each segment, so every packed
example gets the logits it gets alone (`vlm_jax.layers.segments`). Training only: not with `caches`.

`last_logits_only=True` returns logits float32[B, 1, V] of the last position only (aux["hidden"]
too): what a generation prefill needs, without the [B, T, V] matmul (XLA does not push the slice
into it: 3.2 GB and 0.8 TFLOP for 8 x 2000 tokens at V = 50k).
"""

import dataclasses
import functools
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from vlm_jax.layers.attention import KVCache, SelfAttention, causal_padding_mask
from vlm_jax.layers.embeddings import token_embed
from vlm_jax.layers.linear import dense
from vlm_jax.layers.mlp import SwiGlu
from vlm_jax.layers.norms import RMSNorm
from vlm_jax.layers.scan import check_remat_policy, remat_call, scan_layers
from vlm_jax.layers.segments import segment_mask, segment_positions
from vlm_jax.param_paths import LayerStack

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


@dataclasses.dataclass(frozen=True)
class LayerGroup:
  """A block run before the last decoder layer of every group of `size` layers (scanned models).

  block: makes the block module, `block(name=...)`; it is called as
  `block(h, *args, *xs_g) -> (h, aux)`, where `args` are the same for every group and `xs_g` is
  row g of each array (pytree) in `xs`, whose leading axis is the group [G, ...] (Flamingo's
  cached media keys/values). `collect` names entries of the block's aux to return stacked
  [G, ...] in the LM's aux["group_outputs"]. Its params are stacked one row per group under
  `layers/<name>` (default "xattn").
  """

  size: int
  block: Callable[..., nn.Module]
  args: tuple = ()
  name: str = "xattn"
  xs: tuple = ()
  collect: tuple[str, ...] = ()


class _Group(nn.Module):
  """One scan step of a grouped stack: `size` decoder layers `layers_{j}` with `block` before the
  last one.  x: float[B, T, D], caches: this group's KVCache rows (leaves [size, ...]) or None,
  block_xs: this group's rows of `LayerGroup.xs` -> (x, (probs float32[size, B, N, T, S] or None,
  new caches or None, {name: the block's aux[name]} for the names in `collect`))."""

  layer: Callable[..., nn.Module]
  block: Callable[..., nn.Module]
  block_name: str
  size: int
  remat_policy: str
  return_probs: bool
  collect: tuple[str, ...] = ()

  @nn.compact
  def __call__(self, x, mask, window_mask, positions, block_args, windowed, caches, block_xs):
    probs, new_caches, collected = [], [], {}
    for j in range(self.size):
      if j == self.size - 1:
        x, baux = remat_call(self.block(name=self.block_name), self.remat_policy, x, *block_args,
                             *block_xs, scanned=True)
        collected = {k: baux[k] for k in self.collect}
      cache = None if caches is None else jax.tree.map(lambda a, j=j: a[j], caches)
      x, aux = remat_call(self.layer(name=f"layers_{j}"), self.remat_policy, x,
                          _layer_mask(mask, window_mask, windowed[j]), positions, cache,
                          scanned=True, return_probs=self.return_probs)
      probs.append(aux["probs"])
      new_caches.append(aux["cache"])
    stacked = None if caches is None else jax.tree.map(lambda *a: jnp.stack(a), *new_caches)
    return x, (jnp.stack(probs) if self.return_probs else None, stacked, collected)


def _layer_mask(mask, window_mask, windowed):
  """The mask of one layer: `windowed` is a Python bool (unrolled loop) or a traced one (scan)."""
  if window_mask is None or windowed is False:
    return mask
  if windowed is True:
    return window_mask
  return jnp.where(windowed, window_mask, mask)


def _is_box(x) -> bool:
  return isinstance(x, nn.meta.AxisMetadata)


def _raw(x):
  """A leaf's array: boxed (`nn.LogicallyPartitioned`, at init) or bare (at apply). No sharding
  constraint on the way: the values are only being regrouped."""
  if isinstance(x, nn.Partitioned):
    return x.value
  return x.unbox() if _is_box(x) else x


def _map_boxed(fn, tree):
  """fn over the arrays of a param tree whose leaves may be boxed; boxes keep their logical names
  (the rank never changes here)."""
  return jax.tree.map(lambda x: x.replace_boxed(fn(_raw(x))) if _is_box(x) else fn(x), tree,
                      is_leaf=_is_box)


def _group_params_in(stored: dict, size: int, block_name: str) -> dict:
  """Stored {decoder params [L, ...], block: [G, ...]} -> _Group's view {layers_j: [G, ...], block}.
  Layer l = g * size + j, so the decoder rows read as the scanned LM's `layers/...` [L, ...]."""
  if not stored:
    return stored
  stored = dict(stored)
  inner = {block_name: stored.pop(block_name)}
  for j in range(size):
    inner[f"layers_{j}"] = _map_boxed(lambda a, j=j: a.reshape(-1, size, *a.shape[1:])[:, j],
                                      stored)
  return inner


def _group_params_out(inner: dict, size: int, block_name: str) -> dict:
  """Inverse of `_group_params_in`."""
  if not inner:
    return inner
  inner = dict(inner)
  stored = {block_name: inner.pop(block_name)}
  layers = [inner.pop(f"layers_{j}") for j in range(size)]
  if block_name in layers[0]:
    raise ValueError(f"the decoder layer has a submodule named {block_name!r}, the name of the "
                     "group block")

  def interleave(*rows):  # row g * size + j of the result is rows[j][g]
    v = jnp.stack([_raw(r) for r in rows], axis=1)
    v = v.reshape(-1, *v.shape[2:])
    return rows[0].replace_boxed(v) if _is_box(rows[0]) else v
  stored.update(jax.tree.map(interleave, *layers, is_leaf=_is_box))
  return stored


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
  scan_layers: bool = False
  remat_policy: str = "none"
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  def __post_init__(self):
    check_remat_policy(self.remat_policy, "lm.remat_policy")
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
    caches: Sequence[KVCache] | KVCache | None = None,
    before_layer: Callable[[int, jax.Array], jax.Array] | None = None,
    return_probs: bool = False,
    embed_hook: Callable[[jax.Array], jax.Array] | None = None,
    segment_ids: jax.Array | None = None,
    layer_group: LayerGroup | None = None,
    last_logits_only: bool = False,
  ) -> tuple[jax.Array, dict]:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    b, t = input_ids.shape
    group_outputs = None
    if segment_ids is not None and caches is not None:
      raise ValueError("segment_ids (packed training rows) cannot be combined with KV caches")
    self._check_scan_args(caches, before_layer, layer_group)
    offset = 0 if caches is None else _cache_index(caches)
    if attention_mask is None:
      s = t if caches is None else _cache_length(caches)
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
    layer = self.decoder_layer(kw)
    if not self.scan_layers:
      new_caches, probs = [], []
      for i in range(self.num_layers):
        if before_layer is not None:
          x = before_layer(i, x)
        x, aux = remat_call(layer(name=f"layers_{i}"), self.remat_policy, x,
                            _layer_mask(mask, window_mask, i >= self.full_attention_layers),
                            positions, None if caches is None else caches[i],
                            return_probs=return_probs)
        new_caches.append(aux["cache"])
        probs.append(aux["probs"])
    elif layer_group is None:
      x, new_caches, probs = self._scan(layer, x, mask, window_mask, positions, caches,
                                        return_probs)
    else:
      x, probs, new_caches, group_outputs = self._scan_groups(
        layer, layer_group, x, mask, window_mask, positions, caches, return_probs)
    x = self.final_norm(kw)(x)
    if last_logits_only:  # a prefill needs one row of logits; XLA would compute [B, T, V] and slice
      x = x[:, -1:]
    if self.tie_embeddings:
      logits = embed.attend(x)
    else:
      logits = dense(self.vocab_size, ("embed", "vocab"), name="lm_head", **kw)(x)
    aux = {"hidden": x, "caches": None if caches is None else new_caches,
           "attention_probs": probs if return_probs else None, "group_outputs": group_outputs}
    return logits.astype(jnp.float32), aux

  def _check_scan_args(self, caches, before_layer, layer_group) -> None:
    if self.scan_layers:
      if before_layer is not None:
        raise ValueError("lm.scan_layers: a per-layer before_layer hook cannot run inside the "
                         "scan; pass a LayerGroup (see the module docstring)")
      if caches is not None and not isinstance(caches, KVCache):
        raise ValueError("lm.scan_layers: caches must be the one stacked KVCache "
                         "(k: [L, B, K, S, D]) that init_caches builds for a scanned model, not a "
                         "list per layer")
      if layer_group is not None:
        if layer_group.size < 1 or self.num_layers % layer_group.size:
          raise ValueError(f"lm.scan_layers: num_layers ({self.num_layers}) must be a multiple of "
                           f"the layer group size ({layer_group.size}) to scan over groups")
    else:
      if layer_group is not None:
        raise ValueError("a LayerGroup needs lm.scan_layers=True; unscanned, use before_layer")
      if isinstance(caches, KVCache):
        raise ValueError("caches: a stacked KVCache is for lm.scan_layers=True; this model takes a "
                         "list with one KVCache per layer (init_caches)")

  def _window_flags(self, window_mask) -> jax.Array | bool:
    """Per-layer "use the window mask" flags bool[L] for the scan, or a constant for all layers."""
    if window_mask is None:
      return False
    if not self.full_attention_layers:
      return True
    return jnp.arange(self.num_layers) >= self.full_attention_layers

  def _scan(self, layer, x, mask, window_mask, positions, caches, return_probs):
    flags = self._window_flags(window_mask)
    per_layer_flags = not isinstance(flags, bool)

    def body(mdl, h, mask, window_mask, positions, xs):
      windowed, cache = xs
      h, aux = remat_call(mdl, self.remat_policy, h,
                          _layer_mask(mask, window_mask, windowed if per_layer_flags else flags),
                          positions, cache, scanned=True, return_probs=return_probs)
      return h, (aux["cache"], aux["probs"])

    xs = (flags if per_layer_flags else jnp.zeros((self.num_layers,), bool), caches)
    x, (new_caches, probs) = scan_layers(body, layer(name="layers"), x, xs, length=self.num_layers,
                                         broadcast=(mask, window_mask, positions))
    return x, new_caches, list(probs) if return_probs else []

  def _scan_groups(self, layer, group: LayerGroup, x, mask, window_mask, positions, caches,
                   return_probs):
    n = group.size
    num_groups = self.num_layers // n
    flags = self._window_flags(window_mask)
    flags = jnp.broadcast_to(jnp.asarray(flags), (self.num_layers,)).reshape(num_groups, n)
    # The stacked caches [L, ...] as [G, size, ...]: layer l = g * size + j, as the params.
    grouped = None if caches is None else jax.tree.map(
      lambda a: a.reshape(num_groups, n, *a.shape[1:]), caches)
    scanned = nn.scan(_Group, variable_axes={"params": 0}, split_rngs={"params": True},
                      in_axes=(nn.broadcast,) * 4 + (0, 0, 0), length=num_groups,
                      metadata_params={nn.PARTITION_NAME: "layers"})
    # Stored as the plain scanned LM's `layers/...` [L, ...] plus `layers/<block>/...` [G, ...],
    # so a scanned LM's params drop into a scanned Flamingo (and per-layer ones stack the same way).
    stacked = nn.map_variables(
      scanned, "params",
      lambda v: {c: _group_params_in(p, n, group.name) for c, p in v.items()},
      lambda v: {c: _group_params_out(p, n, group.name) for c, p in v.items()},
      init=self.is_initializing())
    x, (probs, new_caches, collected) = stacked(
      layer, group.block, group.name, n, self.remat_policy, return_probs, tuple(group.collect),
      name="layers")(x, mask, window_mask, positions, group.args, flags, grouped, tuple(group.xs))
    probs = list(probs.reshape(self.num_layers, *probs.shape[2:])) if return_probs else []
    if new_caches is not None:
      new_caches = jax.tree.map(lambda a: a.reshape(self.num_layers, *a.shape[2:]), new_caches)
    return x, probs, new_caches, collected

  # The two places where decoder families differ; subclasses (vlm_jax.models.gpt_neox) override them.
  @nn.nowrap
  def decoder_layer(self, kw: dict) -> Callable[..., nn.Module]:
    """The decoder layer's constructor: `decoder_layer(kw)(name=...)` makes one layer."""
    return functools.partial(DecoderLayer, self.num_heads, self.kv_heads, self.dim_per_head,
                             self.mlp_dim, self.rope_theta, self.norm_eps, self.qkv_bias, **kw)

  def final_norm(self, kw: dict) -> nn.Module:
    return RMSNorm(self.norm_eps, name="norm", **kw)

  @nn.nowrap
  def layer_stacks(self) -> tuple[LayerStack, ...]:
    """The scanned stacks of this model's param layout (none unless scan_layers)."""
    if not self.scan_layers:
      return ()
    return (LayerStack("layers_{i}", "layers", tuple(range(self.num_layers))),)

  @nn.nowrap
  def init_caches(self, batch: int, max_len: int, dtype=None) -> list[KVCache] | KVCache:
    """Empty KV caches for generation: one per layer, k/v float[B, K, max_len, D]; with scan_layers
    one stacked KVCache, k/v float[L, B, K, max_len, D] and index int32[L]. dtype defaults to the
    model's compute dtype."""
    one = KVCache.zeros(batch, max_len, self.kv_heads, self.dim_per_head,
                        self.dtype if dtype is None else dtype)
    if self.scan_layers:
      return jax.tree.map(lambda a: jnp.broadcast_to(a, (self.num_layers, *a.shape)), one)
    return [one for _ in range(self.num_layers)]


def _cache_index(caches: Sequence[KVCache] | KVCache) -> jax.Array:
  return caches.index[0] if isinstance(caches, KVCache) else caches[0].index


def _cache_length(caches: Sequence[KVCache] | KVCache) -> int:
  return caches.max_len if isinstance(caches, KVCache) else caches[0].max_len
