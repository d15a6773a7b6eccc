"""open_clip vision towers (`VisionTransformer`, as used by OpenFlamingo) <-> `vlm_jax.models.vit`.

Keys, under a prefix that is `visual.` in an open_clip CLIP state dict, `vision_encoder.` in an
OpenFlamingo state dict, and empty for a bare tower: `conv1.weight` (OIHW, no bias), `class_embedding`,
`positional_embedding`, `ln_pre`, `transformer.resblocks.{i}.{ln_1, attn.in_proj_weight/bias (fused
q|k|v rows), attn.out_proj, ln_2, mlp.c_fc, mlp.c_proj}`, `ln_post`, and `proj` (the image-embedding
projection, which patch tokens never pass through, so it is not part of our tower).

The architecture comes from an open_clip model-config JSON (`{"vision_cfg": {image_size, layers, width,
head_width, patch_size, mlp_ratio}, "quick_gelu": bool}`); OpenAI-pretrained towers use QuickGELU.
"""

import json
import os
from typing import Any

import numpy as np

from vlm_jax.convert.mapping import (Rule, conv_kernel, identity, layernorm, linear_from_heads,
                                     linear_with_bias)

# open_clip VisionTransformer options our ViT does not implement: refuse rather than load wrongly.
_UNSUPPORTED = ("ls_init_value", "attentional_pool", "no_ln_pre", "timm_model_name", "act_kwargs",
                "norm_kwargs", "pos_embed_type", "output_tokens", "attn_pooler_queries")


def read_config(path: str) -> dict:
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path}: no such open_clip model config")
  with open(path) as f:
    cfg = json.load(f)
  if "vision_cfg" not in cfg:
    raise ValueError(f"{path}: an open_clip model config needs a 'vision_cfg' object")
  return cfg


def model_kwargs(cfg: dict, name: str = "open_clip config") -> dict[str, Any]:
  v = cfg["vision_cfg"]
  bad = [k for k in _UNSUPPORTED if v.get(k)]
  if bad:
    raise NotImplementedError(f"{name}: vision_cfg options {bad} are not supported by vlm_jax.models.vit")
  if v.get("pool_type", "tok") != "tok" or v.get("final_ln_after_pool"):
    raise NotImplementedError(f"{name}: only the default token pooling is supported")
  for field in ("image_size", "patch_size"):
    if not isinstance(v.get(field), int):
      raise ValueError(f"{name}: vision_cfg.{field} must be an int (square), got {v.get(field)!r}")
  width = v["width"]
  head_width = v.get("head_width", 64)
  if width % head_width:
    raise ValueError(f"{name}: vision_cfg.width {width} is not a multiple of head_width {head_width}")
  return dict(image_size=v["image_size"], patch_size=v["patch_size"], width=width, depth=v["layers"],
              heads=width // head_width, mlp_dim=int(width * v.get("mlp_ratio", 4.0)),
              act="quick_gelu" if cfg.get("quick_gelu") else "gelu", norm_eps=1e-5)


def _split_in_proj(heads: int, head_dim: int) -> tuple:
  """Fused `in_proj_weight` [3D, D] (rows q | k | v) <-> three kernels [D, heads, head_dim]."""
  def to_ours(w):
    return tuple(p.T.reshape(w.shape[1], heads, head_dim) for p in np.split(w, 3, axis=0))

  def to_theirs(q, k, v):
    return np.concatenate([x.reshape(x.shape[0], heads * head_dim).T for x in (q, k, v)], axis=0)
  return to_ours, to_theirs


def _split_in_bias(heads: int, head_dim: int) -> tuple:
  def to_ours(b):
    return tuple(p.reshape(heads, head_dim) for p in np.split(b, 3))

  def to_theirs(q, k, v):
    return np.concatenate([x.reshape(-1) for x in (q, k, v)])
  return to_ours, to_theirs


def rules(kw: dict[str, Any], prefix: str = "") -> list[Rule]:
  h = kw["heads"]
  dh = kw["width"] // h
  p = prefix
  out = [
    conv_kernel("patch_embed/kernel", f"{p}conv1.weight"),
    identity("cls", f"{p}class_embedding"),
    identity("pos_embed", f"{p}positional_embedding"),
    *layernorm("pre_norm", f"{p}ln_pre"),
    *layernorm("post_norm", f"{p}ln_post"),
  ]
  for i in range(kw["depth"]):
    o, t = f"layers_{i}", f"{p}transformer.resblocks.{i}"
    qkv = tuple(f"{o}/attn/{n}/kernel" for n in "qkv")
    qkv_bias = tuple(f"{o}/attn/{n}/bias" for n in "qkv")
    out += [
      Rule(qkv, f"{t}.attn.in_proj_weight", *_split_in_proj(h, dh)),
      Rule(qkv_bias, f"{t}.attn.in_proj_bias", *_split_in_bias(h, dh)),
      linear_from_heads(f"{o}/attn/o/kernel", f"{t}.attn.out_proj.weight", h, dh),
      identity(f"{o}/attn/o/bias", f"{t}.attn.out_proj.bias"),
      *linear_with_bias(f"{o}/mlp/fc1", f"{t}.mlp.c_fc"),
      *linear_with_bias(f"{o}/mlp/fc2", f"{t}.mlp.c_proj"),
      *layernorm(f"{o}/norm1", f"{t}.ln_1"),
      *layernorm(f"{o}/norm2", f"{t}.ln_2"),
    ]
  return out


def key_prefix(keys) -> str:
  """'visual.' for a whole open_clip CLIP state dict, '' for a bare vision tower."""
  return "visual." if any(k.startswith("visual.") for k in keys) else ""


def ignore_for(prefix: str):
  """Keys of a whole CLIP state dict that are not the vision tower's patch path."""
  def ignore(key: str) -> bool:
    if key == f"{prefix}proj":
      return True
    return bool(prefix) and not key.startswith(prefix)  # text tower, logit_scale, attn_mask buffer
  return ignore
