"""Train state and the trainable/frozen split.

Freezing is config: `config.trainable` is a regex over param paths (`lm/layers_3/attn/q/kernel`); a path
that matches (re.search) is trainable, every other param is frozen. Frozen params live in their own subtree
of the state: they are never differentiated and the optimizer never sees them, so they have no optimizer
state and stay bit-identical.
"""

import re
from typing import Any

import flax
import jax
from flax import traverse_util

Params = Any


@flax.struct.dataclass
class TrainState:
  """step: int32[]; trainable / frozen: nested param dicts with disjoint leaves; opt_state: optax state
  of `trainable` only."""

  step: jax.Array
  trainable: Params
  frozen: Params
  opt_state: Any

  @property
  def params(self) -> Params:
    return merge_params(self.trainable, self.frozen)


def flatten(params: Params) -> dict[str, Any]:
  return traverse_util.flatten_dict(params, sep="/")


def unflatten(flat: dict[str, Any]) -> Params:
  return traverse_util.unflatten_dict(flat, sep="/")


def split_params(params: Params, trainable_regex: str) -> tuple[Params, Params]:
  """(params) -> (trainable, frozen) by `re.search(trainable_regex, path)`; errors if nothing trains."""
  pattern = re.compile(trainable_regex)
  flat = flatten(params)
  trainable = {k: v for k, v in flat.items() if pattern.search(k)}
  if not trainable:
    raise ValueError(f"config.trainable={trainable_regex!r} matches no parameter; "
                     f"paths look like {sorted(flat)[:3]}")
  frozen = {k: v for k, v in flat.items() if k not in trainable}
  return unflatten(trainable), unflatten(frozen)


def merge_params(trainable: Params, frozen: Params) -> Params:
  return unflatten({**flatten(frozen), **flatten(trainable)})


def path_mask(params: Params, regex: str | None) -> Params:
  """A tree of bools with the structure of `params`: True where the path matches `regex`."""
  pattern = re.compile(regex) if regex else None
  return unflatten({k: bool(pattern and pattern.search(k)) for k in flatten(params)})
