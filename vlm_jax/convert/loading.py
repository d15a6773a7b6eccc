"""Turning source checkpoints into params placed where training wants them.

`load_params` reads one source tensor at a time, converts it with the family's rules and puts it on its
device(s) right away: without a mesh on the default device, with a mesh directly onto the param's
`NamedSharding` (each device gets only its slice, via `jax.make_array_from_callback`). Peak host memory
is therefore the converted params plus one tensor, never two full copies of a 7B model.

A composite model (OpenFlamingo: LM directory + CLIP directory + trainable checkpoint) is loaded from
several `Part`s; each part is strict about its own source (every key used), and together they must cover
every param of the model.

Conversion tables name params per layer (`lm/layers_3/attn/q/kernel`). A model built with
`scan_layers` holds them stacked (`lm/layers/attn/q/kernel` [L, ...], `model.layer_stacks()`); the
loader then writes each converted layer into its row of the stacked param, already on the device(s),
so every family's rules serve both layouts and host memory stays at one tensor.
"""

import dataclasses
import functools
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn
from jax.sharding import Mesh

from vlm_jax import sharding as sharding_lib
from vlm_jax.convert.mapping import Rule, check_keys, to_ours
from vlm_jax.param_paths import flatten, layer_slots, unflatten


@dataclasses.dataclass
class Part:
  """Tensors from one source: `{key: array}` read lazily, the rules that consume them, a name for errors,
  and a predicate for keys that are deliberately unused (buffers, other towers)."""

  source: Mapping[str, np.ndarray]
  rules: list[Rule]
  name: str
  ignore: Callable[[str], bool] = lambda k: False


def abstract_params(model: nn.Module, *inputs) -> Any:
  """The model's boxed abstract params (shapes, dtypes, logical axis names), without allocating them."""
  return jax.eval_shape(model.init, jax.random.PRNGKey(0), *inputs)["params"]


def load_params(model: nn.Module, example_inputs: Sequence[Any], parts: Sequence[Part], *,
                mesh: Mesh | None = None,
                logical_rules: Sequence[Sequence[Any]] | None = None,
                param_dtype: Any = None) -> Any:
  """Source tensors -> the model's param tree (jax Arrays in the model's param dtype, or `param_dtype`).

  Args:
    model: the flax module the params are for; `example_inputs` are `model.init`'s positional inputs
      (shapes only matter).
    parts: where the tensors come from (see `Part`); strict both ways (see `mapping.to_ours`).
    mesh, logical_rules: when given, each param lands on `NamedSharding(mesh, spec)` from its logical axis
      names, so a sharded model is loaded without ever materialising unsharded copies on a device.
    param_dtype: e.g. "bfloat16": every floating param is cast to it one tensor at a time, on the
      host, before it is placed, so a 7B model never exists in float32 (14 GB, not 28 GB, at peak).
  """
  boxed = abstract_params(model, *example_inputs)
  abstract = {k: _in_dtype(v, param_dtype) for k, v in flatten(nn.unbox(boxed)).items()}
  shardings = None
  if mesh is not None:
    shardings = flatten(sharding_lib.logical_shardings(
      boxed, mesh, sharding_lib.logical_rules(logical_rules)))

  def place(name: str, value: np.ndarray) -> jax.Array:
    value = np.asarray(value, dtype=abstract[name].dtype)  # e.g. bfloat16 on disk -> float32 params
    if shardings is None:
      return jnp.asarray(value)
    return jax.make_array_from_callback(value.shape, shardings[name], lambda index: value[index])

  # Scanned stacks: the rules' per-layer names, each a row of a stacked param.
  slots = layer_slots(abstract, getattr(model, "layer_stacks", lambda: ())())
  stacked = {row_of[0] for row_of in slots.values()}
  shapes = {k: tuple(v.shape) for k, v in abstract.items() if k not in stacked}
  shapes.update({name: tuple(abstract[path].shape[1:]) for name, (path, _) in slots.items()})
  buffers: dict[str, jax.Array] = {}

  def place_row(name: str, value: np.ndarray) -> None:
    path, row = slots[name]
    if path not in buffers:
      buffers[path] = _zeros(abstract[path], None if shardings is None else shardings[path])
    buffers[path] = _set_row(buffers[path], np.asarray(value, abstract[path].dtype), row)

  def place_any(name: str, value: np.ndarray) -> jax.Array | None:
    return place_row(name, value) if name in slots else place(name, value)

  for part in parts:  # names first: a wrong checkpoint fails before any tensor is read
    check_keys(part.source, part.rules, source_name=part.name, ignore=part.ignore)
  flat: dict[str, jax.Array] = {}
  for part in parts:
    got = to_ours(part.source, part.rules, shapes, source_name=part.name, ignore=part.ignore,
                  place=place_any, require_all=False)
    twice = sorted(set(got) & set(flat))
    if twice:
      raise ValueError(f"{part.name}: params {twice[:5]} were already loaded from another source")
    flat.update(got)
  missing = sorted(set(shapes) - set(flat))
  if missing:
    names = ", ".join(p.name for p in parts)
    raise KeyError(f"{names}: our params {missing[:8]}{' ...' if len(missing) > 8 else ''} have no "
                   "source tensor")
  flat = {k: v for k, v in flat.items() if k not in slots}
  return unflatten({**flat, **buffers})


def _in_dtype(abstract: jax.ShapeDtypeStruct, dtype: Any) -> jax.ShapeDtypeStruct:
  """`abstract` with floating dtype `dtype` (integer and bool params keep theirs)."""
  if dtype is None or not jnp.issubdtype(abstract.dtype, jnp.floating):
    return abstract
  return jax.ShapeDtypeStruct(abstract.shape, jnp.dtype(dtype))


def _zeros(abstract: jax.ShapeDtypeStruct, sharding: jax.sharding.Sharding | None) -> jax.Array:
  """A stacked param's buffer, created in place (on its shards with a mesh)."""
  def make():
    return jnp.zeros(abstract.shape, abstract.dtype)
  return make() if sharding is None else jax.jit(make, out_shardings=sharding)()


@functools.lru_cache(maxsize=None)
def _row_setter(sharding: jax.sharding.Sharding) -> Callable:
  def update(stacked, value, row):
    return jax.lax.dynamic_update_index_in_dim(stacked, value, row, 0)
  return jax.jit(update, donate_argnums=0, out_shardings=sharding)


def _set_row(stacked: jax.Array, row_value: np.ndarray, row: int) -> jax.Array:
  """stacked[row] = row_value, reusing the stacked buffer (donated) and keeping its sharding."""
  return _row_setter(stacked.sharding)(stacked, row_value, row)
