"""HF CLIP vision towers <-> `vlm_jax.models.vit`.

Accepts `CLIPVisionModel` and the vision half of `CLIPModel`, in both key layouts: transformers 4.x and
hub checkpoints prefix everything with `vision_model.`; transformers 5.x drops the prefix when it saves a
`CLIPVisionModel` (`embeddings.*`, `encoder.layers.*`, `pre_layrnorm.*`, ...). The `pre_layrnorm`
spelling is HF's. Conv patch weights go from OIHW to HWIO.
"""

from typing import Any


from vlm_jax.convert.mapping import (Rule, bias_to_heads, conv_kernel, identity, layernorm,
                                     linear_from_heads, linear_to_heads, linear_with_bias)

MODEL_TYPES = ("clip_vision_model", "clip")
_ACTS = {"quick_gelu": "quick_gelu", "gelu": "gelu", "gelu_new": "gelu_tanh",
         "gelu_pytorch_tanh": "gelu_tanh"}


def vision_config(hf: dict, name: str) -> dict:
  if hf.get("model_type") == "clip":
    if "vision_config" not in hf:
      raise ValueError(f"{name}: a CLIPModel config without 'vision_config'")
    return hf["vision_config"]
  return hf


def model_kwargs_from_hf(hf: dict, name: str = "config.json") -> dict[str, Any]:
  v = vision_config(hf, name)
  act = v.get("hidden_act", "quick_gelu")
  if act not in _ACTS:
    raise NotImplementedError(f"{name}: hidden_act {act!r} is not one of {sorted(_ACTS)}")
  return dict(image_size=v.get("image_size", 224), patch_size=v.get("patch_size", 32),
              width=v["hidden_size"], depth=v["num_hidden_layers"], heads=v["num_attention_heads"],
              mlp_dim=v["intermediate_size"], act=_ACTS[act], norm_eps=v.get("layer_norm_eps", 1e-5))


def key_prefix(keys) -> str:
  """'vision_model.' (4.x / hub / CLIPModel) or '' (a CLIPVisionModel saved by transformers 5.x)."""
  return "vision_model." if any(k.startswith("vision_model.") for k in keys) else ""


def rules(kw: dict[str, Any], prefix: str = "") -> list[Rule]:
  h, d = kw["heads"], kw["width"]
  dh = d // h
  p = prefix
  out = [
    conv_kernel("patch_embed/kernel", f"{p}embeddings.patch_embedding.weight"),
    identity("cls", f"{p}embeddings.class_embedding"),
    identity("pos_embed", f"{p}embeddings.position_embedding.weight"),
    *layernorm("pre_norm", f"{p}pre_layrnorm"),
    *layernorm("post_norm", f"{p}post_layernorm"),
  ]
  for i in range(kw["depth"]):
    o, t = f"layers_{i}", f"{p}encoder.layers.{i}"
    for ours, theirs in (("q", "q_proj"), ("k", "k_proj"), ("v", "v_proj")):
      out += [linear_to_heads(f"{o}/attn/{ours}/kernel", f"{t}.self_attn.{theirs}.weight", h, dh),
              bias_to_heads(f"{o}/attn/{ours}/bias", f"{t}.self_attn.{theirs}.bias", h, dh)]
    out += [
      linear_from_heads(f"{o}/attn/o/kernel", f"{t}.self_attn.out_proj.weight", h, dh),
      identity(f"{o}/attn/o/bias", f"{t}.self_attn.out_proj.bias"),
      *linear_with_bias(f"{o}/mlp/fc1", f"{t}.mlp.fc1"),
      *linear_with_bias(f"{o}/mlp/fc2", f"{t}.mlp.fc2"),
      *layernorm(f"{o}/norm1", f"{t}.layer_norm1"),
      *layernorm(f"{o}/norm2", f"{t}.layer_norm2"),
    ]
  return out


def ignore(key: str) -> bool:
  """CLIPModel's text tower and projections, and the position-id buffer, are not part of the tower."""
  return (key.startswith(("text_model.", "visual_projection", "text_projection", "logit_scale"))
          or key.endswith("position_ids"))
