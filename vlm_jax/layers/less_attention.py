"""Less-Attention ViT layers (Zhang, Liu, Lin, He, CVPR 2024, "You Only Need Less Attention at Each
Stage in Vision Transformers"): vanilla-attention (VA) blocks that expose their attention scores,
less-attention (LA) blocks that re-parameterise the previous layer's scores instead of computing
Q K^T, the attention residual (AR) that carries the last scores of one stage into the first VA
layer of the next, and the diagonality-preserving (DP) loss.

Each stage m runs L^VA_m VA layers, then LA layers up to L_m:

  VA:  A^l = Q^l K^l^T / sqrt(d) (+ AR(A^last_{m-1}) in the stage's first layer)   (Eqs. 4, 6)
       Z^l = Softmax(A^l) V^l
  LA:  A^l = Psi( Theta(A^{l-1})^T )^T,   Z^l = Softmax(A^l) V^l,   L^VA_m < l <= L_m  (Eq. 5)
  AR:  A^init_m = LS( Conv1x1( DWConv(A^last_{m-1}) ) )                              (Eq. 6)
  L = CE + sum over LA layers of L_DP                                               (Eqs. 8-9)

Fidelity (sources and confidence tags in `reference/lavit_api.md`, Part 1):
- A is the PRE-softmax score matrix everywhere: VA layers return their scores (the paper names
  "the attention scores before Softmax"), LA layers transform scores and apply the softmax after the
  transform, and what an LA layer passes on to the next LA layer is its transformed scores, never
  the probabilities (applying Theta/Psi to probabilities and a second softmax would be a different
  recursion).
- Theta and Psi are linear layers y = x W + b on the last axis (flax layout; torch's Linear stores
  W^T), one pair per LA layer, kernels initialised to the identity and biases to zero (the notes'
  proposal; a random init would scramble token identity at step 0). Theta mixes the key axis of
  each row, the transpose makes Psi mix the query axis. Shared across heads (and batch) by default,
  as "a linear layer R^{N x N}" applied to [B, H, N, N] reads; `per_head_transform=True` gives each
  head its own [N, N] pair.
- LA layers compute only the V and output projections. (A summary of the paper says LA "only
  computes query embeddings"; Eq. 5 multiplies the transformed attention with V, so V it is.)
- AR: the paper applies a depthwise conv (kernel 2, stride 2) to the [H', N', N'] map and states
  N_m = N_{m-1} / 2, while a 2 x 2 token merge gives N_m = N_{m-1} / 4. `mode="paper_flat"` is the
  literal reading (conv on the flattened N' x N' map, output N'/s); `mode="grid"` (default, the
  notes' proposal) pools each s x s block of the query grid and of the key grid, so the map lands
  on the next stage's tokens (row-major h x w order, N = N' / s^2). LayerScale init 1e-2.
- DP loss: `mode="paper_literal"` is the formula as recalled (signed, summed; its diagonal term is
  minimised by a SMALL diagonal, the opposite of the stated intent); `mode="hinge"` (default) is the
  notes' normalised variant on softmax probabilities. The paper's loss weight was not retrieved.

Scores, probabilities and the Theta/Psi transforms are float32 whatever the compute dtype: small
changes of the logits move the softmax a lot. Every N x N tensor costs B*H*N^2*4 bytes.
"""

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from vlm_jax.layers.linear import dense
from vlm_jax.layers.mlp import Mlp
from vlm_jax.layers.norms import LayerNorm

Dtype = Any
AR_MODES = ("grid", "paper_flat")
DP_MODES = ("hinge", "paper_literal")
_SCORES_AXES = ("activation_batch", None, "activation_length", None)
_TOKENS_AXES = ("activation_batch", "activation_length", "activation_embed")


def _identity_init(key, shape, dtype=jnp.float32):
  """An identity [N, N] kernel, or a stack [..., N, N] of them (per-head Theta/Psi)."""
  del key
  return jnp.broadcast_to(jnp.eye(shape[-1], dtype=dtype), shape)


def _attend(probs: jax.Array, v: jax.Array) -> jax.Array:
  """probs: float32[B, H, N, N]; v: float[B, N, H, Dh] -> float[B, N, H, Dh]."""
  return jnp.einsum("bhij,bjhd->bihd", probs.astype(v.dtype), v)


def _check_scores(scores: jax.Array, b: int, h: int, n: int, what: str) -> None:
  if scores.shape != (b, h, n, n):
    raise ValueError(f"less_attention: {what} must be float[B, H, N, N] = {(b, h, n, n)} for "
                     f"input tokens [B, N, D] = [{b}, {n}, .] and num_heads {h}, got {scores.shape}")


class VanillaAttention(nn.Module):
  """Multi-head self-attention that also returns its pre-softmax scores (a VA layer's attention).

    A = Q K^T / sqrt(d) + R,   Z = Softmax(A) V W_O

  R is the attention residual of the stage's first layer (`AttentionResidual`), zero elsewhere.
  x: float[B, N, D]; residual: float[B, H, N, N] or None ->
  (out float[B, N, D], {"scores": float32[B, H, N, N] = A, "probs": float32[B, H, N, N]}).
  Params: q, k, v: [embed, heads, kv]; o: [heads, kv, embed] (the `SelfAttention` layout).
  """

  num_heads: int
  qkv_bias: bool = True
  out_bias: bool = True
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, residual: jax.Array | None = None) -> tuple[jax.Array, dict]:
    b, n, d = x.shape
    if d % self.num_heads:
      raise ValueError(f"less_attention: width {d} must be divisible by num_heads {self.num_heads}")
    dh = d // self.num_heads
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    q, k, v = (dense((self.num_heads, dh), ("embed", "heads", "kv"), use_bias=self.qkv_bias,
                     name=name, **kw)(x) for name in ("q", "k", "v"))
    scores = jnp.einsum("bihd,bjhd->bhij", q, k, preferred_element_type=jnp.float32) * dh**-0.5
    if residual is not None:
      _check_scores(residual, b, self.num_heads, n, "the attention residual")
      scores = scores + residual.astype(jnp.float32)
    scores = nn.with_logical_constraint(scores, _SCORES_AXES)
    probs = jax.nn.softmax(scores, axis=-1)
    out = dense(d, ("heads", "kv", "embed"), axis=(-2, -1), use_bias=self.out_bias, name="o",
                **kw)(_attend(probs, v))
    return out, {"scores": scores, "probs": probs}


class ScoreTransform(nn.Module):
  """A learned N x N linear map on the last axis of scores: y = x W + b (Theta or Psi of Eq. 5).

  x: float[B, H, N, N] -> float32[B, H, N, N]. Params: kernel [N, N], bias [N] (shared over heads),
  or [H, N, N], [H, N] with `per_head`. Init: identity kernel, zero bias.
  """

  per_head: bool = False
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    h, n = x.shape[1], x.shape[-1]
    lead, names = ((h,), ("heads",)) if self.per_head else ((), ())
    kernel = self.param("kernel", nn.with_logical_partitioning(_identity_init, names + (None, None)),
                        lead + (n, n), self.param_dtype).astype(jnp.float32)
    bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros_init(),
                                                           names + (None,)),
                      lead + (n,), self.param_dtype).astype(jnp.float32)
    x = x.astype(jnp.float32)
    if self.per_head:
      return jnp.einsum("bhij,hjk->bhik", x, kernel) + bias[None, :, None, :]
    return jnp.einsum("bhij,jk->bhik", x, kernel) + bias


class LessAttention(nn.Module):
  """A less-attention layer: the previous layer's scores, transformed, replace Q K^T (Eq. 5).

    A^l = Psi( Theta(A^{l-1})^T )^T,   Z = Softmax(A^l) V W_O

  No Q/K projections. With Theta = Psi = I (their init) this is exactly Softmax(A^{l-1}) V W_O.
  x: float[B, N, D]; prev_scores: float[B, H, N, N], the PRE-softmax scores of the previous VA or
  LA layer -> (out float[B, N, D], {"scores": float32 A^l (feed this to the next LA layer),
  "probs": float32 Softmax(A^l)}). Params: theta, psi (`ScoreTransform`), v, o.
  `reuse_scores=True` skips Theta/Psi (A^l = A^{l-1}, the identity transform) and leaves their
  params untouched, so the layer runs at a token count other than its params' N (a model's
  variable-resolution fallback); Theta/Psi must then come from an init at the params' N.
  """

  num_heads: int
  per_head_transform: bool = False
  qkv_bias: bool = True
  out_bias: bool = True
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  reuse_scores: bool = False

  @nn.compact
  def __call__(self, x: jax.Array, prev_scores: jax.Array) -> tuple[jax.Array, dict]:
    b, n, d = x.shape
    if d % self.num_heads:
      raise ValueError(f"less_attention: width {d} must be divisible by num_heads {self.num_heads}")
    # Theta/Psi are N x N: the token count is fixed by the params (no variable resolution here).
    _check_scores(prev_scores, b, self.num_heads, n, "prev_scores")
    dh = d // self.num_heads
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    transform = dict(per_head=self.per_head_transform, param_dtype=self.param_dtype)
    if self.reuse_scores:
      scores = prev_scores.astype(jnp.float32)
    else:
      t = ScoreTransform(name="theta", **transform)(prev_scores)           # mixes keys of each row
      scores = ScoreTransform(name="psi", **transform)(t.swapaxes(-1, -2)).swapaxes(-1, -2)  # queries
    scores = nn.with_logical_constraint(scores, _SCORES_AXES)
    probs = jax.nn.softmax(scores, axis=-1)  # after the transform, as Eq. 5 places it
    v = dense((self.num_heads, dh), ("embed", "heads", "kv"), use_bias=self.qkv_bias, name="v",
              **kw)(x)
    out = dense(d, ("heads", "kv", "embed"), axis=(-2, -1), use_bias=self.out_bias, name="o",
                **kw)(_attend(probs, v))
    return out, {"scores": scores, "probs": probs}


def _encoder_block(mdl: nn.Module, attn: nn.Module, x: jax.Array,
                   scores_in: jax.Array | None) -> tuple[jax.Array, dict]:
  """Pre-LN block body, x + Attn(LN_1(x), scores_in) then x + MLP(LN_2(x)), called from the compact
  method of `mdl` (so norm1/norm2/mlp are its children, beside `attn`)."""
  kw = dict(dtype=mdl.dtype, param_dtype=mdl.param_dtype)
  h, aux = attn(LayerNorm(mdl.norm_eps, name="norm1", **kw)(x), scores_in)
  x = x + h
  h = LayerNorm(mdl.norm_eps, name="norm2", **kw)(x)
  x = x + Mlp(mdl.mlp_dim, mdl.act, name="mlp", **kw)(h)
  return nn.with_logical_constraint(x, _TOKENS_AXES), aux


class VABlock(nn.Module):
  """Vanilla-attention encoder block (pre-LN, as `models.vit.EncoderLayer`).

  x: float[B, N, D]; residual: float[B, H, N, N] | None (the AR output, first block of a stage only)
  -> (float[B, N, D], {"scores", "probs"} as `VanillaAttention`). Params: norm1, attn, norm2, mlp.
  """

  num_heads: int
  mlp_dim: int
  act: str = "gelu"
  norm_eps: float = 1e-6
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, residual: jax.Array | None = None) -> tuple[jax.Array, dict]:
    attn = VanillaAttention(self.num_heads, name="attn", dtype=self.dtype,
                            param_dtype=self.param_dtype)
    return _encoder_block(self, attn, x, residual)


class LABlock(nn.Module):
  """Less-attention encoder block.  x: float[B, N, D]; prev_scores: float[B, H, N, N] (pre-softmax)
  -> (float[B, N, D], {"scores", "probs"} as `LessAttention`). Params: norm1, attn, norm2, mlp.
  `reuse_scores`: as `LessAttention`'s (skip Theta/Psi)."""

  num_heads: int
  mlp_dim: int
  act: str = "gelu"
  norm_eps: float = 1e-6
  per_head_transform: bool = False
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  reuse_scores: bool = False

  @nn.compact
  def __call__(self, x: jax.Array, prev_scores: jax.Array) -> tuple[jax.Array, dict]:
    attn = LessAttention(self.num_heads, self.per_head_transform, name="attn", dtype=self.dtype,
                         param_dtype=self.param_dtype, reuse_scores=self.reuse_scores)
    return _encoder_block(self, attn, x, prev_scores)


class AttentionResidual(nn.Module):
  """Downsample the last scores of stage m-1 onto stage m's tokens (Eq. 6).

    R = LS( Conv1x1( DWConv(A^last_{m-1}) ) ),   added to the first VA layer's Q K^T / sqrt(d)

  DWConv is depthwise over the H' heads, kernel = stride = `stride`, kernel init 1/s^2 (an average
  pool, so R starts as pooled logits) and zero bias. `mode`:
  - "grid" (default): tokens are a row-major h' x w' grid (`prev_grid`, default square); the same
    s x s kernel pools the query grid and the key grid, out[I, J] = sum k_a k_c A[s I + a, s J + c]
    over grid offsets a, c. N = N' / s^2 (the next stage's 2 x 2 merge); the shared kernel keeps a
    symmetric map symmetric and (bias aside) a map that is block-diagonal over the merged
    s x s patches diagonal.
  - "paper_flat": the literal reading, a 2-D depthwise conv on the flattened N' x N' map,
    N = N' / s (the paper's N_m = N_{m-1} / 2); neighbouring flattened indices are horizontal runs
    of tokens, not spatial blocks.
  Conv1x1 mixes heads H' -> `num_heads` (with bias); LayerScale gamma: [num_heads], init
  `layerscale_init`. prev_scores: float[B, H', N', N'] -> float32[B, num_heads, N, N].
  """

  num_heads: int
  mode: str = "grid"
  stride: int = 2
  prev_grid: tuple[int, int] | None = None
  layerscale_init: float = 1e-2
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, prev_scores: jax.Array) -> jax.Array:
    if self.mode not in AR_MODES:
      raise ValueError(f"AttentionResidual.mode must be one of {AR_MODES}, got {self.mode!r}")
    b, hp, n_prev, _ = prev_scores.shape
    s = self.stride
    x = prev_scores.astype(jnp.float32)
    dw_init = nn.initializers.constant(1.0 / (s * s))
    dw = self.param("dw_kernel", nn.with_logical_partitioning(dw_init, (None, None, None)),
                    (hp, s, s), self.param_dtype).astype(jnp.float32)
    if self.mode == "grid":
      gh, gw = self._grid(n_prev)
      if gh % s or gw % s:
        raise ValueError(f"AttentionResidual: prev_grid {(gh, gw)} must be divisible by stride {s}")
      x = x.reshape(b, hp, gh // s, s, gw // s, s, gh // s, s, gw // s, s)
      x = jnp.einsum("bhyaxcYAXC,hac,hAC->bhyxYX", x, dw, dw)
      n = (gh // s) * (gw // s)
    else:
      if n_prev % s:
        raise ValueError(f"AttentionResidual: N' = {n_prev} must be divisible by stride {s}")
      n = n_prev // s
      x = jnp.einsum("bhiajc,hac->bhij", x.reshape(b, hp, n, s, n, s), dw)
    dw_bias = self.param("dw_bias", nn.with_logical_partitioning(nn.initializers.zeros_init(),
                                                                 (None,)), (hp,), self.param_dtype)
    x = x.reshape(b, hp, n, n) + dw_bias.astype(jnp.float32)[:, None, None]
    pw = dense(self.num_heads, (None, "heads"), axis=1, use_bias=True, name="pointwise",
               param_dtype=self.param_dtype)(x)                            # [B, N, N, H]
    gamma = self.param("layerscale", nn.with_logical_partitioning(
      nn.initializers.constant(self.layerscale_init), ("heads",)), (self.num_heads,),
      self.param_dtype)
    out = (pw * gamma.astype(jnp.float32)).transpose(0, 3, 1, 2)
    return nn.with_logical_constraint(out, _SCORES_AXES)

  def _grid(self, n_prev: int) -> tuple[int, int]:
    if self.prev_grid is not None:
      gh, gw = self.prev_grid
      if gh * gw != n_prev:
        raise ValueError(f"AttentionResidual.prev_grid {self.prev_grid} has {gh * gw} tokens but "
                         f"the scores have N' = {n_prev}")
      return gh, gw
    side = int(round(n_prev**0.5))
    if side * side != n_prev:
      raise ValueError(f"AttentionResidual: N' = {n_prev} is not square; set prev_grid=(h, w)")
    return side, side


def diagonality_preserving_loss(attn: jax.Array, mode: str = "hinge") -> jax.Array:
  """DP loss of one LA layer's attention.  attn: float[..., N, N] (pass the softmax probabilities
  P, aux["probs"]; any leading batch/head axes) -> float32 scalar.

  - "paper_literal": sum_{..., i, j} |A_ij - A_ji| + sum_{..., i} ((N - 1) A_ii - sum_{j != i} A_ij),
    summed over every axis (its scale grows with B H N^2). Zero for a uniform map; for P = I it is
    B H N (N - 1): as recalled the diagonal term rewards a small diagonal.
  - "hinge": mean |P_ij - P_ji| + mean_i relu(mean_{j != i} P_ij - P_ii), the means over every
    axis: zero for any symmetric map whose diagonal dominates its row's off-diagonal mean.
  """
  if mode not in DP_MODES:
    raise ValueError(f"diagonality_preserving_loss: mode must be one of {DP_MODES}, got {mode!r}")
  if attn.ndim < 2 or attn.shape[-1] != attn.shape[-2]:
    raise ValueError(f"diagonality_preserving_loss: attn must be float[..., N, N], got {attn.shape}")
  a = attn.astype(jnp.float32)
  n = a.shape[-1]
  asym = jnp.abs(a - jnp.swapaxes(a, -1, -2))
  diag = jnp.diagonal(a, axis1=-2, axis2=-1)            # [..., N]
  off = a.sum(-1) - diag                                # sum_{j != i} A_ij
  if mode == "paper_literal":
    return asym.sum() + ((n - 1) * diag - off).sum()
  return asym.mean() + jax.nn.relu(off / (n - 1) - diag).mean()


def dp_loss_over_layers(attns: Sequence[jax.Array], mode: str = "hinge") -> jax.Array:
  """The DP term over all LA layers: the paper's sum for "paper_literal", the mean for "hinge" (the
  notes' L = CE + lambda * mean_layers(...); lambda, 0.1 proposed, is the caller's)."""
  if not attns:
    return jnp.zeros((), jnp.float32)
  losses = jnp.stack([diagonality_preserving_loss(a, mode) for a in attns])
  return losses.sum() if mode == "paper_literal" else losses.mean()
