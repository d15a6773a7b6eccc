"""Model families. Each module `vlm_jax.models.<name>` exposes `Model(**config.model)`."""

import importlib

from flax import linen as nn

FAMILIES = ("vit", "llama", "gpt_neox", "flamingo")


def build_model(name: str, kwargs) -> nn.Module:
  """`config.model_name` + `config.model` -> a linen Module; unknown names fail naming the field."""
  if name not in FAMILIES:
    raise ValueError(f"config.model_name {name!r} is not one of {FAMILIES}")
  module = importlib.import_module(f"vlm_jax.models.{name}")
  return module.Model(**dict(kwargs))
