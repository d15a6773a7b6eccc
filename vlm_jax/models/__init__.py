"""Model families. Each module `vlm_jax.models.<name>` exposes `Model(**config.model)`."""

import importlib

from flax import linen as nn

FAMILIES = ("vit", "lavit", "llama", "llama_flex", "gpt_neox", "flamingo", "llava", "llava_flex",
            "inf_llava", "mpt")


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
