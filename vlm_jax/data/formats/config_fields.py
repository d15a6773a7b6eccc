"""The file fields of a parsed `config.data` (`data_config.DataConfig`), with errors that name the
field or file.

Every reader's `make_source(data_config, split)` reads its shard list through `shard_paths` (and
LLaVA's file through `split_value`, image folders through `image_dir`), so an empty glob or a
missing file fails at construction with the field name and what was expected, not with a KeyError
deep inside a worker.

`config.data.paths` is a pattern, a list of patterns, or a mapping from split to either
(`{"train": "mmc4/*.jsonl", "eval": ["mmc4/val_0.jsonl"]}`). A pattern is a path, a glob, or a
WebDataset / OpenFlamingo brace range (`gs://bucket/mmc4/{000000000..000001023}.tar`), local or
remote (`vlm_jax.data.files`). A plain pattern or list is the train split only: an eval run against
it is refused rather than silently evaluating on training data.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

from vlm_jax.data import files
from vlm_jax.data.data_config import DataConfig, parse


def _expand(pattern: str, reader: str) -> list[str]:
  found, missing = files.expand(os.fspath(pattern))
  if missing:
    more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
    raise ValueError(f"{reader}: config.data.paths {os.fspath(pattern)!r}: {missing[0]!r}{more} "
                     "is not a file or matches no files.")
  return found


def split_value(config: DataConfig | Any, name: str, split: str, *, reader: str,
                single: tuple[type, ...] = (str, os.PathLike)) -> Any:
  """config.data.<name> for `split`: a mapping {split: value}, or one value (an instance of
  `single`) that is used for split "train" only (an eval run against it is refused).

  Raises:
    ValueError: if the field is missing, has no entry for `split`, or is one value and split is not
      "train".
  """
  value = parse(config).require(name, reader)
  if isinstance(value, single) and not isinstance(value, Mapping):
    if split != "train":
      raise ValueError(
        f"{reader}: config.data.{name} is not a {{split: ...}} mapping, so it is used for split "
        f"'train' only; for split {split!r} give a mapping {{'train': ..., {split!r}: ...}}.")
    return value
  try:
    return value[split]  # a mapping (dict or ConfigDict) from split to value
  except (KeyError, TypeError, AttributeError):
    raise ValueError(f"{reader}: config.data.{name} has no entry for split {split!r}; give "
                     f"{{{split!r}: ...}}.") from None


def shard_paths(config: DataConfig | Any, split: str, *, reader: str) -> list[str]:
  """The shard files of `split`, in a fixed order (brace order, sorted within each glob, list order
  between).

  Raises:
    ValueError: if `paths` is missing, names no file, or has no entry for `split`.
  """
  paths = split_value(config, "paths", split, reader=reader, single=(str, os.PathLike, Sequence))
  patterns = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
  if not patterns:
    raise ValueError(f"{reader}: config.data.paths for split {split!r} is an empty list.")
  out = []
  for pattern in patterns:
    out.extend(_expand(pattern, reader))
  return out


def image_dir(config: DataConfig | Any, *, reader: str) -> str | None:
  """config.data.image_dir (optional), checked to be a directory when given."""
  path = parse(config).image_dir
  if path is None:
    return None
  path = files.local_path(path)
  if not files.isdir(path):
    raise ValueError(f"{reader}: config.data.image_dir={path!r} is not a directory.")
  return path
