"""Model families. Each module `vlm_jax.models.<name>` exposes `Model(**config.model)`."""

import importlib

from flax import linen as nn

FAMILIES = ("vit", "lavit", "llama", "llama_flex", "gpt_neox", "flamingo", "llava", "llava_flex",
            "inf_llava", "mpt")
VISION_FAMILIES = ("vit", "lavit")  # towers a composed model (Flamingo, LLaVA) can hold
# Field defaults a tower gets inside a composed model: LaViT's classifier head is unused there.
_TOWER_DEFAULTS = {"vit": {}, "lavit": {"num_classes": 0}}


def model_class(name: str, field: str = "config.model_name") -> type[nn.Module]:
  """`vlm_jax.models.<name>.Model`; an unknown name fails naming the config field that gave it."""
  if name not in FAMILIES:
    raise ValueError(f"{field} {name!r} is not one of {FAMILIES}")
  return importlib.import_module(f"vlm_jax.models.{name}").Model


def build_model(name: str, kwargs) -> nn.Module:
  """`config.model_name` + `config.model` -> a linen Module."""
  return model_class(name)(**dict(kwargs))


def lm_spec(family: str, kwargs) -> nn.Module:
  """The LM a composed model (Flamingo, LLaVA) would build from `model.lm_family` / `model.lm`, as
  an unbound module (parent=None: no submodule is made) for reading its fields and layouts."""
  return model_class(family, "model.lm_family")(parent=None, **dict(kwargs or {}))


def vision_tower(family: str, kwargs, **module_kw) -> nn.Module:
  """The vision tower a composed model builds from `model.vision_family` / `model.vision`:
  `models.vit.Model` or `models.lavit.Model` (with num_classes=0 unless `model.vision` sets it).
  module_kw: name/dtype/param_dtype for the bound tower, or parent=None for an unbound one whose
  fields and layouts (num_patches, stage_grids, layer_stacks) are read without making a submodule.
  An unknown family fails naming `model.vision_family` and the allowed values."""
  if family not in VISION_FAMILIES:
    raise ValueError(f"model.vision_family {family!r} is not one of {VISION_FAMILIES}")
  return model_class(family)(**{**_TOWER_DEFAULTS[family], **dict(kwargs or {})}, **module_kw)
