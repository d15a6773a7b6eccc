"""INF-LLaVA checkpoints (`WeihuangLin/INF-LLaVA-sft` layout) -> `vlm_jax.models.inf_llava`:
`load_inf_llava`.

The authors' `LlavaLlamaForCausalLM` (package `INF_llava`, a haotian-liu/LLaVA fork) saves the
liuhaotian LLaVA layout (`vlm_jax.convert.llava`: LM `model.*` + `lm_head.`, projector
`model.mm_projector.{0,2}`, CLIP `model.vision_tower.vision_tower.vision_model.*` or a separate
HF CLIP directory; config.json is LLaMA-3's fields plus `mm_*`) and the DEM, `SpatialEmbed`
(reference/flex_inf.md §2.3, §2.8), under `model.spatial_embed.`:

  attention.linears.{0,1,2}.{weight,bias}  -> spatial_embed/attention/{q,k,v}/{kernel,bias}
                                              (torch [h * d_k, D] -> [D, h, d_k])
  attention.linears.3.{weight,bias}        -> spatial_embed/attention/o  ([D, h d_k] -> [h, d_k, D])
  attention.ln.{weight,bias}               -> spatial_embed/attention/ln/{scale,bias}
  ffn_{crop,stride}.{0,2}.{weight,bias}    -> spatial_embed/ffn_{crop,stride}/fc{1,2}
  ln_fuse.{weight,bias}                    -> spatial_embed/ln_fuse

What the checkpoint does not record comes from the authors' code: 8 attention heads
(`MultiHeadedAttention(h=8, ...)`), n = 3 crops (`encode_images`); the bottleneck width is read
from `ffn_crop.0.weight` (D / 16 in the release).
"""

from typing import Any

import jax.numpy as jnp
from flax import linen as nn
from jax.sharding import Mesh

from vlm_jax.convert import clip as clip_conv
from vlm_jax.convert import llava as llava_conv
from vlm_jax.convert.hf import read_hf_config
from vlm_jax.convert.loading import Part, load_params
from vlm_jax.convert.mapping import (Rule, bias_to_heads, identity, layernorm, linear_from_heads,
                                     linear_to_heads, linear_with_bias)
from vlm_jax.convert.sources import open_state_dict, shape_of
from vlm_jax.models import inf_llava

DEM_PREFIX = "model.spatial_embed."
DEM_HEADS = 8  # the authors' MultiHeadedAttention(h=8, d_model=1024)
NUM_CROPS = 3  # the authors' encode_images: crop_pixels_N / extract_pixels_N(img, 3)


def dem_rules(width: int, num_heads: int = DEM_HEADS, prefix: str = DEM_PREFIX) -> list[Rule]:
  """`SpatialEmbed`'s tensors <-> our `spatial_embed/*` params (table in the module docstring)."""
  if width % num_heads:
    raise ValueError(f"DEM width {width} is not divisible by {num_heads} heads")
  hd = width // num_heads
  ours, a = "spatial_embed/attention/", f"{prefix}attention."
  out = []
  for i, name in enumerate("qkv"):
    out += [linear_to_heads(f"{ours}{name}/kernel", f"{a}linears.{i}.weight", num_heads, hd),
            bias_to_heads(f"{ours}{name}/bias", f"{a}linears.{i}.bias", num_heads, hd)]
  out += [linear_from_heads(f"{ours}o/kernel", f"{a}linears.3.weight", num_heads, hd),
          identity(f"{ours}o/bias", f"{a}linears.3.bias"), *layernorm(f"{ours}ln", f"{a}ln")]
  for ffn in ("ffn_crop", "ffn_stride"):  # nn.Sequential(Linear, GELU, Linear): indices 0 and 2
    out += [*linear_with_bias(f"spatial_embed/{ffn}/fc1", f"{prefix}{ffn}.0"),
            *linear_with_bias(f"spatial_embed/{ffn}/fc2", f"{prefix}{ffn}.2")]
  return out + layernorm("spatial_embed/ln_fuse", f"{prefix}ln_fuse")


def load_inf_llava(path: str, *, vision: str | None = None, num_crops: int = NUM_CROPS,
                   dem_heads: int = DEM_HEADS, mesh: Mesh | None = None, logical_rules=None,
                   scan_layers: bool = False, param_dtype=None) -> tuple[nn.Module, Any]:
  """An INF-LLaVA directory -> (model, params); `model.apply({"params": params}, images_nhwc,
  input_ids, attention_mask)` gives the authors' logits first (images float[B, 3 * 336, ., 3],
  input_ids with a run of 576 image tokens of id -200 per image).

  vision: an HF CLIP directory (openai/clip-vit-large-patch14-336): the tower's config, and its
  weights when the checkpoint does not embed them (embedded weights win), as `load_hf_llava`.
  num_crops / dem_heads: the authors' hard-coded 3 and 8 (not in the checkpoint). mesh,
  logical_rules, scan_layers, param_dtype: as `load_hf_llava`.
  """
  hf = read_hf_config(path)
  reader = open_state_dict(path)  # safetensors, or pytorch_model*.bin
  keys = list(reader)
  layout = llava_conv.detect_layout(keys, path)
  if layout.name != "liuhaotian" or llava_conv.is_llava_hf_config(hf):
    raise ValueError(f"{path}: an INF-LLaVA checkpoint is in the original LLaVA layout "
                     f"(model.mm_projector.*, mm_* config fields); got the {layout.name!r} layout")
  if not any(k.startswith(DEM_PREFIX) for k in keys):
    raise KeyError(f"{path}: no INF-LLaVA DEM tensors ({DEM_PREFIX}*); a plain LLaVA-1.5 "
                   "checkpoint loads with load_hf_llava")
  vision_hf = read_hf_config(vision) if vision is not None else None
  kwargs = llava_conv.model_kwargs_from_hf(hf, f"{path}/config.json", vision_hf,
                                           f"{vision}/config.json")
  layers = kwargs["vision_feature_layer"]
  width = kwargs["vision"]["width"] * (1 if isinstance(layers, int) else len(layers))
  bottleneck = shape_of(reader, f"{DEM_PREFIX}ffn_crop.0.weight")[0]
  if width % bottleneck:
    raise ValueError(f"{path}: {DEM_PREFIX}ffn_crop.0.weight has {bottleneck} rows, which do "
                     f"not divide the DEM width {width}")
  kwargs = {**kwargs, "num_crops": num_crops,
            "dem": {"num_heads": dem_heads, "bottleneck_div": width // bottleneck}}
  vprefix = llava_conv.vision_key_prefix(keys, layout.vision_root)
  parts = [Part(reader, llava_conv.rules(kwargs, layout, vprefix) + dem_rules(width, dem_heads),
                path, llava_conv.ignore)]
  if vprefix is None:  # `vision` is set: the config needed it; its weights must be there too
    vreader = open_state_dict(vision)
    parts.append(Part(vreader, llava_conv.vision_rules(kwargs, clip_conv.key_prefix(vreader)),
                      vision, clip_conv.ignore))
  if scan_layers:
    kwargs = {**kwargs, "lm": {**kwargs["lm"], "scan_layers": True},
              "vision": {**kwargs["vision"], "scan_layers": True}}
  model = inf_llava.Model(**kwargs)
  s = num_crops * model.vision["image_size"]
  example = [jnp.zeros((1, s, s, 3), jnp.float32),
             jnp.full((1, model.num_image_tokens), model.image_token_id, jnp.int32)]
  params = load_params(model, example, parts, mesh=mesh, logical_rules=logical_rules,
                       param_dtype=param_dtype)
  return model, params
