"""CLIP with both towers (Radford et al. 2021; HF `CLIPModel`), what API's CLIP attribution scores
patches against: the ViT of `vlm_jax.models.vit`, a causal text transformer, and the projections
into the joint space.

  image_embeds = LN_post(ViT(img)[cls]) W_vis                                   float[B, E]
  text: x_0 = E_tok[ids] + E_pos[:T]
        x_l = x_{l-1} + Attn_causal(LN_1(x_{l-1}));  x_l = x_l + MLP(LN_2(x_l))
        pooled = LN_final(x_L)[eos position];  text_embeds = pooled W_txt       float[B, E]

The EOS position follows HF's `CLIPTextTransformer`: with the legacy `eos_token_id == 2` of older
hub configs it is argmax(input_ids) (the EOS is the largest id of CLIP's vocabulary), otherwise the
first position holding `eos_token_id`. The tower is causal, so padding after the EOS never reaches
the pooled row and no padding mask is needed.

The library's vision converter (`vlm_jax.convert.clip`) loads only the vision tower and ignores the
text tower and both projections; `load_hf_clip` here loads all of a `CLIPModel.save_pretrained`
directory (transformers 4.x and 5.x names), with the same strict key checks.
Params: `vision/...` (the ViT's own paths), `text/{embed, pos_embed, layers_{i}, final_norm}`,
`visual_projection/kernel` [Dv, E], `text_projection/kernel` [Dt, E].
"""

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from vlm_jax.convert import clip as clip_conv
from vlm_jax.convert.hf import read_hf_config
from vlm_jax.convert.loading import Part, load_params
from vlm_jax.convert.mapping import (Rule, bias_to_heads, identity, layernorm, linear,
                                     linear_from_heads, linear_to_heads, linear_with_bias,
                                     prefixed)
from vlm_jax.convert.sources import open_state_dict
from vlm_jax.layers.attention import SelfAttention
from vlm_jax.layers.embeddings import learned_positions, token_embed
from vlm_jax.layers.linear import dense
from vlm_jax.layers.mlp import Mlp
from vlm_jax.layers.norms import LayerNorm
from vlm_jax.models import vit

Dtype = Any
# CLIPTextConfig's defaults, for hub configs that leave fields out.
_TEXT_DEFAULTS = dict(vocab_size=49408, hidden_size=512, intermediate_size=2048,
                      num_hidden_layers=12, num_attention_heads=8, max_position_embeddings=77,
                      hidden_act="quick_gelu", layer_norm_eps=1e-5, eos_token_id=2)
_ACTS = {"quick_gelu": "quick_gelu", "gelu": "gelu", "gelu_new": "gelu_tanh",
         "gelu_pytorch_tanh": "gelu_tanh"}


class TextLayer(nn.Module):
  """Pre-LN causal encoder layer (param names as `vit.EncoderLayer`).  x: float[B, T, D]."""

  heads: int
  mlp_dim: int
  act: str
  norm_eps: float
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, mask: jax.Array) -> jax.Array:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    d = x.shape[-1]
    h = LayerNorm(self.norm_eps, name="norm1", **kw)(x)
    h, _ = SelfAttention(self.heads, d // self.heads, qkv_bias=True, out_bias=True, rope_theta=None,
                         name="attn", **kw)(h, mask)
    x = x + h
    h = LayerNorm(self.norm_eps, name="norm2", **kw)(x)
    return x + Mlp(self.mlp_dim, self.act, name="mlp", **kw)(h)


class TextModel(nn.Module):
  """input_ids int32[B, T] (T <= max_len) -> (pooled float[B, D], {"last_hidden_state": [B, T, D]})."""

  vocab_size: int = 49408
  width: int = 512
  depth: int = 12
  heads: int = 8
  mlp_dim: int | None = None
  max_len: int = 77
  act: str = "quick_gelu"
  norm_eps: float = 1e-5
  eos_token_id: int = 2
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, input_ids: jax.Array) -> tuple[jax.Array, dict]:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    b, t = input_ids.shape
    if t > self.max_len:
      raise ValueError(f"text input has {t} tokens; the CLIP text tower takes at most "
                       f"{self.max_len} (truncate as the tokenizer does)")
    x = token_embed(self.vocab_size, self.width, name="embed", **kw)(input_ids)
    pos = learned_positions(self, "pos_embed", self.max_len, self.width, self.param_dtype)
    x = x + pos[:t].astype(self.dtype)
    mask = jnp.tril(jnp.ones((t, t), bool))[None, None]
    layer = functools.partial(TextLayer, self.heads, self.mlp_dim or 4 * self.width, self.act,
                              self.norm_eps, **kw)
    for i in range(self.depth):
      x = layer(name=f"layers_{i}")(x, mask)
    x = LayerNorm(self.norm_eps, name="final_norm", **kw)(x)
    ids = input_ids.astype(jnp.int32)
    where = jnp.argmax(ids, -1) if self.eos_token_id == 2 else jnp.argmax(
      ids == self.eos_token_id, -1)
    pooled = jnp.take_along_axis(x, where[:, None, None], axis=1)[:, 0]
    return pooled, {"last_hidden_state": x}


class Model(nn.Module):
  """(images float[B, S, S, 3] | None, input_ids int32[B, T] | None) -> (image_embeds float[B, E]
  | None, text_embeds float[B, E] | None, aux) with aux = {"vision": the ViT's aux, "text": the text
  tower's aux}. The embeddings are not L2-normalised (HF's get_image/text_features)."""

  vision: Any = None
  text: Any = None
  projection_dim: int = 512
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, images: jax.Array | None, input_ids: jax.Array | None):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    image_embeds = text_embeds = None
    aux = {"vision": None, "text": None}
    if images is not None:
      _, aux["vision"] = vit.Model(name="vision", **kw, **dict(self.vision or {}))(images)
      image_embeds = dense(self.projection_dim, ("embed", None), name="visual_projection",
                           **kw)(aux["vision"]["pooled"])
    if input_ids is not None:
      pooled, aux["text"] = TextModel(name="text", **kw, **dict(self.text or {}))(input_ids)
      text_embeds = dense(self.projection_dim, ("embed", None), name="text_projection", **kw)(pooled)
    return image_embeds, text_embeds, aux


# -------------------------------------------------------------------------------------------------
# HF CLIPModel checkpoints.


def model_kwargs_from_hf(hf: dict, name: str = "config.json") -> dict[str, Any]:
  if hf.get("model_type") != "clip":
    raise ValueError(f"{name}: model_type {hf.get('model_type')!r}; attention prompting needs a "
                     "full CLIPModel (model_type 'clip', both towers and projections), not a "
                     "vision tower alone")
  if "text_config" not in hf:
    raise ValueError(f"{name}: a CLIPModel config without 'text_config'")
  t = {**_TEXT_DEFAULTS, **hf["text_config"]}
  if t["hidden_act"] not in _ACTS:
    raise NotImplementedError(f"{name}: text_config.hidden_act {t['hidden_act']!r} is not one of "
                              f"{sorted(_ACTS)}")
  text = dict(vocab_size=t["vocab_size"], width=t["hidden_size"], depth=t["num_hidden_layers"],
              heads=t["num_attention_heads"], mlp_dim=t["intermediate_size"],
              max_len=t["max_position_embeddings"], act=_ACTS[t["hidden_act"]],
              norm_eps=t["layer_norm_eps"], eos_token_id=int(t["eos_token_id"]))
  return dict(vision=clip_conv.model_kwargs_from_hf(hf, name), text=text,
              projection_dim=int(hf.get("projection_dim", 512)))


def text_rules(kw: dict[str, Any], prefix: str = "text_model.") -> list[Rule]:
  h, d = kw["heads"], kw["width"]
  dh = d // h
  p = prefix
  out = [identity("embed/embedding", f"{p}embeddings.token_embedding.weight"),
         identity("pos_embed", f"{p}embeddings.position_embedding.weight"),
         *layernorm("final_norm", f"{p}final_layer_norm")]
  for i in range(kw["depth"]):
    o, t = f"layers_{i}", f"{p}encoder.layers.{i}"
    for ours, theirs in (("q", "q_proj"), ("k", "k_proj"), ("v", "v_proj")):
      out += [linear_to_heads(f"{o}/attn/{ours}/kernel", f"{t}.self_attn.{theirs}.weight", h, dh),
              bias_to_heads(f"{o}/attn/{ours}/bias", f"{t}.self_attn.{theirs}.bias", h, dh)]
    out += [linear_from_heads(f"{o}/attn/o/kernel", f"{t}.self_attn.out_proj.weight", h, dh),
            identity(f"{o}/attn/o/bias", f"{t}.self_attn.out_proj.bias"),
            *linear_with_bias(f"{o}/mlp/fc1", f"{t}.mlp.fc1"),
            *linear_with_bias(f"{o}/mlp/fc2", f"{t}.mlp.fc2"),
            *layernorm(f"{o}/norm1", f"{t}.layer_norm1"),
            *layernorm(f"{o}/norm2", f"{t}.layer_norm2")]
  return out


def rules(kw: dict[str, Any]) -> list[Rule]:
  """The whole CLIPModel table (HF keys: `vision_model.*`, `text_model.*`, `*_projection`)."""
  return [*prefixed(clip_conv.rules(kw["vision"], "vision_model."), "vision/"),
          *prefixed(text_rules(kw["text"]), "text/"),
          linear("visual_projection/kernel", "visual_projection.weight"),
          linear("text_projection/kernel", "text_projection.weight")]


def ignore(key: str) -> bool:
  """The logit temperature and the position-id buffers are not used by attribution."""
  return key == "logit_scale" or key.endswith("position_ids")


def load_hf_clip(path: str, *, param_dtype=None) -> tuple[Model, Any]:
  """An HF `CLIPModel` directory (`save_pretrained`; config.json + safetensors or
  pytorch_model.bin) -> (Model, params); `model.apply({"params": params}, images_nhwc, input_ids)`
  gives HF's `get_image_features` / `get_text_features` (unnormalised)."""
  hf = read_hf_config(path)
  kwargs = model_kwargs_from_hf(hf, f"{path}/config.json")
  model = Model(**kwargs)
  s = kwargs["vision"]["image_size"]
  params = load_params(model, [jnp.zeros((1, s, s, 3), jnp.float32), jnp.zeros((1, 1), jnp.int32)],
                       [Part(open_state_dict(path), rules(kwargs), path, ignore)],
                       param_dtype=param_dtype)
  return model, params
