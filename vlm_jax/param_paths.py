"""Param trees <-> flat `{path: leaf}` dicts with '/'-joined paths (`lm/layers_3/attn/q/kernel`).

The one path convention of the library: freezing and weight-decay regexes, gradient row masks, eval-time
param surgery and checkpoint conversion tables all name params this way. Imports nothing of ours.
"""

import re
from typing import Any, Iterable

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
