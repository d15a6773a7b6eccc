"""Train state and the trainable/frozen split.

Freezing is config: `config.trainable` is a regex over param paths (`lm/layers_3/attn/q/kernel`); a path
that matches (re.search) is trainable, every other param is frozen. Frozen params live in their own subtree
of the state: they are never differentiated and the optimizer never sees them, so they have no optimizer
state and stay bit-identical.
"""

from typing import Any

import flax
import jax

from vlm_jax.param_paths import flatten, matching, unflatten

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


def split_params(params: Params, trainable_regex: str) -> tuple[Params, Params]:
  """(params) -> (trainable, frozen) by `re.search(trainable_regex, path)`; errors if nothing trains."""
  flat = flatten(params)
  trainable = {k: flat[k] for k in matching(flat, trainable_regex)}
  if not trainable:
    raise ValueError(f"config.trainable={trainable_regex!r} matches no parameter; "
                     f"paths look like {sorted(flat)[:3]}")
  frozen = {k: v for k, v in flat.items() if k not in trainable}
  return unflatten(trainable), unflatten(frozen)


def merge_params(trainable: Params, frozen: Params) -> Params:
  return unflatten({**flatten(frozen), **flatten(trainable)})


def path_mask(params: Params, regex: str | None) -> Params:
  """A tree of bools with the structure of `params`: True where the path matches `regex`."""
  flat = flatten(params)
  hits = matching(flat, regex)
  return unflatten({k: k in hits for k in flat})
