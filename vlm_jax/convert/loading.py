"""Turning a source checkpoint into params placed where training wants them.

`load_params` reads one source tensor at a time, converts it with the family's rules and puts it on its
device(s) right away: without a mesh on the default device, with a mesh directly onto the param's
`NamedSharding` (each device gets only its slice, via `jax.make_array_from_callback`). Peak host memory
is therefore the converted params plus one tensor, never two full copies of a 7B model.
"""

from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn
from jax.sharding import Mesh

from vlm_jax import sharding as sharding_lib
from vlm_jax.convert.mapping import Rule, to_ours
from vlm_jax.param_paths import flatten, unflatten


def abstract_params(model: nn.Module, *inputs) -> Any:
  """The model's boxed abstract params (shapes, dtypes, logical axis names), without allocating them."""
  return jax.eval_shape(model.init, jax.random.PRNGKey(0), *inputs)["params"]


def load_params(model: nn.Module, example_inputs: Sequence[Any], source: Mapping[str, np.ndarray],
                rules: list[Rule], *, source_name: str,
                ignore: Callable[[str], bool] = lambda k: False, mesh: Mesh | None = None,
                logical_rules: Sequence[Sequence[Any]] | None = None) -> Any:
  """Source tensors -> the model's param tree (jax Arrays in the model's param dtype).

  Args:
    model: the flax module the params are for; `example_inputs` are `model.init`'s positional inputs
      (shapes only matter).
    source: `{key: array}` read lazily (a `CheckpointReader`, a torch state dict converted per tensor).
    rules: the family's conversion table; strict both ways (see `mapping.to_ours`).
    mesh, logical_rules: when given, each param lands on `NamedSharding(mesh, spec)` from its logical axis
      names, so a sharded model is loaded without ever materialising unsharded copies on a device.
  """
  boxed = abstract_params(model, *example_inputs)
  abstract = flatten(nn.unbox(boxed))
  shardings = None
  if mesh is not None:
    shardings = flatten(sharding_lib.logical_shardings(
      boxed, mesh, sharding_lib.logical_rules(logical_rules)))

  def place(name: str, value: np.ndarray) -> jax.Array:
    value = np.asarray(value, dtype=abstract[name].dtype)  # e.g. bfloat16 on disk -> float32 params
    if shardings is None:
      return jnp.asarray(value)
    return jax.make_array_from_callback(value.shape, shardings[name], lambda index: value[index])

  shapes = {k: tuple(v.shape) for k, v in abstract.items()}
  flat = to_ours(source, rules, shapes, source_name=source_name, ignore=ignore, place=place)
  return unflatten(flat)
