"""OpenFlamingo checkpoints -> `vlm_jax.models.flamingo`.

An OpenFlamingo model is three sources of weights:
- the HF causal LM (`lm`: its config, and its weights unless the checkpoint holds them),
- the CLIP vision tower (`vision`: an HF CLIP directory, or an open_clip model-config JSON whose weights
  are an open_clip state dict or the checkpoint's `vision_encoder.*` keys),
- the OpenFlamingo checkpoint: the released trainable `checkpoint.pt`, the training wrapper
  `checkpoint_N.pt` (`{"model_state_dict": ...}`), or a full state dict (`.pt` or `.safetensors`).

Checkpoint keys (OpenFlamingo wraps decoder layer i of the LM as `FlamingoLayer(xattn, decoder_layer)`):
  perceiver.latents, perceiver.layers.{j}.0.{norm_media, norm_latents, to_q, to_kv, to_out},
  perceiver.layers.{j}.1.{0 (LN), 1 (up), 3 (down)}, perceiver.norm
  lang_encoder.{layers}.{i}.gated_cross_attn_layer.{attn_gate, ff_gate, attn.norm, attn.to_q,
      attn.to_kv, attn.to_out, ff.0, ff.1, ff.3}
  lang_encoder.{layers}.{i}.decoder_layer.<HF layer key>, lang_encoder.<other HF LM key>
  vision_encoder.<open_clip VisionTransformer key>
where {layers} is the LM's decoder-layer list (`model.layers` for LLaMA, `gpt_neox.layers`,
`transformer.blocks` for MPT). `to_kv` rows [0:inner] are K and [inner:2 inner] are V. The aliases
`lang_encoder.old_decoder_blocks.*` and `lang_encoder.gated_cross_attn_layers.*` name the same modules
again and are skipped. Checkpoint keys win over the LM directory's (the trained, resized embedding).

Unlike OpenFlamingo's `load_state_dict(strict=False)`, every key must be used and every param found: a
checkpoint for another LM or another `cross_attn_every_n_layers` fails naming the keys.
"""

import os
import re
from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import linen as nn
from jax.sharding import Mesh

from vlm_jax.convert import clip as clip_conv
from vlm_jax.convert import hf
from vlm_jax.convert import open_clip as open_clip_conv
from vlm_jax.convert.loading import Part, load_params
from vlm_jax.convert.mapping import Rule, check_keys, identity, layernorm, linear, linear_from_heads, \
  linear_to_heads, prefixed
from vlm_jax.convert.sources import Overlay, Renamed, has_weights, open_state_dict, shape_of
from vlm_jax.data.tokenizer import openflamingo_tokenizer
from vlm_jax.models import flamingo

# HF model_type -> the LM's decoder-layer list, as OpenFlamingo's `decoder_layers_attr_name`.
DECODER_LAYERS = {"llama": "model.layers", "mistral": "model.layers", "gpt_neox": "gpt_neox.layers",
                  "mpt": "transformer.blocks", "mosaic_gpt": "transformer.blocks"}
# transformers >= 5 names some modules differently in memory than on disk, and OpenFlamingo state dicts
# hold in-memory names: {model_type: {in-memory key: on-disk key}}.
IN_MEMORY_NAMES = {"gpt_neox": {"lm_head.weight": "embed_out.weight"}}
ALIASES = ("lang_encoder.old_decoder_blocks.", "lang_encoder.gated_cross_attn_layers.")
DIM_HEAD = 64  # OpenFlamingo's PerceiverAttention / MaskedCrossAttention default, used by every release


def kv_to_heads(ours_k: str, ours_v: str, theirs: str, heads: int, head_dim: int) -> Rule:
  """Fused `to_kv` [2 * heads * head_dim, in] (K rows, then V rows) <-> two kernels [in, heads, head_dim]."""
  inner = heads * head_dim

  def to_ours(w):
    return tuple(p.T.reshape(w.shape[1], heads, head_dim) for p in (w[:inner], w[inner:]))

  def to_theirs(k, v):
    return np.concatenate([x.reshape(x.shape[0], inner).T for x in (k, v)], axis=0)
  return Rule((ours_k, ours_v), theirs, to_ours, to_theirs)


def _feed_forward(ours: str, theirs: str) -> list[Rule]:
  """OpenFlamingo `FeedForward` = Sequential(LayerNorm, Linear, GELU, Linear): indices 0, 1, 3."""
  return [*layernorm(f"{ours}/norm", f"{theirs}.0"), linear(f"{ours}/up/kernel", f"{theirs}.1.weight"),
          linear(f"{ours}/down/kernel", f"{theirs}.3.weight")]


def resampler_rules(kw: dict[str, Any]) -> list[Rule]:
  h, dh = kw["heads"], kw["dim_head"]
  out = [identity("resampler/latents", "perceiver.latents"),
         *layernorm("resampler/norm", "perceiver.norm")]
  if kw.get("max_num_media"):
    out.append(identity("resampler/media_time_embs", "perceiver.media_time_embs"))
  if kw.get("max_num_frames"):
    out.append(identity("resampler/frame_embs", "perceiver.frame_embs"))
  for j in range(kw["depth"]):
    o, t = f"resampler/layers_{j}", f"perceiver.layers.{j}"
    out += [
      *layernorm(f"{o}/attn/norm_media", f"{t}.0.norm_media"),
      *layernorm(f"{o}/attn/norm_latents", f"{t}.0.norm_latents"),
      linear_to_heads(f"{o}/attn/q/kernel", f"{t}.0.to_q.weight", h, dh),
      kv_to_heads(f"{o}/attn/k/kernel", f"{o}/attn/v/kernel", f"{t}.0.to_kv.weight", h, dh),
      linear_from_heads(f"{o}/attn/o/kernel", f"{t}.0.to_out.weight", h, dh),
      *_feed_forward(f"{o}/ff", f"{t}.1"),
    ]
  return out


def xattn_rules(layer_ids: list[int], kw: dict[str, Any], layers_attr: str) -> list[Rule]:
  h, dh = kw["heads"], kw["dim_head"]
  out = []
  for i in layer_ids:
    o, t = f"xattn_{i}", f"lang_encoder.{layers_attr}.{i}.gated_cross_attn_layer"
    out += [
      identity(f"{o}/attn_gate", f"{t}.attn_gate"), identity(f"{o}/ff_gate", f"{t}.ff_gate"),
      *layernorm(f"{o}/attn/norm", f"{t}.attn.norm"),
      linear_to_heads(f"{o}/attn/q/kernel", f"{t}.attn.to_q.weight", h, dh),
      kv_to_heads(f"{o}/attn/k/kernel", f"{o}/attn/v/kernel", f"{t}.attn.to_kv.weight", h, dh),
      linear_from_heads(f"{o}/attn/o/kernel", f"{t}.attn.to_out.weight", h, dh),
      *_feed_forward(f"{o}/ff", f"{t}.ff"),
    ]
  return out


class _Keys:
  """Sorts OpenFlamingo checkpoint keys into the part that consumes them."""

  def __init__(self, model_type: str):
    self.renames = IN_MEMORY_NAMES.get(model_type, {})
    a = re.escape(DECODER_LAYERS[model_type])
    self.xattn = re.compile(rf"^lang_encoder\.{a}\.\d+\.gated_cross_attn_layer\.")
    self.layer = re.compile(rf"^lang_encoder\.({a}\.\d+\.)decoder_layer\.")

  def lm_key(self, key: str) -> str | None:
    """Checkpoint key -> the HF LM key, or None when the key is not an LM weight."""
    if key.startswith(ALIASES) or self.xattn.match(key) or not key.startswith("lang_encoder."):
      return None
    m = self.layer.match(key)
    if m:
      return m.group(1) + key[m.end():]
    key = key[len("lang_encoder."):]
    return self.renames.get(key, key)

  def flamingo_key(self, key: str) -> str | None:
    return key if key.startswith("perceiver.") or self.xattn.match(key) else None


def _vision(vision: str, ckpt, vision_weights: str | None, name: str):
  """-> (ViT kwargs, Part with `vision/` rules)."""
  has_ckpt_vision = any(k.startswith("vision_encoder.") for k in ckpt)
  if os.path.isdir(vision):
    kw = clip_conv.model_kwargs_from_hf(hf.read_hf_config(vision), f"{vision}/config.json")
    if not has_ckpt_vision:
      src = open_state_dict(vision)
      rules = clip_conv.rules(kw, clip_conv.key_prefix(src))
      return kw, Part(src, prefixed(rules, ours="vision/"), vision, clip_conv.ignore)
  elif vision.endswith(".json"):
    kw = open_clip_conv.model_kwargs(open_clip_conv.read_config(vision), vision)
    if not has_ckpt_vision:
      if vision_weights is None:
        raise ValueError(f"{vision} is an open_clip config; its weights must come from `vision_weights` "
                         f"(an open_clip state dict) or from vision_encoder.* keys in {name}, which has none")
      src = open_state_dict(vision_weights)
      p = open_clip_conv.key_prefix(src)
      return kw, Part(src, prefixed(open_clip_conv.rules(kw, p), ours="vision/"), vision_weights,
                      open_clip_conv.ignore_for(p))
  else:
    raise ValueError(f"vision={vision!r}: expected an HF CLIP directory or an open_clip model-config .json")
  src = Renamed(ckpt, lambda k: k if k.startswith("vision_encoder.") else None)
  rules = prefixed(open_clip_conv.rules(kw, "vision_encoder."), ours="vision/")
  return kw, Part(src, rules, f"{name} (vision_encoder.*)", open_clip_conv.ignore_for("vision_encoder."))


def load_openflamingo(checkpoint: str, *, lm: str, vision: str, cross_attn_every_n_layers: int,
                      vision_tokens: str = "pre_ln_post", vision_weights: str | None = None,
                      media_token_id: int | None = None, mesh: Mesh | None = None,
                      logical_rules=None, scan_layers: bool = False,
                      param_dtype=None) -> tuple[nn.Module, Any]:
  """An OpenFlamingo checkpoint -> (flamingo.Model, params).

  `model.apply({"params": params}, vision_x, lang_x, attention_mask)` with vision_x float
  [B, T_img, H, W, 3] (CLIP-normalised, NHWC) and lang_x int32[B, T_txt] returns the logits of
  OpenFlamingo's forward first.

  Args:
    checkpoint: `checkpoint.pt`, `checkpoint_N.pt` or a full state dict (`.pt` / `.safetensors`).
    lm: HF LM directory (config.json; weights unless the checkpoint has them; tokenizer.json, from which
      the `<image>` id is derived the way OpenFlamingo adds it, unless `media_token_id` is given).
    vision: HF CLIP directory or open_clip model-config JSON (see the module docstring).
    cross_attn_every_n_layers: 1 for OF-3B, 2 for OF-4B, 4 for OF-9B.
    vision_tokens: "pre_ln_post" (what the released models were trained with) or "post_ln_post"
      (what open_clip >= 2.23 returns).
    vision_weights: open_clip state dict for a JSON `vision` when the checkpoint has no vision_encoder.*.
    mesh, logical_rules: place each param directly on its shards.
    scan_layers: build the ViT and the LM (with its xattn blocks) scanned, params stacked
      (`vlm_jax.models.flamingo`; the LM's layer count must be a multiple of
      cross_attn_every_n_layers).
    param_dtype: e.g. "bfloat16": floating params cast to it tensor by tensor while loading (the
      frozen towers' storage dtype; training upcasts what it trains, see `frozen_param_dtype`).
  """
  ckpt = open_state_dict(checkpoint)
  hf_cfg = hf.read_hf_config(lm)
  model_type = hf_cfg.get("model_type")
  conv, family = hf.family(hf_cfg, lm)
  if model_type not in DECODER_LAYERS:
    raise ValueError(f"{lm}/config.json: model_type {model_type!r} has no known OpenFlamingo "
                     f"decoder-layer path; known: {sorted(DECODER_LAYERS)}")
  keys = _Keys(model_type)
  stray = [k for k in ckpt if not (k.startswith(("vision_encoder.",) + ALIASES)
                                   or keys.lm_key(k) or keys.flamingo_key(k))]
  if stray:
    raise ValueError(f"{checkpoint}: keys that are not part of an OpenFlamingo model with a "
                     f"{model_type} LM: {stray[:8]}")

  # LM: the checkpoint's lang_encoder weights over the LM directory's.
  lm_kw = conv.model_kwargs_from_hf(hf_cfg, f"{lm}/config.json")
  lm_src = Overlay(Renamed(ckpt, keys.lm_key), open_state_dict(lm) if has_weights(lm) else None)
  lm_rules = conv.rules(lm_kw)
  embed_key = next(r.theirs for r in lm_rules if r.ours == "embed/embedding")
  if embed_key in lm_src:  # OpenFlamingo resizes the vocabulary to the tokenizer's length
    lm_kw["vocab_size"] = shape_of(lm_src, embed_key)[0]
    lm_rules = conv.rules(lm_kw)
  lm_part = Part(lm_src, prefixed(lm_rules, ours="lm/"), f"{checkpoint} + {lm}", conv.ignore)
  check_keys(lm_part.source, lm_part.rules, source_name=lm_part.name, ignore=lm_part.ignore)

  vision_kw, vision_part = _vision(vision, ckpt, vision_weights, checkpoint)

  latents = "perceiver.latents"
  if latents not in ckpt:
    raise KeyError(f"{checkpoint}: missing tensor {latents!r}; not an OpenFlamingo checkpoint?")
  depth = 1 + max(int(m.group(1)) for k in ckpt if (m := re.match(r"perceiver\.layers\.(\d+)\.", k)))
  q_rows = shape_of(ckpt, "perceiver.layers.0.0.to_q.weight")[0]
  resampler_kw = dict(depth=depth, heads=q_rows // DIM_HEAD, dim_head=DIM_HEAD,
                      num_latents=shape_of(ckpt, latents)[0], ff_mult=4, act="gelu")
  xattn_kw = dict(heads=8, dim_head=DIM_HEAD, ff_mult=4, act="gelu")
  layer_ids = flamingo.xattn_layer_ids(lm_kw["num_layers"], cross_attn_every_n_layers)
  flamingo_rules = resampler_rules(resampler_kw) + xattn_rules(layer_ids, xattn_kw,
                                                               DECODER_LAYERS[model_type])
  flamingo_part = Part(Renamed(ckpt, keys.flamingo_key), flamingo_rules, checkpoint)

  if media_token_id is None:
    _, ids = openflamingo_tokenizer(lm)
    media_token_id = ids["media"]
  scan = dict(scan_layers=True) if scan_layers else {}
  model = flamingo.Model(
    vision={**vision_kw, **scan}, lm={**lm_kw, **scan}, resampler=resampler_kw, xattn=xattn_kw,
    lm_family=family.__name__.rsplit(".", 1)[-1], cross_attn_every_n_layers=cross_attn_every_n_layers,
    media_token_id=media_token_id, vision_tokens=vision_tokens)
  s = vision_kw["image_size"]
  example = [jnp.zeros((1, 1, s, s, 3), jnp.float32), jnp.zeros((1, 1), jnp.int32)]
  params = load_params(model, example, [lm_part, vision_part, flamingo_part], mesh=mesh,
                       logical_rules=logical_rules, param_dtype=param_dtype)
  return model, params
