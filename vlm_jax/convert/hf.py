"""HF checkpoints <-> vlm_jax: `load_hf_lm`, `save_hf_lm`, `load_hf_clip_vision`.

The LM family is chosen from `config.json`'s `model_type`; each family module in `vlm_jax.convert`
provides `model_kwargs_from_hf`, `rules` and `ignore` (and `hf_config` where export is supported). Weights
are read tensor by tensor from safetensors (sharded or not) with numpy; no PyTorch is needed.
"""

import dataclasses
import json
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn
from jax.sharding import Mesh

from vlm_jax.convert import clip as clip_conv
from vlm_jax.convert import gpt_neox as gpt_neox_conv
from vlm_jax.convert import llama as llama_conv
from vlm_jax.convert import mpt as mpt_conv
from vlm_jax.convert.loading import Part, load_params
from vlm_jax.convert.mapping import to_theirs
from vlm_jax.convert.safetensors_io import write_checkpoint
from vlm_jax.convert.sources import open_state_dict
from vlm_jax.models import gpt_neox, llama, vit
from vlm_jax.models import mpt
from vlm_jax.param_paths import flatten, to_per_layer

# model_type -> (converter module, model module)
FAMILIES = {**{t: (llama_conv, llama) for t in llama_conv.MODEL_TYPES},
            **{t: (gpt_neox_conv, gpt_neox) for t in gpt_neox_conv.MODEL_TYPES},
            **{t: (mpt_conv, mpt) for t in mpt_conv.MODEL_TYPES},
            **{t: (mpt_conv.MosaicGpt, mpt) for t in mpt_conv.MosaicGpt.MODEL_TYPES}}


def read_hf_config(path: str) -> dict:
  file = os.path.join(path, "config.json")
  if not os.path.exists(file):
    raise FileNotFoundError(f"{path}: no config.json (expected an HF model directory)")
  with open(file) as f:
    return json.load(f)


def family(hf: dict, path: str):
  """config.json -> (converter module, model module) of its `model_type`."""
  model_type = hf.get("model_type")
  if model_type not in FAMILIES:
    raise ValueError(f"{path}/config.json: model_type {model_type!r} is not supported; "
                     f"supported: {sorted(FAMILIES)}")
  return FAMILIES[model_type]


def load_hf_lm(path: str, *, mesh: Mesh | None = None, logical_rules=None,
               scan_layers: bool = False, param_dtype=None) -> tuple[nn.Module, Any]:
  """An HF causal-LM directory -> (model, params) with `model.apply({"params": params}, input_ids,
  attention_mask)` giving the HF model's logits first. With `mesh`, params land on their shards;
  with `scan_layers`, the model scans its layers and the params are stacked (`lm.scan_layers`);
  with `param_dtype` ("bfloat16"), floating params are cast to it tensor by tensor while loading."""
  hf = read_hf_config(path)
  conv, family_module = family(hf, path)
  kwargs = conv.model_kwargs_from_hf(hf, f"{path}/config.json")
  model = family_module.Model(**kwargs, scan_layers=scan_layers)
  params = load_params(model, [jnp.zeros((1, 1), jnp.int32)],
                       [Part(open_state_dict(path), conv.rules(kwargs), path, conv.ignore)],
                       mesh=mesh, logical_rules=logical_rules, param_dtype=param_dtype)
  return model, params


def load_hf_clip_vision(path: str, *, mesh: Mesh | None = None, logical_rules=None,
                        scan_layers: bool = False, param_dtype=None) -> tuple[nn.Module, Any]:
  """An HF CLIPVisionModel / CLIPModel directory -> (ViT model, params). The model takes NHWC float
  images and returns the last hidden state first, all hidden states in aux["hidden_states"].
  `param_dtype` as in `load_hf_lm`."""
  hf = read_hf_config(path)
  if hf.get("model_type") not in clip_conv.MODEL_TYPES:
    raise ValueError(f"{path}/config.json: model_type {hf.get('model_type')!r} is not a CLIP model "
                     f"({clip_conv.MODEL_TYPES})")
  kwargs = clip_conv.model_kwargs_from_hf(hf, f"{path}/config.json")
  model = vit.Model(**kwargs, scan_layers=scan_layers)
  s = kwargs["image_size"]
  reader = open_state_dict(path)
  rules = clip_conv.rules(kwargs, clip_conv.key_prefix(reader))
  params = load_params(model, [jnp.zeros((1, s, s, 3), jnp.float32)],
                       [Part(reader, rules, path, clip_conv.ignore)], mesh=mesh,
                       logical_rules=logical_rules, param_dtype=param_dtype)
  return model, params


def model_kwargs(model: nn.Module) -> dict[str, Any]:
  return {f.name: getattr(model, f.name) for f in dataclasses.fields(model)
          if f.name not in ("parent", "name", "dtype", "param_dtype")}


def save_hf_lm(model: nn.Module, params: Any, path: str) -> None:
  """Write `config.json` + safetensors that `transformers.AutoModelForCausalLM` loads with the same
  logits. A scanned model's stacked params are written per layer, as HF keeps them."""
  # Exact type: gpt_neox.Model subclasses llama.Model.
  conv = next((c for c, m in FAMILIES.values() if type(model) is m.Model), None)
  if conv is None:
    raise ValueError(f"save_hf_lm: no HF export for {type(model).__module__}.{type(model).__name__}")
  kwargs = model_kwargs(model)
  flat = to_per_layer(flatten(params), model.layer_stacks())
  flat = {k: np.asarray(jax.device_get(v), np.float32) for k, v in flat.items()}
  tensors = to_theirs(flat, conv.rules(kwargs))
  write_checkpoint(path, tensors)
  with open(os.path.join(path, "config.json"), "w") as f:
    json.dump(conv.hf_config(kwargs), f, indent=2)
