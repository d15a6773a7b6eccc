"""`config.data.source = "tfds"`: records from a built TFDS ArrayRecord dataset, without TensorFlow.

The dataset is one `vlm_jax.data.tfds.builder` wrote (or any TFDS ArrayRecord dataset with the
features of `schema.features(kind)`). Fields of config.data:

  tfds_dir        the dataset's version directory (<data_dir>/<name>/<version>), read with
                  `tfds.builder_from_directory`; or else
  tfds_name       "<name>" or "<name>:<version>", found with `tfds.data_source` under
  tfds_data_dir   (optional; TFDS's default data dir otherwise)
  kind            optional "interleaved" | "pairs" | "llava"; checked against the kind the dataset
                  was built as (its metadata.json), which is used when absent
  tfds_splits     optional {split: TFDS split expression}, e.g. {"train": "train[:98%]",
                  "eval": "train[98%:]"}; default: the split of the same name

`source[i]` is the i-th stored record in the readers' schema ({"text", "images" (encoded bytes),
"id"}, or {"conversations", "images", "id"} for llava), so the pipeline's transforms apply
unchanged; records that were bad at build time are not in the dataset (their counts are in
`source.build_metadata`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import tensorflow_datasets as tfds

from vlm_jax.data import files
from vlm_jax.data.data_config import parse
from vlm_jax.data.tfds import schema

_READER = "tfds"


class TfdsRecordSource:
  """Random-access grain source over one split of a TFDS ArrayRecord dataset of records.

  Args:
    data_source: TFDS's `ArrayRecordDataSource` for the split (picklable, so it travels to grain
      worker processes).
    kind: the records' kind (`schema.KINDS`).
  """

  def __init__(self, data_source, kind: str):
    if kind not in schema.KINDS:
      raise ValueError(f"{_READER}: kind={kind!r}; expected one of {schema.KINDS}.")
    self._data_source = data_source
    self.kind = kind

  @property
  def build_metadata(self) -> dict[str, Any]:
    """What the builder recorded: kind, reader settings, per-split counts and skips ({} if none)."""
    return dict(self._data_source.dataset_info.metadata or {}).get("vlm_jax", {})

  def __len__(self) -> int:
    return len(self._data_source)

  def __getitem__(self, index: int) -> dict[str, Any]:
    index = int(index)
    if not 0 <= index < len(self):
      raise IndexError(f"{_READER}: index {index} out of range [0, {len(self)}).")
    return schema.example_to_record(self._data_source[index], self.kind)

  def __getitems__(self, indices: Sequence[int]) -> list[dict[str, Any]]:
    return [schema.example_to_record(e, self.kind)
            for e in self._data_source.__getitems__([int(i) for i in indices])]

  def __repr__(self) -> str:
    info = self._data_source.dataset_info
    return (f"TfdsRecordSource({info.name}:{info.version}, split={self._data_source.split!r}, "
            f"kind={self.kind!r}, {len(self)} records)")


def _stored_kind(info) -> str | None:
  return dict(info.metadata or {}).get("vlm_jax", {}).get("kind")


def _tfds_split(data_config: Any, split: str) -> str:
  splits = parse(data_config).tfds_splits
  if splits is None:
    return split
  try:
    return str(splits[split])
  except (KeyError, TypeError, AttributeError):
    raise ValueError(f"{_READER}: config.data.tfds_splits has no entry for split {split!r}; give "
                     f"{{{split!r}: <TFDS split, e.g. 'train[:98%]'>}}.") from None


def _data_source(data_config: Any, split_expr: str):
  """TFDS's ArrayRecordDataSource for the split, from tfds_dir or tfds_name (+ tfds_data_dir)."""
  data = parse(data_config)
  directory, name, data_dir = data.tfds_dir, data.tfds_name, data.tfds_data_dir
  if directory is not None:
    directory = files.local_path(directory)
    if not files.isfile(directory.rstrip("/") + "/dataset_info.json"):
      raise ValueError(f"{_READER}: config.data.tfds_dir={directory!r} is not a prepared TFDS "
                       "dataset version directory (no dataset_info.json).")
    where = f"tfds_dir={directory!r}"
  elif name is not None:
    data_dir = None if data_dir is None else files.local_path(data_dir)
    where = f"tfds_name={name!r} under tfds_data_dir={data_dir!r}"
  else:
    raise ValueError(f"{_READER}: give config.data.tfds_dir (a dataset version directory) or "
                     "config.data.tfds_name (+ tfds_data_dir).")
  try:
    if directory is not None:
      return tfds.builder_from_directory(directory).as_data_source(split=split_expr)
    return tfds.data_source(name, split=split_expr, data_dir=data_dir, download=False,
                            try_gcs=False)
  except Exception as e:  # DatasetNotFoundError, unknown split, not prepared, ...
    message = (str(e).strip().splitlines() or [""])[0]  # not TFDS's list of every dataset it knows
    raise ValueError(f"{_READER}: cannot open split {split_expr!r} of config.data.{where}: "
                     f"{type(e).__name__}: {message}") from e


def make_source(data_config: Any, split: str) -> TfdsRecordSource:
  """The source for `split` from config.data (fields in the module docstring)."""
  data_source = _data_source(data_config, _tfds_split(data_config, split))
  stored = _stored_kind(data_source.dataset_info)
  kind = parse(data_config).kind
  if kind is None:
    if stored is None:
      raise ValueError(f"{_READER}: the dataset does not record its kind; set config.data.kind "
                       f"to one of {schema.KINDS}.")
    kind = stored
  elif stored is not None and kind != stored:
    raise ValueError(f"{_READER}: config.data.kind={kind!r} but the dataset was built as "
                     f"{stored!r} records.")
  return TfdsRecordSource(data_source, kind)
