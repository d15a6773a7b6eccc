r"""Attention Prompting on Image (API; Yu, Yu & Wang, ECCV 2024): query-guided attribution maps
from an auxiliary CLIP or LLaVA, to be multiplied into the image (reference/lavit_api.md Part 2).

CLIP (paper: decomposing the CLS token over the patches that feed it). In block L' (0-based), with
x = Z^{L'} the block's input [B, N, D], N = 1 + G^2, h = LN_1(x) and the CLS query only,

  a^h   = softmax(q^h_cls K^{hT} / sqrt(d))                       float[B, H, N]  (one row per head)
  c_t   = sum_h a^h_t (h_t W_V^h + b_V^h) W_O^h + b_O / N          float[B, N, D]
          (sum_t c_t = [MSA(Z^{L'})]_cls; the paper's eta_t^l)
  Psi^cls_t  = L(c_t) . t_hat,    Psi^comp_t = L(Z^{L'+1}_t) . t_hat       (t >= 1, patches)

with t_hat the L2-normalised text embedding and L the map into the joint space. The authors' code
(Gandelsman et al.'s projected residual stream) takes L(c) = ((c - mu/K) gamma / sigma + beta/K') P
/ ||I|| with the CLS token's final-LN statistics mu, sigma and the image embedding norm ||I||:
every term but (gamma * c) P is a positive per-image scale or a per-image constant, and both maps
are min-max normalised next, so scoring (gamma * c_t) P . t_hat gives exactly their maps and needs no
LN statistics. Only the CLS row of attention is formed ([B, H, N], never N x N), and the patch map
Psi^comp reads the residual stream after block L' (the authors'; the paper says the last layer).
`layers` may list several blocks, whose contributions are summed (the paper's sum over l >= L';
the authors use one block, 22 of ViT-L/14@336's 24: `layers=(-2,)`).

LLaVA: the attention of the newest query over the image keys in decoder layer L_bar, at the prefill
(the last prompt token, predicting the first answer token) and at every decoding step,

  A_m = mean_h softmax_{t in image}(q^h_m k^{hT}_t / sqrt(d))        float[B, P]
  Psi = mean_m A_m  over the rows that produced a token (up to and including a stop token)

computed inside a greedy KV-cached decode: the query of layer L_bar is captured from the model
(flax `capture_intermediates`, no model change), rotated at its position, and dotted with the image
span of that layer's cache. Softmax over the image keys only (renormalised within the image), as
the authors' hook does. Per row; the authors' batched generate also averages steps that a finished
row keeps taking, which batch-1 runs (theirs too) do not have.

Both are jit-compiled for a batch of images (one query per image) and return raw maps; the
post-processing, the resize to the original image and the blend are in `vlm_jax.prompting.maps`.
"""

import dataclasses
import functools
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vlm_jax.layers.rope import apply_rope
from vlm_jax.models import llama, llava, lm_spec
from vlm_jax.prompting import clip_model, maps


@dataclasses.dataclass(frozen=True)
class Preset:
  """Post-processing and blending settings (reference/lavit_api.md 2.7)."""

  enhance_coe: float
  kernel_size: int
  interpolation: str
  gray: float


# The two settings the authors' tutorial publishes (CLIP ViT-L/14@336 layer 22 as auxiliary model).
PRESETS = {"mmvet": Preset(1.0, 3, "bicubic", 0.0),
           "llava_wild": Preset(10.0, 7, "lanczos", 200.0)}
# Without a preset: the authors' argparse defaults (LLaVA's gray level is hard-coded to 200).
DEFAULTS = {"clip": Preset(5.0, 3, "lanczos", 0.0), "llava": Preset(5.0, 3, "lanczos", 200.0)}
DEFAULT_LAYERS = {"clip": -2, "llava": 20}


class _Static:
  """A linen Module as a jit static argument (modules holding dicts do not hash)."""

  def __init__(self, model: nn.Module):
    self.model = model
    self._key = (type(model), repr(model))

  def __hash__(self):
    return hash(self._key)

  def __eq__(self, other):
    return isinstance(other, _Static) and self._key == other._key


def resolve_layer(layer: int, depth: int, what: str) -> int:
  """A Python-style layer index (negative counts from the end) -> 0..depth-1, or a clear error."""
  i = layer + depth if layer < 0 else layer
  if not 0 <= i < depth:
    raise ValueError(f"{what} layer {layer} is out of range for a model with {depth} layers")
  return i


def _layer_params(tower: dict, i: int) -> dict:
  """Layer i's params of an unscanned (`layers_{i}`) or scanned (`layers`, stacked) tower."""
  if f"layers_{i}" in tower:
    return tower[f"layers_{i}"]
  return jax.tree.map(lambda a: a[i], tower["layers"])


def _layer_norm(x: jax.Array, p: dict, eps: float) -> jax.Array:
  mean = x.mean(-1, keepdims=True)
  var = jnp.square(x - mean).mean(-1, keepdims=True)
  return (x - mean) * jax.lax.rsqrt(var + eps) * p["scale"] + p["bias"]


def cls_contributions(x: jax.Array, layer: dict, *, norm_eps: float = 1e-5) -> jax.Array:
  """What each token writes into the CLS position through one ViT block's attention.

  x: float[B, N, D], the block's input (the residual stream; token 0 = CLS); layer: the block's
  params (`norm1`, `attn/{q,k,v,o}`). Returns c float32[B, N, D] with sum_t c_t equal to the block's
  attention output at CLS (b_O shared equally over the N tokens, as the authors). Only the CLS
  query row is formed.
  """
  f32 = functools.partial(jax.tree.map, lambda a: jnp.asarray(a, jnp.float32))
  attn = f32(layer["attn"])
  h = _layer_norm(x.astype(jnp.float32), f32(layer["norm1"]), norm_eps)
  q = jnp.einsum("bd,dhk->bhk", h[:, 0], attn["q"]["kernel"]) + attn["q"]["bias"]
  k = jnp.einsum("bnd,dhk->bnhk", h, attn["k"]["kernel"]) + attn["k"]["bias"]
  v = jnp.einsum("bnd,dhk->bnhk", h, attn["v"]["kernel"]) + attn["v"]["bias"]
  a = jax.nn.softmax(jnp.einsum("bhk,bnhk->bhn", q, k) * q.shape[-1] ** -0.5, axis=-1)
  weighted = jnp.einsum("bhn,bnhk->bnhk", a, v)
  return jnp.einsum("bnhk,hkd->bnd", weighted, attn["o"]["kernel"]) + attn["o"]["bias"] / x.shape[1]


def _grid(scores: jax.Array) -> jax.Array:
  """float[B, G*G] -> float[B, G, G] (row-major, as the patches)."""
  g = int(round(scores.shape[-1] ** 0.5))
  if g * g != scores.shape[-1]:
    raise ValueError(f"{scores.shape[-1]} image tokens do not form a square grid")
  return scores.reshape(*scores.shape[:-1], g, g)


@functools.partial(jax.jit, static_argnames=("key", "layers"))
def _clip_scores(key: _Static, layers: tuple[int, ...], params, images, input_ids):
  model = key.model
  _, text, aux = model.apply({"params": params}, images, input_ids)
  hidden = aux["vision"]["hidden_states"]  # [0] = after LN_pre, [l + 1] = after block l
  vp = params["vision"]
  eps = dict(model.vision or {}).get("norm_eps", 1e-5)
  c = sum(cls_contributions(hidden[i], _layer_params(vp, i), norm_eps=eps) for i in layers)
  t_hat = text.astype(jnp.float32)
  t_hat = t_hat / jnp.linalg.norm(t_hat, axis=-1, keepdims=True)
  gamma = jnp.asarray(vp["post_norm"]["scale"], jnp.float32)
  proj = jnp.asarray(params["visual_projection"]["kernel"], jnp.float32)  # [D, E]

  def score(z):  # ((gamma * z) P) . t_hat over the patch tokens
    psi = jnp.einsum("bnd,de->bne", z[:, 1:] * gamma, proj)
    return _grid(jnp.einsum("bne,be->bn", psi, t_hat))

  return score(c), score(hidden[max(layers) + 1].astype(jnp.float32))


def clip_scores(model: clip_model.Model, params: Any, images: Any, input_ids: Any, *,
                layers: int | Sequence[int] = (-2,)) -> tuple[jax.Array, jax.Array]:
  """Raw CLIP attribution scores for a batch: (Psi_cls, Psi_comp) float32[B, G, G].

  images: float[B, S, S, 3] CLIP-normalised, or uint8 crops (the ViT normalises); input_ids:
  int32[B, T], one tokenized query per image. layers: block index / indices L' (negative from the
  end); the contributions of several blocks are summed and Psi_comp reads the last one's output.
  """
  depth = dict(model.vision or {}).get("depth", 24)
  layers = (layers,) if isinstance(layers, int) else tuple(layers)
  if not layers:
    raise ValueError("layers: give at least one vision block")
  resolved = tuple(sorted({resolve_layer(int(i), depth, "CLIP vision") for i in layers}))
  return _clip_scores(_Static(model), resolved, params, jnp.asarray(images),
                      jnp.asarray(input_ids, jnp.int32))


def clip_attribution(model: clip_model.Model, params: Any, images: Any, input_ids: Any, *,
                     layers: int | Sequence[int] = (-2,), enhance_coe: float = 5.0,
                     kernel_size: int = 3) -> dict[str, jax.Array]:
  """{"map": Psi float32[B, G, G] in [0, 1], "cls", "comp": the raw scores} (see `clip_scores`)."""
  cls, comp = clip_scores(model, params, images, input_ids, layers=layers)
  psi = maps.clip_postprocess(cls, comp, enhance_coe=enhance_coe, kernel_size=kernel_size)
  return {"map": psi, "cls": cls, "comp": comp}


# -------------------------------------------------------------------------------------------------
# LLaVA.


@dataclasses.dataclass(frozen=True)
class _DecodeOpts:
  layer: int
  max_new_tokens: int
  stop_token_ids: tuple[int, ...]
  pad_token_id: int


def image_attention(q: jax.Array, positions: jax.Array, keys: jax.Array, image_slots: jax.Array,
                    *, rope_theta: float) -> jax.Array:
  """The newest query's head-mean attention over the image keys, softmax within the image.

  q: float[B, 1, H, d] before RoPE; positions: int[B, 1]; keys: float[B, K, S, d] (the layer's
  KVCache.k, RoPE applied, GQA K | H); image_slots: int[B, P] cache positions of the image tokens.
  Returns float32[B, P].
  """
  b, _, h, d = q.shape
  kh = keys.shape[1]
  q = apply_rope(q, positions, theta=rope_theta)[:, 0].reshape(b, kh, h // kh, d)
  k = jnp.take_along_axis(keys, image_slots[:, None, :, None], axis=2)  # [B, K, P, d]
  logits = jnp.einsum("bkgd,bkpd->bkgp", q, k, preferred_element_type=jnp.float32) * d**-0.5
  return jax.nn.softmax(logits.reshape(b, h, -1), axis=-1).mean(axis=1)


@functools.partial(jax.jit, static_argnames=("key", "opts"))
def _llava_decode(key: _Static, opts: _DecodeOpts, params, images, input_ids, attention_mask):
  model = key.model
  lm = lm_spec(model.lm_family, model.lm)
  b, t = input_ids.shape
  n, pad, layer = opts.max_new_tokens, opts.pad_token_id, opts.layer
  prompt_mask = attention_mask.astype(jnp.int32)
  # As eval.generate: the mask covers the whole cache, left-padded positions are cumsum - 1.
  mask = jnp.concatenate([prompt_mask, jnp.ones((b, n - 1), jnp.int32)], axis=1)
  positions = jnp.maximum(jnp.cumsum(prompt_mask, axis=-1) - 1, 0)
  first_pos = prompt_mask.sum(-1)
  image_slots = jnp.argsort(input_ids != model.image_token_id, axis=-1, stable=True)[
    :, :model.num_image_tokens]
  where = ("lm", f"layers_{layer}", "attn", "q")

  def forward(imgs, ids, pos, caches):
    (logits, aux), state = model.apply(
      {"params": params}, imgs, ids, mask, positions=pos, caches=caches, last_logits_only=True,
      capture_intermediates=lambda mdl, method: mdl.path == where and method == "__call__",
      mutable=["intermediates"])
    q = state["intermediates"]["lm"][f"layers_{layer}"]["attn"]["q"]["__call__"][0][:, -1:]
    caches = aux["lm"]["caches"]
    row = image_attention(q, pos[:, -1:], caches[layer].k, image_slots, rope_theta=lm.rope_theta)
    return logits[:, -1], caches, row

  def is_stop(tok):
    out = jnp.zeros(tok.shape, bool)
    for s in opts.stop_token_ids:
      out = out | (tok == s)
    return out

  caches = model.init_caches(b, t + n - 1)
  logits, caches, row = forward(images, input_ids, positions, caches)
  tok = jnp.argmax(logits, -1).astype(jnp.int32)
  state = dict(i=jnp.asarray(1, jnp.int32), out=jnp.full((b, n), pad, jnp.int32).at[:, 0].set(tok),
               tok=tok, finished=is_stop(tok), caches=caches, total=row,
               count=jnp.ones((b,), jnp.int32))

  def cond(s):
    return (s["i"] < n) & ~jnp.all(s["finished"])

  def body(s):
    i = s["i"]
    logits, caches, row = forward(None, s["tok"][:, None], (first_pos + i - 1)[:, None],
                                  s["caches"])
    active = ~s["finished"]  # this step produces a token of the row
    tok = jnp.where(active, jnp.argmax(logits, -1).astype(jnp.int32), pad)
    return dict(i=i + 1, out=s["out"].at[:, i].set(tok), tok=tok,
                finished=s["finished"] | is_stop(tok), caches=caches,
                total=s["total"] + jnp.where(active[:, None], row, 0.0),
                count=s["count"] + active.astype(jnp.int32))

  s = jax.lax.while_loop(cond, body, state)
  return _grid(s["total"] / s["count"][:, None]), s["out"], s["count"]


def check_llava(model: nn.Module, input_ids: Any = None) -> None:
  """Refuse what the LLaVA path does not implement, naming the field."""
  if type(model) is not llava.Model:
    raise TypeError(f"LLaVA attribution takes a vlm_jax.models.llava.Model, got "
                    f"{type(model).__module__}.{type(model).__name__}")
  lm = lm_spec(model.lm_family, model.lm)
  if type(lm) is not llama.Model:
    raise NotImplementedError(f"LLaVA attribution needs a LLaMA-family LM (RoPE queries); "
                              f"model.lm_family is {model.lm_family!r}")
  if lm.scan_layers:
    raise NotImplementedError("LLaVA attribution reads one layer's query; load the LM with "
                              "lm.scan_layers=False")
  if model.vision_feature_select_strategy != "default":
    raise NotImplementedError("LLaVA attribution maps the patch tokens onto a grid; "
                              "vision_feature_select_strategy must be 'default' (CLS dropped)")
  if input_ids is not None and not isinstance(input_ids, jax.core.Tracer):
    counts = (np.asarray(input_ids) == model.image_token_id).sum(-1)
    bad = np.flatnonzero(counts != model.num_image_tokens)
    if bad.size:
      raise ValueError(f"rows {bad.tolist()} hold {counts[bad].tolist()} image tokens (id "
                       f"{model.image_token_id}); each prompt needs exactly one image "
                       f"({model.num_image_tokens} tokens)")


def llava_attribution(model: llava.Model, params: Any, images: Any, input_ids: Any,
                      attention_mask: Any, *, layer: int = 20, max_new_tokens: int = 20,
                      stop_token_ids: Sequence[int] = (), pad_token_id: int = 0,
                      enhance_coe: float = 5.0, kernel_size: int = 3) -> dict[str, jax.Array]:
  """LLaVA attribution during greedy decoding, for a batch of left-padded prompts.

  images: float[B, S, S, 3] (one per prompt, CLIP-normalised); input_ids, attention_mask:
  int[B, T], each row holding its image as a run of `num_image_tokens` image tokens and ending
  with a real token. layer: decoder layer L_bar (negative from the end; the authors use 20 of
  LLaVA-1.5-13B's 40). Returns {"attention": raw float32[B, G, G], "map": post-processed [0, 1],
  "tokens": int32[B, max_new_tokens] greedy ids (pad after a stop token), "steps": int32[B] rows
  averaged}.
  """
  check_llava(model, input_ids)
  lm = lm_spec(model.lm_family, model.lm)
  if max_new_tokens < 1:
    raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
  mask = np.asarray(attention_mask)
  if not np.all(mask[:, -1]):
    raise ValueError("prompts must be left-padded (attention_mask[:, -1] == 1)")
  opts = _DecodeOpts(resolve_layer(int(layer), lm.num_layers, "LLaVA LM"), int(max_new_tokens),
                     tuple(int(s) for s in stop_token_ids), int(pad_token_id))
  attn, tokens, steps = _llava_decode(_Static(model), opts, params, jnp.asarray(images),
                                      jnp.asarray(input_ids, jnp.int32), jnp.asarray(mask))
  psi = maps.llava_postprocess(attn, enhance_coe=enhance_coe, kernel_size=kernel_size)
  return {"attention": attn, "map": psi, "tokens": tokens, "steps": steps}
