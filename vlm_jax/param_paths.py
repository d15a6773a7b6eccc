"""Param trees <-> flat `{path: leaf}` dicts with '/'-joined paths (`lm/layers_3/attn/q/kernel`).

The one path convention of the library: freezing and weight-decay regexes, gradient row masks, eval-time
param surgery and checkpoint conversion tables all name params this way. Imports nothing of ours.

Two layouts of a stack of identical layers (`scan_layers` on a model):
  per-layer  `lm/layers_3/attn/q/kernel`: float[D, H, Dh], one subtree per layer
  scanned    `lm/layers/attn/q/kernel`:   float[L, D, H, Dh], row i = layer i (`nn.scan`)
A `LayerStack` names one such stack; `stack_layers` / `unstack_layers` convert flat dicts between
the two, and `layer_slots` maps per-layer paths onto (scanned path, row) without touching any array, so
conversion tables, which are written per layer, serve both layouts.
"""

import dataclasses
import re
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
from flax import traverse_util


def flatten(params: Any) -> dict[str, Any]:
  return traverse_util.flatten_dict(params, sep="/")


def unflatten(flat: dict[str, Any]) -> Any:
  return traverse_util.unflatten_dict(flat, sep="/")


def matching(paths: Iterable[str], regex: str | None) -> set[str]:
  """The paths where `re.search(regex, path)` matches; an empty or None regex matches nothing."""
  if not regex:
    return set()
  pattern = re.compile(regex)
  return {p for p in paths if pattern.search(p)}


@dataclasses.dataclass(frozen=True)
class LayerStack:
  """Per-layer subtrees `per_layer.format(i=i)` for i in `indices` <-> rows 0.. of `stacked`.

  `indices` are the per-layer numbers in row order: range(L) for a decoder, the xattn layer ids
  (1, 3, 5, ...) for Flamingo's xattn blocks, which sit one per group of decoder layers.
  """

  per_layer: str   # e.g. "lm/layers_{i}"
  stacked: str     # e.g. "lm/layers"
  indices: tuple[int, ...]

  def prefixed(self, prefix: str) -> "LayerStack":
    """The same stack inside a composite model (`vision/` + the ViT's)."""
    return dataclasses.replace(self, per_layer=prefix + self.per_layer,
                               stacked=prefix + self.stacked)


def default_stacked_name(per_layer: str) -> str:
  """"lm/layers_{i}" -> "lm/layers"."""
  if "_{i}" not in per_layer:
    raise ValueError(f"per-layer pattern {per_layer!r} must contain '_{{i}}' "
                     "(e.g. 'lm/layers_{i}')")
  return per_layer.replace("_{i}", "")


def _pattern_regex(per_layer: str) -> re.Pattern:
  if per_layer.count("{i}") != 1:
    raise ValueError(f"per-layer pattern {per_layer!r} must contain '{{i}}' exactly once")
  head, tail = per_layer.split("{i}")
  return re.compile(f"^{re.escape(head)}(\\d+){re.escape(tail)}/(.+)$")


def _stack(values: Sequence[Any]) -> Any:
  if all(isinstance(v, np.ndarray) for v in values):
    return np.stack(values)
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top  (only for device arrays)

  return jnp.stack(values)


def stack_layers(flat: Mapping[str, Any], per_layer: str, stacked: str | None = None,
                 indices: Sequence[int] | None = None) -> dict[str, Any]:
  """Per-layer paths -> scanned paths with a leading layer axis; other paths pass through.

  `stack_layers(flat, "lm/layers_{i}")` turns `lm/layers_0/attn/q/kernel`, `lm/layers_1/...`, ...
  into `lm/layers/attn/q/kernel` of shape [L, ...]. Every layer must hold the same params with the
  same shapes, and the layer numbers must be exactly `indices` (default 0..L-1): a missing layer is
  an error that names it, never a silently shorter stack.
  """
  stacked = stacked or default_stacked_name(per_layer)
  regex = _pattern_regex(per_layer)
  rows: dict[str, dict[int, Any]] = {}
  out = {}
  for path, value in flat.items():
    m = regex.match(path)
    if m is None:
      out[path] = value
    else:
      rows.setdefault(m.group(2), {})[int(m.group(1))] = value
  if not rows:
    return out
  want = sorted(next(iter(rows.values()))) if indices is None else list(indices)
  for rest, by_layer in rows.items():
    if sorted(by_layer) != sorted(want):
      raise ValueError(f"stack_layers({per_layer!r}): {rest!r} exists for layers "
                       f"{sorted(by_layer)}, expected layers {want}")
    shapes = {tuple(np.shape(v)) for v in by_layer.values()}
    if len(shapes) > 1:
      raise ValueError(f"stack_layers({per_layer!r}): {rest!r} has different shapes per layer: "
                       f"{sorted(shapes)}")
    name = f"{stacked}/{rest}"
    if name in out:
      raise ValueError(f"stack_layers: {name!r} exists both stacked and per layer")
    out[name] = _stack([by_layer[i] for i in want])
  return out


def unstack_layers(flat: Mapping[str, Any], stacked: str, per_layer: str,
                   indices: Sequence[int] | None = None,
                   exclude: Sequence[str] = ()) -> dict[str, Any]:
  """Inverse of `stack_layers`: row r of every param under `stacked/` becomes
  `per_layer.format(i=indices[r])/...`. `exclude` lists sub-prefixes of `stacked` that belong to
  another stack (Flamingo's `lm/layers/xattn` inside `lm/layers`)."""
  _pattern_regex(per_layer)
  out = {}
  for path, value in flat.items():
    if not path.startswith(stacked + "/") or any(path.startswith(e + "/") for e in exclude):
      out[path] = value
      continue
    rest = path[len(stacked) + 1:]
    n = np.shape(value)[0]
    ids = range(n) if indices is None else list(indices)
    if len(ids) != n:
      raise ValueError(f"unstack_layers({stacked!r}): {path!r} has {n} rows, expected {len(ids)}")
    for row, i in enumerate(ids):
      out[f"{per_layer.format(i=i)}/{rest}"] = value[row]
  return out


def _nested(stacks: Sequence[LayerStack], stack: LayerStack) -> list[str]:
  return [s.stacked for s in stacks if s.stacked.startswith(stack.stacked + "/")]


def to_stacked(flat: Mapping[str, Any], stacks: Sequence[LayerStack]) -> dict[str, Any]:
  """Apply `stack_layers` for every stack of a model (a no-op for an empty list)."""
  out = dict(flat)
  for s in stacks:
    out = stack_layers(out, s.per_layer, s.stacked, s.indices)
  return out


def to_per_layer(flat: Mapping[str, Any], stacks: Sequence[LayerStack]) -> dict[str, Any]:
  """Apply `unstack_layers` for every stack of a model (a no-op for an empty list)."""
  out = dict(flat)
  for s in stacks:
    out = unstack_layers(out, s.stacked, s.per_layer, s.indices, exclude=_nested(stacks, s))
  return out


def layer_slots(paths: Iterable[str], stacks: Sequence[LayerStack]) -> dict[str, tuple[str, int]]:
  """{per-layer path: (scanned path, row)} for every scanned path among `paths`; names only, so a
  loader can convert and place one per-layer tensor at a time into its row of the stacked param."""
  slots = {}
  for path in paths:
    owner = [s for s in stacks if path.startswith(s.stacked + "/")]
    if not owner:
      continue
    s = max(owner, key=lambda s: len(s.stacked))  # the innermost: lm/layers/xattn over lm/layers
    rest = path[len(s.stacked) + 1:]
    for row, i in enumerate(s.indices):
      slots[f"{s.per_layer.format(i=i)}/{rest}"] = (path, row)
  return slots
