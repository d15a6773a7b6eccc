"""Conversion as data: a table of rules `our param path <-> source key` with a per-key transform, used in
both directions.

Each `Rule` holds the two names and a pair of inverse functions. Transforms cover the PyTorch -> Flax layout
differences: `Linear` weights `[out, in]` become kernels `[in, out]`, head-split where our kernels keep a
heads axis (`q: [embed, heads, kv]`, `o: [heads, kv, embed]`). Conversion is strict: a source key the
table expects but the checkpoint lacks, a checkpoint key no rule uses, and a shape that differs from the
model's are all errors that name the key (OpenFlamingo's `strict=False` loading hid such mistakes).
"""

import dataclasses
from typing import Callable, Iterable, Mapping

import numpy as np

Array = np.ndarray


@dataclasses.dataclass(frozen=True)
class Rule:
  ours: str
  theirs: str
  to_ours: Callable[[Array], Array]
  to_theirs: Callable[[Array], Array]


def identity(ours: str, theirs: str) -> Rule:
  return Rule(ours, theirs, lambda x: x, lambda x: x)


def linear(ours: str, theirs: str) -> Rule:
  """torch Linear weight [out, in] <-> kernel [in, out]."""
  return Rule(ours, theirs, lambda w: w.T, lambda k: k.T)


def linear_to_heads(ours: str, theirs: str, heads: int, head_dim: int) -> Rule:
  """torch [heads * head_dim, in] <-> kernel [in, heads, head_dim] (q, k, v projections)."""
  return Rule(ours, theirs, lambda w: w.T.reshape(w.shape[1], heads, head_dim),
              lambda k: k.reshape(k.shape[0], heads * head_dim).T)


def linear_from_heads(ours: str, theirs: str, heads: int, head_dim: int) -> Rule:
  """torch [out, heads * head_dim] <-> kernel [heads, head_dim, out] (output projections)."""
  return Rule(ours, theirs, lambda w: w.T.reshape(heads, head_dim, w.shape[0]),
              lambda k: k.reshape(heads * head_dim, k.shape[-1]).T)


def to_ours(source: Mapping[str, Array] | object, rules: Iterable[Rule],
            expected_shapes: Mapping[str, tuple], *, source_name: str,
            ignore: Callable[[str], bool] = lambda k: False) -> dict[str, Array]:
  """Source tensors -> flat `{our path: array}`; every rule must apply and every source key be used."""
  rules = list(rules)
  out = {}
  for r in rules:
    if r.theirs not in source:
      raise KeyError(f"{source_name}: missing tensor {r.theirs!r} (needed for our param {r.ours!r})")
    value = r.to_ours(np.asarray(source[r.theirs]))
    want = tuple(expected_shapes.get(r.ours, ()))
    if r.ours not in expected_shapes:
      raise KeyError(f"conversion table names our param {r.ours!r}, which this model does not have")
    if tuple(value.shape) != want:
      raise ValueError(f"{source_name}: tensor {r.theirs!r} has shape {tuple(source[r.theirs].shape)}, "
                       f"which gives {tuple(value.shape)} for our {r.ours!r}; expected {want}")
    out[r.ours] = value
  used = {r.theirs for r in rules}
  unexpected = [k for k in source.keys() if k not in used and not ignore(k)]
  if unexpected:
    raise ValueError(f"{source_name}: unexpected tensors no rule maps (wrong model family or config?): "
                     f"{sorted(unexpected)[:8]}{' ...' if len(unexpected) > 8 else ''}")
  missing = sorted(set(expected_shapes) - set(out))
  if missing:
    raise KeyError(f"{source_name}: our params {missing[:8]} have no source tensor")
  return out


def to_theirs(flat_params: Mapping[str, Array], rules: Iterable[Rule]) -> dict[str, Array]:
  """Flat `{our path: array}` -> `{source key: array}`; every param must be covered by a rule."""
  rules = list(rules)
  covered = {r.ours for r in rules}
  left = sorted(set(flat_params) - covered)
  if left:
    raise KeyError(f"no conversion rule for our params {left[:8]}")
  return {r.theirs: np.ascontiguousarray(r.to_theirs(np.asarray(flat_params[r.ours]))) for r in rules}
