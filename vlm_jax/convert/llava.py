"""LLaVA-1.5 checkpoints <-> `vlm_jax.models.llava`: `load_hf_llava`, `save_hf_llava`.

The tables are the LLaMA and CLIP tables (`vlm_jax.convert.llama`, `vlm_jax.convert.clip`) moved
under key prefixes, plus the two projector Linears. Three on-disk layouts, told apart by their
projector keys:

  liuhaotian     LM `model.*`, head `lm_head.`, projector `model.mm_projector.{0,2}`, vision
                 `model.vision_tower.vision_tower.vision_model.*` or a separate HF CLIP directory
  llava-hf       LM `language_model.model.*`, head `language_model.lm_head.`, projector
                 `multi_modal_projector.linear_{1,2}`, vision `vision_tower.[vision_model.]*`
  llava-hf-4.52  LM `model.language_model.*`, head `lm_head.`, projector
                 `model.multi_modal_projector.linear_{1,2}`,
                 vision `model.vision_tower.[vision_model.]*`

`liuhaotian` is `LlavaLlamaForCausalLM` from haotian-liu/LLaVA (config.json: LLaMA fields at top
level plus `mm_*` fields). `llava-hf` is what `LlavaForConditionalGeneration.save_pretrained`
writes, in transformers 5.23 too (it maps its in-memory names back on save); the vision tower has
the inner `vision_model.` in transformers 4.x saves and hub checkpoints, and not in a 5.x save.
`llava-hf-4.52` is the in-memory naming of transformers >= 4.52 (a raw `state_dict()` written as
is).
"""

import dataclasses
import json
import os
from typing import Any, Iterable

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn
from jax.sharding import Mesh

from vlm_jax.convert import clip as clip_conv
from vlm_jax.convert import llama as llama_conv
from vlm_jax.convert.hf import model_kwargs, read_hf_config
from vlm_jax.convert.loading import Part, load_params
from vlm_jax.convert.mapping import (Rule, linear, linear_to_heads, linear_with_bias, prefixed,
                                     to_theirs)
from vlm_jax.convert.safetensors_io import write_checkpoint
from vlm_jax.convert.sources import open_state_dict
from vlm_jax.models import llama, vit
from vlm_jax.models import llava as llava_model
from vlm_jax.models import llava_flex
from vlm_jax.param_paths import flatten, to_per_layer

IMAGE_TOKEN_INDEX = -200  # the original code's marker id for an image (outside the vocabulary)


@dataclasses.dataclass(frozen=True)
class Layout:
  name: str
  lm_prefix: str
  lm_head: str
  projector: tuple[str, str]  # the two Linears, without ".weight" / ".bias"
  vision_root: str  # where an embedded vision tower's keys start

  @property
  def marker(self) -> str:
    return self.projector[0].rsplit(".", 1)[0] + "."


LAYOUTS = (
  Layout("liuhaotian", "model.", "lm_head.", ("model.mm_projector.0", "model.mm_projector.2"),
         "model.vision_tower.vision_tower."),
  Layout("llava-hf", "language_model.model.", "language_model.lm_head.",
         ("multi_modal_projector.linear_1", "multi_modal_projector.linear_2"), "vision_tower."),
  Layout("llava-hf-4.52", "model.language_model.", "lm_head.",
         ("model.multi_modal_projector.linear_1", "model.multi_modal_projector.linear_2"),
         "model.vision_tower."),
)
LAYOUT = {lay.name: lay for lay in LAYOUTS}

# HF config defaults that hub configs rely on by leaving fields out (llava-hf/llava-1.5-7b-hf's
# text_config names only vocab_size, rms_norm_eps and max_position_embeddings).
_LLAMA_DEFAULTS = dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008,
                       num_hidden_layers=32, num_attention_heads=32, rms_norm_eps=1e-6,
                       hidden_act="silu")
_CLIP_VISION_DEFAULTS = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                             num_attention_heads=12, image_size=224, patch_size=32,
                             hidden_act="quick_gelu", layer_norm_eps=1e-5)
# HF ACT2FN name <-> `vlm_jax.layers.mlp` activation name (projector_hidden_act).
_ACTS = {"gelu": "gelu", "gelu_pytorch_tanh": "gelu_tanh", "gelu_new": "gelu_tanh",
         "quick_gelu": "quick_gelu", "relu": "relu", "silu": "silu"}
_ACTS_BACK = {"gelu": "gelu", "gelu_tanh": "gelu_pytorch_tanh", "quick_gelu": "quick_gelu",
              "relu": "relu", "silu": "silu"}


def detect_layout(keys: Iterable[str], name: str) -> Layout:
  """The layout whose projector keys the checkpoint holds; exactly one must match."""
  keys = list(keys)
  found = [lay for lay in LAYOUTS if any(k.startswith(lay.marker) for k in keys)]
  if len(found) != 1:
    what = "no" if not found else "more than one kind of"
    raise ValueError(f"{name}: {what} LLaVA projector keys; expected exactly one of "
                     f"{[lay.marker + '*' for lay in LAYOUTS]} "
                     f"(layouts {[lay.name for lay in LAYOUTS]})")
  return found[0]


def vision_key_prefix(keys: Iterable[str], root: str) -> str | None:
  """Full key prefix of a vision tower stored under `root` (with or without the inner
  `vision_model.`), or None when the checkpoint has no such tower."""
  inside = [k[len(root):] for k in keys if k.startswith(root)]
  return root + clip_conv.key_prefix(inside) if inside else None


def _vision_kwargs(v: dict, name: str) -> dict:
  v = {**_CLIP_VISION_DEFAULTS, **v}
  if v.get("model_type", "clip_vision_model") not in clip_conv.MODEL_TYPES:
    raise NotImplementedError(f"{name}: vision model_type {v['model_type']!r} is not supported "
                              f"(only {clip_conv.MODEL_TYPES})")
  return clip_conv.model_kwargs_from_hf(v, name)


def _lm_kwargs(t: dict, name: str) -> dict:
  model_type = t.get("model_type", "llama")
  if model_type not in llama_conv.MODEL_TYPES:
    raise NotImplementedError(f"{name}: language model_type {model_type!r} is not supported "
                              f"(only {llama_conv.MODEL_TYPES})")
  return llama_conv.model_kwargs_from_hf({**_LLAMA_DEFAULTS, **t}, name)


def _projector_act(act: str, name: str) -> str:
  if act not in _ACTS:
    raise NotImplementedError(f"{name}: projector_hidden_act {act!r} is not one of {sorted(_ACTS)}")
  return _ACTS[act]


def is_llava_hf_config(hf: dict) -> bool:
  return "text_config" in hf or "vision_config" in hf


def model_kwargs_from_hf(hf: dict, name: str = "config.json", vision_hf: dict | None = None,
                         vision_name: str = "vision/config.json") -> dict[str, Any]:
  """LLaVA config.json (llava-hf, or liuhaotian with `vision_hf` the CLIP config) -> kwargs of
  `vlm_jax.models.llava.Model`."""
  if is_llava_hf_config(hf):
    return _llava_hf_kwargs(hf, name)
  if not any(k.startswith("mm_") for k in hf):
    raise ValueError(f"{name}: neither a llava-hf config (text_config / vision_config) nor an "
                     "original LLaVA config (mm_* fields)")
  return _liuhaotian_kwargs(hf, name, vision_hf, vision_name)


def _llava_hf_kwargs(hf: dict, name: str) -> dict[str, Any]:
  layer = hf.get("vision_feature_layer", -2)
  return dict(
    vision=_vision_kwargs(hf.get("vision_config") or {}, f"{name} vision_config"),
    lm=_lm_kwargs(hf.get("text_config") or {}, f"{name} text_config"),
    image_token_id=int(hf.get("image_token_index", hf.get("image_token_id", 32000))),
    vision_feature_layer=layer if isinstance(layer, int) else tuple(layer),
    vision_feature_select_strategy=hf.get("vision_feature_select_strategy", "default"),
    projector_act=_projector_act(hf.get("projector_hidden_act", "gelu"), name),
    projector_bias=bool(hf.get("multimodal_projector_bias", True)))


def _liuhaotian_kwargs(hf: dict, name: str, vision_hf: dict | None, vision_name: str) -> dict:
  projector = hf.get("mm_projector_type", "linear")  # the original builder's default
  if projector not in llava_model.PROJECTOR_TYPES:
    raise NotImplementedError(f"{name}: mm_projector_type {projector!r} is not supported "
                              f"(only {llava_model.PROJECTOR_TYPES})")
  merge = hf.get("mm_patch_merge_type", "flat")
  if merge != "flat" or hf.get("image_aspect_ratio") == "anyres":
    raise NotImplementedError(f"{name}: mm_patch_merge_type {merge!r} / image_aspect_ratio "
                              f"{hf.get('image_aspect_ratio')!r} (LLaVA-NeXT anyres) is not "
                              "supported")
  select = hf.get("mm_vision_select_feature", "patch")
  strategies = {"patch": "default", "cls_patch": "full"}
  if select not in strategies:
    raise NotImplementedError(f"{name}: mm_vision_select_feature {select!r} is not one of "
                              f"{sorted(strategies)}")
  if vision_hf is None:
    raise ValueError(f"{name}: an original LLaVA config does not describe its vision tower "
                     f"(mm_vision_tower={hf.get('mm_vision_tower')!r}); "
                     "pass vision=<HF CLIP directory>")
  vision = _vision_kwargs(clip_conv.vision_config(vision_hf, vision_name), vision_name)
  if hf.get("mm_hidden_size", vision["width"]) != vision["width"]:
    raise ValueError(f"{name}: mm_hidden_size {hf['mm_hidden_size']} but the vision tower in "
                     f"{vision_name} has hidden_size {vision['width']}")
  # LlavaLlamaForCausalLM is a LlamaForCausalLM whose config says model_type "llava"
  # (or "llava_llama").
  lm_type = {"llava": "llama", "llava_llama": "llama", "llava_mistral": "mistral"}.get(
    hf.get("model_type", "llava"), hf.get("model_type"))
  return dict(vision=vision, lm=_lm_kwargs({**hf, "model_type": lm_type}, name),
              image_token_id=IMAGE_TOKEN_INDEX,
              vision_feature_layer=int(hf.get("mm_vision_select_layer", -2)),
              vision_feature_select_strategy=strategies[select], projector_act="gelu",
              projector_bias=True)


def rules(kw: dict[str, Any], layout: Layout, vision_prefix: str | None) -> list[Rule]:
  """The checkpoint's table; `vision_prefix` is where its CLIP keys start (`vision_key_prefix`),
  None when the tower comes from a separate directory (`vision_rules`)."""
  if kw.get("lm_family", "llama") not in ("llama", "llama_flex"):
    raise NotImplementedError(f"LLaVA conversion supports lm_family 'llama' (and 'llama_flex'), "
                              f"not {kw['lm_family']!r}")
  if kw.get("projector_bias", True):
    proj = [*linear_with_bias("projector/fc1", layout.projector[0]),
            *linear_with_bias("projector/fc2", layout.projector[1])]
  else:
    proj = [linear("projector/fc1/kernel", f"{layout.projector[0]}.weight"),
            linear("projector/fc2/kernel", f"{layout.projector[1]}.weight")]
  out = prefixed(llama_conv.rules(kw["lm"], prefix=layout.lm_prefix, head=layout.lm_head), "lm/")
  if kw.get("lm_family") == "llama_flex":
    out += prefixed(flex_rules(kw["lm"], layout.lm_prefix), "lm/")
  out += proj
  if vision_prefix is not None:
    out += vision_rules(kw, vision_prefix)
  return out


def flex_rules(lm: dict[str, Any], prefix: str) -> list[Rule]:
  """LLaVA-FlexAttn's extra projections: `{prefix}layers.{i}.self_attn.{k,v}_proj_hd.weight`
  (senfu/llava-v1.5-7b-flexattn has them in every layer) -> `layers_{i}/attn/{k,v}_hd/kernel`."""
  kvh = lm.get("num_kv_heads") or lm["num_heads"]
  dh = lm.get("head_dim") or lm["hidden_size"] // lm["num_heads"]
  return [linear_to_heads(f"layers_{i}/attn/{p}_hd/kernel",
                          f"{prefix}layers.{i}.self_attn.{p}_proj_hd.weight", kvh, dh)
          for i in range(lm["num_layers"]) for p in ("k", "v")]


FLEX_MARKER = ".self_attn.k_proj_hd.weight"
# The authors' code defaults when config.extra lacks a key (modeling_llama.py), and the split it
# hard-codes (layer 8 selects first, 9.. are FlexAttention layers; 9 x 9 selection blocks);
# "flex_start" / "flex_blocks" in config.extra (our keys, for other shapes) move them.
FLEX_DEFAULTS = dict(threshold="64", zoom_ratio="3", flex_start="9", flex_blocks="9")


def flex_kwargs(hf: dict, kwargs: dict, name: str) -> dict:
  """LLaVA kwargs -> llava_flex kwargs from the checkpoint config's `extra` dict
  (`zoom_ratio:3#lowres_size:336#highres_size:1008#threshold:48`, values stored as strings)."""
  extra = {**FLEX_DEFAULTS, **(hf.get("extra") or {})}
  zoom = int(extra["zoom_ratio"])
  s = kwargs["vision"]["image_size"]
  if "lowres_size" in extra and int(extra["lowres_size"]) != s:
    raise ValueError(f"{name}: extra.lowres_size {extra['lowres_size']} but the vision tower "
                     f"takes {s} px")
  if "highres_size" in extra and int(extra["highres_size"]) != zoom * s:
    raise ValueError(f"{name}: extra.highres_size {extra['highres_size']} is not zoom_ratio "
                     f"({zoom}) x {s}")
  g = s // kwargs["vision"]["patch_size"]
  lm = {**kwargs["lm"], "flex_start": int(extra["flex_start"]),
        "flex_threshold": float(extra["threshold"]), "flex_blocks": int(extra["flex_blocks"]),
        "hr_grid": zoom * g,
        "num_image_tokens": g * g}
  return {**kwargs, "lm_family": "llama_flex", "lm": lm, "zoom": zoom}


def vision_rules(kw: dict[str, Any], prefix: str) -> list[Rule]:
  return prefixed(clip_conv.rules(kw["vision"], prefix), "vision/")


def ignore(key: str) -> bool:
  """Non-parameter buffers: rotary inv_freq, CLIP position ids."""
  return llama_conv.ignore(key) or key.endswith("embeddings.position_ids")


def load_hf_llava(path: str, *, vision: str | None = None, mesh: Mesh | None = None,
                  logical_rules=None, scan_layers: bool = False,
                  param_dtype=None) -> tuple[nn.Module, Any]:
  """A LLaVA-1.5 directory (any layout above) -> (model, params); `model.apply({"params": params},
  images_nhwc, input_ids, attention_mask)` gives the source model's logits first.

  vision: an HF CLIP directory. An original (liuhaotian) checkpoint needs it for the tower's config,
  and for its weights when the checkpoint does not embed them; embedded weights win.
  With `mesh`, params land directly on their shards; with `scan_layers`, both towers scan their
  layers and the params are stacked; with `param_dtype` ("bfloat16") floating params are cast to it
  tensor by tensor while loading.
  """
  hf = read_hf_config(path)
  reader = open_state_dict(path)  # safetensors, or the pytorch_model*.bin the liuhaotian repos ship
  layout = detect_layout(list(reader), path)
  vision_hf = read_hf_config(vision) if vision is not None else None
  if (layout.name == "liuhaotian") == is_llava_hf_config(hf):
    raise ValueError(f"{path}: the weights are in the {layout.name!r} layout but config.json is "
                     f"{'a llava-hf' if is_llava_hf_config(hf) else 'an original LLaVA'} config")
  kwargs = model_kwargs_from_hf(hf, f"{path}/config.json", vision_hf, f"{vision}/config.json")
  flex = any(k.endswith(FLEX_MARKER) for k in reader)
  if flex:  # LLaVA-FlexAttn: the same LLaVA-1.5 plus k/v_proj_hd in every decoder layer
    kwargs = flex_kwargs(hf, kwargs, f"{path}/config.json")
  vprefix = vision_key_prefix(list(reader), layout.vision_root)
  parts = [Part(reader, rules(kwargs, layout, vprefix), path, ignore)]
  if vprefix is None:
    if vision is None:
      raise KeyError(f"{path}: no vision tower tensors ({layout.vision_root}*); pass "
                     "vision=<HF CLIP directory> with its weights")
    vreader = open_state_dict(vision)
    parts.append(Part(vreader, vision_rules(kwargs, clip_conv.key_prefix(vreader)), vision,
                      clip_conv.ignore))
  elif vision is not None and layout.name != "liuhaotian":
    raise ValueError(f"{path} holds its own vision tower and vision_config; vision={vision!r} "
                     "would be ignored")
  if scan_layers:
    kwargs = {**kwargs, "lm": {**kwargs["lm"], "scan_layers": True},
              "vision": {**kwargs["vision"], "scan_layers": True}}
  model = (llava_flex if flex else llava_model).Model(**kwargs)
  s = model.vision["image_size"] * (model.zoom if flex else 1)
  example = [jnp.zeros((1, s, s, 3), jnp.float32),
             jnp.full((1, model.num_image_tokens), model.image_token_id, jnp.int32)]
  params = load_params(model, example, parts, mesh=mesh, logical_rules=logical_rules,
                       param_dtype=param_dtype)
  return model, params


def _clip_vision_config(kw: dict[str, Any]) -> dict[str, Any]:
  """Inverse of `clip.model_kwargs_from_hf` for a `CLIPVisionConfig`."""
  acts = {"quick_gelu": "quick_gelu", "gelu": "gelu", "gelu_tanh": "gelu_pytorch_tanh"}
  return {"model_type": "clip_vision_model", "hidden_size": kw["width"],
          "intermediate_size": kw.get("mlp_dim") or 4 * kw["width"],
          "num_hidden_layers": kw["depth"], "num_attention_heads": kw["heads"],
          "image_size": kw["image_size"], "patch_size": kw["patch_size"], "num_channels": 3,
          "hidden_act": acts[kw["act"]], "layer_norm_eps": kw["norm_eps"]}


def hf_config(model: llava_model.Model) -> dict[str, Any]:
  """A llava-hf config.json for `model` (transformers' `LlavaConfig`)."""
  lm_kw = model_kwargs(llama.Model(parent=None, **dict(model.lm or {})))
  vision_kw = model_kwargs(vit.Model(parent=None, **dict(model.vision or {})))
  text = {k: v for k, v in llama_conv.hf_config(lm_kw).items() if k != "architectures"}
  layer = model.vision_feature_layer
  return {
    "architectures": ["LlavaForConditionalGeneration"], "model_type": "llava",
    "text_config": text, "vision_config": _clip_vision_config(vision_kw),
    "image_token_index": model.image_token_id, "image_seq_length": model.num_image_tokens,
    "vision_feature_layer": layer if isinstance(layer, int) else list(layer),
    "vision_feature_select_strategy": model.vision_feature_select_strategy,
    "projector_hidden_act": _ACTS_BACK[model.projector_act],
    "multimodal_projector_bias": model.projector_bias,
    "tie_word_embeddings": text["tie_word_embeddings"], "torch_dtype": "float32",
  }


def save_hf_llava(model: nn.Module, params: Any, path: str) -> None:
  """Write a llava-hf directory (config.json + safetensors) that
  `transformers.LlavaForConditionalGeneration.from_pretrained` loads with the same logits.

  Keys are the `llava-hf` layout with `vision_tower.vision_model.*`, which transformers 4.x (before
  and after 4.52) and 5.x all load; a 5.x-style `vision_tower.embeddings.*` is not loaded by 4.x.
  """
  if type(model) is not llava_model.Model:
    raise ValueError(f"save_hf_llava: expected a vlm_jax.models.llava.Model, got "
                     f"{type(model).__module__}.{type(model).__name__}")
  if model.lm_family != "llama":
    raise NotImplementedError(f"save_hf_llava: lm_family {model.lm_family!r}; only 'llama' exports")
  config = hf_config(model)
  vocab = config["text_config"]["vocab_size"]
  if not 0 <= model.image_token_id < vocab:
    raise ValueError(f"save_hf_llava: image_token_id {model.image_token_id} is not a token of the "
                     f"{vocab}-token vocabulary; HF LLaVA needs an <image> token in the vocabulary "
                     "(add one and resize the embeddings first)")
  kw = {"lm": model_kwargs(llama.Model(parent=None, **dict(model.lm or {}))),
        "vision": model_kwargs(vit.Model(parent=None, **dict(model.vision or {}))),
        "projector_bias": model.projector_bias}
  layout = LAYOUT["llava-hf"]
  flat = to_per_layer(flatten(params), model.layer_stacks())
  flat = {k: np.asarray(jax.device_get(v), np.float32) for k, v in flat.items()}
  tensors = to_theirs(flat, rules(kw, layout, layout.vision_root + "vision_model."))
  write_checkpoint(path, tensors)
  with open(os.path.join(path, "config.json"), "w") as f:
    json.dump(config, f, indent=2)
