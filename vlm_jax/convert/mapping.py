"""Conversion as data: a table of rules `our param path <-> source key` with a per-key transform, used in
both directions.

Each `Rule` holds the two names and a pair of inverse functions. A name may be a tuple: one source tensor
can feed several params (a fused `query_key_value` split into q, k, v) and the inverse fuses them back. Transforms cover the PyTorch -> Flax layout
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
  """`to_ours(*theirs arrays)` returns one array per name in `ours` (a bare array for a single name);
  `to_theirs` is its inverse."""

  ours: str | tuple[str, ...]
  theirs: str | tuple[str, ...]
  to_ours: Callable[..., Array | tuple[Array, ...]]
  to_theirs: Callable[..., Array | tuple[Array, ...]]

  @property
  def ours_names(self) -> tuple[str, ...]:
    return self.ours if isinstance(self.ours, tuple) else (self.ours,)

  @property
  def theirs_names(self) -> tuple[str, ...]:
    return self.theirs if isinstance(self.theirs, tuple) else (self.theirs,)


def _as_tuple(x) -> tuple:
  return x if isinstance(x, tuple) else (x,)


def identity(ours: str, theirs: str) -> Rule:
  return Rule(ours, theirs, lambda x: x, lambda x: x)


def linear(ours: str, theirs: str) -> Rule:
  """torch Linear weight [out, in] <-> kernel [in, out]."""
  return Rule(ours, theirs, lambda w: w.T, lambda k: k.T)


def linear_to_heads(ours: str, theirs: str, heads: int, head_dim: int) -> Rule:
  """torch [heads * head_dim, in] <-> kernel [in, heads, head_dim] (q, k, v projections)."""
  return Rule(ours, theirs, lambda w: w.T.reshape(w.shape[1], heads, head_dim),
              lambda k: k.reshape(k.shape[0], heads * head_dim).T)


def bias_to_heads(ours: str, theirs: str, heads: int, head_dim: int) -> Rule:
  """torch bias [heads * head_dim] <-> [heads, head_dim] (biases of head-split q, k, v kernels)."""
  return Rule(ours, theirs, lambda b: b.reshape(heads, head_dim), lambda b: b.reshape(-1))


def linear_from_heads(ours: str, theirs: str, heads: int, head_dim: int) -> Rule:
  """torch [out, heads * head_dim] <-> kernel [heads, head_dim, out] (output projections)."""
  return Rule(ours, theirs, lambda w: w.T.reshape(heads, head_dim, w.shape[0]),
              lambda k: k.reshape(heads * head_dim, k.shape[-1]).T)


def conv_kernel(ours: str, theirs: str) -> Rule:
  """torch Conv2d weight [out, in, kh, kw] (OIHW) <-> flax kernel [kh, kw, in, out] (HWIO)."""
  return Rule(ours, theirs, lambda w: np.transpose(w, (2, 3, 1, 0)),
              lambda k: np.transpose(k, (3, 2, 0, 1)))


def layernorm(ours: str, theirs: str) -> list[Rule]:
  """`{ours}/scale`, `{ours}/bias` <-> `{theirs}.weight`, `{theirs}.bias`."""
  return [identity(f"{ours}/scale", f"{theirs}.weight"), identity(f"{ours}/bias", f"{theirs}.bias")]


def linear_with_bias(ours: str, theirs: str) -> list[Rule]:
  """`{ours}/kernel`, `{ours}/bias` <-> torch Linear `{theirs}.weight`, `{theirs}.bias`."""
  return [linear(f"{ours}/kernel", f"{theirs}.weight"), identity(f"{ours}/bias", f"{theirs}.bias")]


def prefixed(rules: Iterable[Rule], ours: str = "", theirs: str = "") -> list[Rule]:
  """The same rules with `ours` prepended to our param paths and `theirs` to the source keys (a family's
  table reused inside a composite model: `lm/` + LLaMA rules, `vision_encoder.` + open_clip rules)."""
  def add(prefix, names):
    return tuple(prefix + n for n in names) if isinstance(names, tuple) else prefix + names
  return [dataclasses.replace(r, ours=add(ours, r.ours), theirs=add(theirs, r.theirs)) for r in rules]


def check_keys(source: Mapping[str, Array], rules: Iterable[Rule], *, source_name: str,
               ignore: Callable[[str], bool] = lambda k: False) -> None:
  """Names only, no tensor read: every key the rules need exists and every source key is used (or
  ignored). Run before converting so a wrong checkpoint fails in seconds, not after loading 7B params."""
  rules = list(rules)
  for r in rules:
    for t in r.theirs_names:
      if t not in source:
        raise KeyError(f"{source_name}: missing tensor {t!r} (needed for our params {r.ours_names})")
  used = {t for r in rules for t in r.theirs_names}
  unexpected = [k for k in source.keys() if k not in used and not ignore(k)]
  if unexpected:
    raise ValueError(f"{source_name}: unexpected tensors no rule maps (wrong model family or config?): "
                     f"{sorted(unexpected)[:8]}{' ...' if len(unexpected) > 8 else ''}")


def to_ours(source: Mapping[str, Array] | object, rules: Iterable[Rule],
            expected_shapes: Mapping[str, tuple], *, source_name: str,
            ignore: Callable[[str], bool] = lambda k: False,
            place: Callable[[str, Array], object] = lambda name, value: value,
            require_all: bool = True) -> dict[str, object]:
  """Source tensors -> flat `{our path: place(path, array)}`; every rule must apply and every source key
  be used. Tensors are read and converted one rule at a time and handed to `place` (e.g. a device_put
  onto the param's shards), so the host never holds the whole converted model next to the source."""
  rules = list(rules)
  check_keys(source, rules, source_name=source_name, ignore=ignore)
  out = {}
  for r in rules:
    inputs = [np.asarray(source[t]) for t in r.theirs_names]
    values = _as_tuple(r.to_ours(*inputs))
    for name, value in zip(r.ours_names, values):
      if name not in expected_shapes:
        raise KeyError(f"conversion table names our param {name!r}, which this model does not have")
      want = tuple(expected_shapes[name])
      if tuple(value.shape) != want:
        shapes = ", ".join(f"{t!r} has shape {tuple(x.shape)}" for t, x in zip(r.theirs_names, inputs))
        raise ValueError(f"{source_name}: tensor {shapes}, which gives {tuple(value.shape)} for our "
                         f"{name!r}; expected {want}")
      out[name] = place(name, value)
    del inputs, values
  missing = sorted(set(expected_shapes) - set(out))
  if require_all and missing:
    raise KeyError(f"{source_name}: our params {missing[:8]} have no source tensor")
  return out


def to_theirs(flat_params: Mapping[str, Array], rules: Iterable[Rule]) -> dict[str, Array]:
  """Flat `{our path: array}` -> `{source key: array}`; every param must be covered by a rule."""
  rules = list(rules)
  covered = {n for r in rules for n in r.ours_names}
  left = sorted(set(flat_params) - covered)
  if left:
    raise KeyError(f"no conversion rule for our params {left[:8]}")
  out = {}
  for r in rules:
    values = _as_tuple(r.to_theirs(*[np.asarray(flat_params[n]) for n in r.ours_names]))
    out.update({t: np.ascontiguousarray(v) for t, v in zip(r.theirs_names, values)})
  return out
