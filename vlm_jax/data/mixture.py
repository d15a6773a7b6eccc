"""Several datasets in every training step (OpenFlamingo trains on LAION and MMC4 together).

Config (each component is a full `config.data` for `make_dataset`, plus its share of the step):

  config.data.mixture = {"laion": {<data config>, "batch_size": 64, "weight": 0.2},
                         "mmc4":  {<data config>, "batch_size": 32, "weight": 1.0}}
  config.data.mixture_mode = "concat" | "sample"            (default "concat")

"concat" (OpenFlamingo, reference/flamingo.md §2.1): every step takes `batch_size` examples of
each component (a GLOBAL size, like `config.batch_size`; each process reads batch_size /
process_count) and yields {"laion": <batch>, "mmc4": <batch>}, each in `make_dataset`'s layout and
shapes (1 image and 32 tokens next to 6 images and 256 tokens). The trainer applies the model
to each sub-batch and minimises
    L = sum_d weight_d * L_d,     L_d = mean CE over component d's own valid tokens
(`vlm_jax.train.losses.MixtureLoss`), OpenFlamingo's `loss_laion * w_laion + loss_mmc4 * w_mmc4`.

"sample": one batch of the trainer's batch size whose examples come from component d in proportion
weight_d, by grain's `IterDataset.mix`: it interleaves the streams deterministically in the exact
proportions (every window of sum(p) examples has p_d from d), a low-variance way to sample by
weight; the randomness is in each component's own shuffle. Examples are padded to the largest text
length and image count of the components (pad token / label -100 / zero images), so all must share
the tokenizer and image size. `batch_size` of a component is unused here.

Both are deterministic for a config and checkpointable: the iterator's state nests every component's
state, and `counters()` reports each component's records seen and skipped as "<name>/seen",
"<name>/skipped/<reason>".
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

import grain
import numpy as np

from vlm_jax.data import pipeline, streams
from vlm_jax.data.data_config import DataConfig, parse
from vlm_jax.data.interleaved import IGNORE_INDEX
from vlm_jax.data.tokenizer import PAD_TOKEN, load_tokenizer, special_token_id

MODES = ("concat", "sample")
# A concat batch is {name: batch}; these names would make it look like a plain batch.
_RESERVED = ("inputs", "labels")


def mixture_mode(data_config: DataConfig | Any) -> str | None:
  """"concat" or "sample" when `config.data.mixture` is set, else None."""
  data = parse(data_config)
  if not data.mixture:
    return None
  if data.mixture_mode not in MODES:
    raise ValueError(f"config.data.mixture_mode={data.mixture_mode!r}; expected one of {MODES}.")
  return data.mixture_mode


def _components(data_config: DataConfig | Any) -> dict[str, DataConfig]:
  components = dict(parse(data_config).mixture or {})
  if not components:
    raise ValueError("config.data.mixture is empty; give at least one component.")
  for name, cfg in components.items():
    if not isinstance(name, str) or not name or "/" in name or name in _RESERVED:
      raise ValueError(f"config.data.mixture: component name {name!r} must be a non-empty string "
                       f"without '/' and not one of {_RESERVED}.")
    if cfg.mixture:
      raise ValueError(f"config.data.mixture.{name} is itself a mixture; nesting is not supported.")
    if not cfg.weight > 0:
      raise ValueError(f"config.data.mixture.{name}.weight must be > 0, got {cfg.weight}.")
  return components


def loss_weights(data_config: DataConfig | Any) -> dict[str, float]:
  """{name: weight} of a "concat" mixture (the trainer's `MixtureLoss`); {} for anything else."""
  if mixture_mode(data_config) != "concat":
    return {}
  return {name: cfg.weight for name, cfg in _components(data_config).items()}


def batch_sizes(data_config: DataConfig | Any) -> dict[str, int]:
  """{name: global per-step batch size} of a "concat" mixture; {} for anything else."""
  if mixture_mode(data_config) != "concat":
    return {}
  out = {}
  for name, cfg in _components(data_config).items():
    size = cfg.batch_size
    if size is None or int(size) < 1:
      raise ValueError(f"config.data.mixture.{name}.batch_size must be a positive global batch "
                       f"size (concat mode), got {size}.")
    out[name] = int(size)
  return out


class Mixture(grain.IterDataset):
  """The mixed dataset; each `iter()` starts every component afresh (see the module docstring)."""

  def __init__(self, components: Mapping[str, grain.IterDataset], mode: str, *,
               weights: Mapping[str, float], batch_size: int | None = None,
               pad_example=None):
    super().__init__(list(components.values()))
    self._components, self._mode = dict(components), mode
    self._weights, self._batch_size, self._pad_example = dict(weights), batch_size, pad_example

  def __iter__(self) -> streams.Counted:
    started = {name: ds.__iter__() for name, ds in self._components.items()}
    names = list(started)
    if self._mode == "concat":
      zipped = grain.experimental.ZipIterDataset([streams.Started(it) for it in started.values()],
                                                 strict=False)
      combined = zipped.map(lambda parts: dict(zip(names, parts)))
    else:
      examples = {name: streams.Started(it).map(streams.first_example).map(self._pad_example)
                  for name, it in started.items()}
      combined = grain.IterDataset.mix(examples, self._weights).batch(self._batch_size,
                                                                      drop_remainder=True)
    return streams.Counted(combined.__iter__(), started)

  def __str__(self) -> str:
    return f"Mixture({self._mode}, weights={self._weights})"


def pad_example(example: dict, *, text_len: int, num_images: int | None, pad_id: int) -> dict:
  """One example {"inputs": {...}, "labels"} right-padded to text_len tokens, num_images images."""
  inputs = dict(example["inputs"])
  extra = text_len - inputs["input_ids"].shape[0]
  if extra:
    inputs["input_ids"] = np.pad(inputs["input_ids"], (0, extra), constant_values=pad_id)
    inputs["attention_mask"] = np.pad(inputs["attention_mask"], (0, extra))
  labels = np.pad(example["labels"], (0, extra), constant_values=IGNORE_INDEX)
  if num_images is not None and "vision_x" in inputs:
    more = num_images - inputs["vision_x"].shape[0]
    if more:
      inputs["vision_x"] = np.pad(inputs["vision_x"], [(0, more)] + [(0, 0)] * 3)
  return {"inputs": inputs, "labels": labels}


def _sample_padding(components: Mapping[str, DataConfig]) -> functools.partial:
  """The padding that gives every component's examples one shape; checks they can share a batch."""
  def same(key):
    values = {name: getattr(cfg, key) for name, cfg in components.items()}
    if len({repr(v) for v in values.values()}) > 1:
      raise ValueError(f"config.data.mixture_mode='sample' puts components in one batch, so their "
                       f"{key} must agree; got {values}.")
    return next(iter(values.values()))

  same("image_size")
  tokenizer = same("tokenizer")
  llava = [name for name, cfg in components.items() if cfg.source == "llava"]
  if llava:  # its collate orders images across the batch; examples cannot be stacked one by one
    raise ValueError(f"config.data.mixture_mode='sample' takes Flamingo-layout examples; components "
                     f"{llava} read source 'llava' (use mixture_mode='concat').")
  if len({cfg.kind == "text" for cfg in components.values()}) > 1:
    raise ValueError("config.data.mixture_mode='sample' cannot put text-only (kind='text') and "
                     "image components in one batch; use mixture_mode='concat'.")
  packed = [name for name, cfg in components.items() if cfg.packing_bins]
  if packed:
    raise ValueError(f"config.data.mixture_mode='sample' takes unpacked examples; components "
                     f"{packed} set packing_bins (pack them in mixture_mode='concat').")
  return functools.partial(
    pad_example,
    text_len=max(cfg.require("max_text_len", "mixture") for cfg in components.values()),
    num_images=max(cfg.get("max_images", 0) for cfg in components.values()),
    pad_id=special_token_id(load_tokenizer(tokenizer), PAD_TOKEN))


def make_mixture(
  data_config: DataConfig | Any,
  *,
  split: str,
  process_index: int,
  process_count: int,
  batch_size: int | None = None,
  repeat: bool = True,
) -> Mixture:
  """Builds the mixture of `config.data.mixture` (module docstring).

  Args:
    data_config: `config.data` with `mixture` and optionally `mixture_mode`.
    split: "train" or "eval", for every component.
    process_index, process_count: this process's shard (`make_dataset`, the entry point, resolves
      them).
    batch_size: PER-PROCESS batch size of a "sample" mixture (ignored by "concat", which takes each
      component's own global `batch_size`).
    repeat: as in `make_dataset`; a finite mixture ends when its first component does.

  Returns:
    A grain `IterDataset`; its iterator has `get_state`/`set_state` and `counters()`.
  """
  mode = mixture_mode(data_config)
  if mode is None:
    raise ValueError("make_mixture: config.data.mixture is not set.")
  components = _components(data_config)
  weights = {name: cfg.weight for name, cfg in components.items()}
  make = functools.partial(pipeline.make_dataset, split=split, process_index=process_index,
                           process_count=process_count, repeat=repeat)
  if mode == "concat":
    datasets = {}
    for name, size in batch_sizes(data_config).items():
      if size % process_count:
        raise ValueError(f"config.data.mixture.{name}.batch_size ({size}) must be divisible by the "
                         f"number of processes ({process_count}).")
      datasets[name] = make(components[name], batch_size=size // process_count)
    return Mixture(datasets, mode, weights=weights)
  if batch_size is None or batch_size < 1:
    raise ValueError(f"make_mixture: mixture_mode='sample' needs the per-process batch_size, got "
                     f"{batch_size}.")
  pad = _sample_padding(components)
  datasets = {name: make(cfg, batch_size=1) for name, cfg in components.items()}
  return Mixture(datasets, mode, weights=weights, batch_size=batch_size, pad_example=pad)
