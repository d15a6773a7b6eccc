"""`config.data`, read once: a frozen, typed `DataConfig` that every part of the pipeline receives.

`parse(config.data)` runs at `make_dataset`'s entry (and at the other public entry points that take
a data config: `mixture.loss_weights` / `batch_sizes`, the TFDS builder, each reader's `make_source`).
Sources, transforms, mixtures and packing then read attributes, never the raw config, so there is
one reading of each field, one default, and one meaning of `None` for it (its comment below).

An unknown or misspelt key fails at once, naming it, the closest known fields and the whole list:
`config.data.imgae_size is not a data field (did you mean 'image_size'?)`.

Fields (None = "not set": the default of the reader or the transform that reads it, named):

  source            synthetic | mmc4 | obelics | webdataset | llava | tfds, or a classification
                    source: shapes | image_folder | tfds_classification (`classification`)
  tokenizer         "synthetic", a tokenizer.json path or directory, or "openflamingo:DIR"
  kind              synthetic: interleaved | text | pairs | vqa; webdataset: pairs | interleaved;
                    tfds: checked against the built kind
  paths             shard pattern(s): pattern, list, or {split: pattern | list}   (mmc4, obelics,
                    webdataset; see `formats.config_fields.shard_paths`)
  path              llava: the conversation file, or {split: file}; image_folder: {split: root}
  image_dir         images named by the records (mmc4, obelics, llava)
  tfds_dir | tfds_name, tfds_data_dir, tfds_splits     (tfds, see `tfds.source`)
  image_size        image side S (None: required by every source with images)
  max_images        image slots T_img (None: 6 for MMC4/OBELICS documents, 1 for pairs)
  max_text_len      tokens T (None: 256 for documents, 32 for LAION pairs; required otherwise)
  num_image_tokens  llava: the image run length P
  template          llava conversation template: vicuna_v1 | llama3 | plain (None: vicuna_v1);
                    with source synthetic it turns kind pairs | vqa | hires into LLaVA conversations
  image_token_id    llava: the image-run id (None: the tokenizer's "<image>"; -200 for the
                    liuhaotian layout with a plain Vicuna tokenizer)
  system, bos_token, eos_token, pad_token   llava: the template's system prompt and special tokens
                    (None: `llava.LlavaTransform`'s defaults; bos_token "" = no BOS)
  hires_size        synthetic hires: the drawn image side (None: 6 * image_size); the transform
                    resizes it to image_size
  hires_target_frac synthetic hires: (lo, hi), the target's side as a fraction of hires_size
  ori_sizes, answer_rows   llava: add each image's original (w, h) / the answer-predicting rows to
                    the model inputs (FlexAttention's margins and training path)
  num_records, seed synthetic corpus size; shuffle / coin seed
  sim_threshold, matching, min_image_bytes, single_image_keep_prob, on_bad_image
                    the interleaved readers (`formats.doc_options`, `formats.mmc4`); None: the
                    reader's default (OpenFlamingo's values for MMC4)
  min_image_side, max_image_pixels, max_image_bytes    image checks (`images`); for the two
                    maxima None means no limit
  image_dtype       float32 | uint8;   random_flip   probability, train split only
  random_resized_crop  classification, train split: smallest crop area fraction (DeiT 0.08;
                    None: no random crop);   crop_pct   classification centre crop: resize the
                    shorter side to S / crop_pct first (None: 1.0; DeiT evaluates at 0.875)
  num_threads, prefetch_buffer_size, num_workers, worker_buffer_size, skip_log_every   loading
  packing_bins      0: no packing (`packing`)
  mixture, mixture_mode    {name: component data config}, concat | sample (`mixture`)
  batch_size, weight       a mixture component's global batch size and loss weight
"""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Mapping
from typing import Any

from vlm_jax.data import images

_ANY = object()  # a field whose value is kept as given (patterns, mappings)


@dataclasses.dataclass(frozen=True)
class DataConfig:
  """See the module docstring; build it with `parse`."""

  source: str | None = None
  tokenizer: str | None = None
  kind: str | None = None
  paths: Any = None
  path: Any = None
  image_dir: str | None = None
  tfds_dir: str | None = None
  tfds_name: str | None = None
  tfds_data_dir: str | None = None
  tfds_splits: Any = None
  image_size: int | None = None
  max_images: int | None = None
  max_text_len: int | None = None
  num_image_tokens: int | None = None
  template: str | None = None
  image_token_id: int | None = None
  system: str | None = None
  bos_token: str | None = None
  eos_token: str | None = None
  pad_token: str | None = None
  hires_size: int | None = None
  hires_target_frac: tuple = (0.02, 0.04)
  ori_sizes: bool = False
  answer_rows: bool = False
  num_records: int = 100_000
  seed: int = 0
  sim_threshold: float | None = None
  matching: str | None = None
  min_image_bytes: int | None = None
  single_image_keep_prob: float | None = None
  on_bad_image: str | None = None
  min_image_side: int = images.DEFAULT_MIN_SIDE
  max_image_pixels: int | None = images.DEFAULT_MAX_PIXELS
  max_image_bytes: int | None = images.DEFAULT_MAX_BYTES
  # "uint8": images leave the pipeline resized and cropped, the ViT normalises them on the device;
  # 4x fewer bytes through worker processes and host-to-device copies.
  image_dtype: str = "float32"
  # OpenFlamingo: RandomHorizontalFlip(0.5) on all images of a sample together. Off for the
  # synthetic corpus, whose captions say "left" / "right".
  random_flip: float = 0.0
  random_resized_crop: float | None = None
  crop_pct: float | None = None
  num_threads: int = 8
  # Batch-level prefetching: a few batches ahead is plenty, and each batch holds B * T_img images.
  prefetch_buffer_size: int = 16
  num_workers: int = 0
  worker_buffer_size: int = 4
  skip_log_every: int = 1000
  packing_bins: int = 0
  mixture: Mapping[str, DataConfig] | None = None
  mixture_mode: str = "concat"
  batch_size: int | None = None
  weight: float = 1.0

  def require(self, name: str, reader: str) -> Any:
    """The field's value; a ValueError naming `config.data.<name>` and the reader when unset."""
    value = getattr(self, name)
    if value is None:
      raise ValueError(f"{reader}: config.data.{name} is missing; the {reader} reader needs it.")
    return value

  def get(self, name: str, default: Any) -> Any:
    """The field's value, or `default` when it is None (not set)."""
    value = getattr(self, name)
    return default if value is None else value

  def replace(self, **changes) -> DataConfig:
    return dataclasses.replace(self, **changes)


FIELDS = tuple(f.name for f in dataclasses.fields(DataConfig))
_TYPES = {"int": int, "float": float, "str": str}


def _coerce(name: str, value: Any, where: str) -> Any:
  """`value` as the field's declared type (int / float / str, None where the field allows it)."""
  declared = DataConfig.__dataclass_fields__[name].type
  if value is None or declared == "Any" or name == "mixture":
    return value
  kind = declared.split(" | ")[0]
  if kind not in _TYPES:
    return value
  try:
    if kind == "int" and isinstance(value, float) and not value.is_integer():
      raise ValueError("not a whole number")
    if kind == "str" and not isinstance(value, str):
      raise ValueError(f"a {type(value).__name__}")
    return _TYPES[kind](value)
  except (TypeError, ValueError) as e:
    raise ValueError(f"{where}.{name}={value!r} is not a valid {kind} ({e}).") from None


def _items(config: Any, where: str) -> dict[str, Any]:
  if isinstance(config, Mapping):
    return dict(config)
  if hasattr(config, "items"):  # ConfigDict / FrozenConfigDict
    return dict(config.items())
  raise ValueError(f"{where} must be a mapping of data fields, got {type(config).__name__}.")


def parse(config: Any, where: str = "config.data") -> DataConfig:
  """`config.data` (ConfigDict, mapping, or an already parsed DataConfig) -> DataConfig.

  Raises:
    ValueError: naming `<where>.<key>` for an unknown key (with the closest known fields) or a
      value of the wrong type.
  """
  if isinstance(config, DataConfig):
    return config
  values = _items(config, where)
  unknown = [k for k in values if k not in FIELDS]
  if unknown:
    key = unknown[0]
    close = difflib.get_close_matches(key, FIELDS, n=3)
    hint = f" (did you mean {', '.join(repr(c) for c in close)}?)" if close else ""
    raise ValueError(f"{where}.{key} is not a data field{hint}; the fields are: "
                     f"{', '.join(FIELDS)}.")
  kwargs = {k: _coerce(k, v, where) for k, v in values.items()}
  mixture = kwargs.get("mixture")
  if mixture is not None:
    components = _items(mixture, f"{where}.mixture")
    kwargs["mixture"] = {name: parse(cfg, f"{where}.mixture.{name}")
                         for name, cfg in components.items()} or None
    if not components:
      raise ValueError(f"{where}.mixture is empty; give at least one component.")
  return DataConfig(**kwargs)


def as_dict(config: DataConfig) -> dict[str, Any]:
  """The fields that are set (not None), for logs and build metadata."""
  out = {}
  for name in FIELDS:
    value = getattr(config, name)
    if name == "mixture" and value is not None:
      value = {k: as_dict(v) for k, v in value.items()}
    if value is not None:
      out[name] = value
  return out
