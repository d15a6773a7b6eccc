"""Image classification data: image -> class index, for classifiers such as `models.lavit`.

Sources (`config.data.source`), each a random-access source of records
{"image": path | encoded bytes | uint8[H, W, 3], "label": int, "id": str}:

  shapes               the embedded task: one shape of `synthetic.SHAPES` in one colour of
                       `synthetic.COLOURS` drawn by `synthetic.render_shape_image` (size and position
                       random), class = shape x colour (24 classes, `SHAPE_CLASSES`). Each record is a
                       pure function of (seed, split, index), so train and eval never share an image.
  image_folder         `config.data.path` = {split: root} (a plain root is the train split only),
                       root/<class name>/<image file>; classes are the sorted sub-folders of the train
                       root (torchvision's ImageFolder order), files with an image extension, sorted.
  tfds_classification  a prepared TFDS dataset with "image" and "label" features, e.g. imagenet2012:
                       `tfds_name` (+ `tfds_data_dir`) or `tfds_dir`, read with `tfds.data_source`
                       (ArrayRecord format: `tfds build imagenet2012 --file_format=array_record`),
                       nothing downloaded; images come back encoded (TFDS's decoder skipped), so
                       decoding is ours. `tfds_splits` default {"train": "train", "eval": "validation"}.

Every image goes through `images.decode_image` in the transform, so a missing, corrupt or oversized
file becomes a `Skip` counted under its reason (`records`, `counting`); nothing reaches the loop.

Transform (DeiT's, without RandAugment / Mixup / CutMix / random erasing / repeated augmentation):
  train, with `random_resized_crop` = s:  torchvision's RandomResizedCrop(S, scale=(s, 1),
      ratio=(3/4, 4/3)), bicubic; the crop is drawn from the record's "crop_seed" (`CropSeed`, a
      per-record draw the pipeline makes for the train split only, so restores replay it)
  otherwise (eval, or no random crop):  resize the shorter side to floor(S / crop_pct) (bicubic),
      centre crop S x S (crop_pct None: 1, the CLIP crop; DeiT evaluates with 0.875)
  train, with `random_flip` = p:  horizontal flip with probability p (the pipeline's `JointFlip`)
  then (x / 255 - mean) / std with ImageNet's mean / std, float32.

Batches: {"inputs": {"images": float32[B, S, S, 3]}, "labels": int32[B]}.
"""

from __future__ import annotations

import math
import os
from typing import Any

import grain
import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

from vlm_jax.data import files, streams, synthetic
from vlm_jax.data.data_config import DataConfig
from vlm_jax.data.formats import config_fields
from vlm_jax.data.images import clip_preprocess, decode_image
from vlm_jax.data.records import Skip

SOURCES = ("shapes", "image_folder", "tfds_classification")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# torchvision's IMG_EXTENSIONS (datasets/folder.py), matched case-insensitively.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
SHAPE_CLASSES: tuple[str, ...] = tuple(f"{colour} {shape}" for shape in synthetic.SHAPES
                                       for colour in synthetic.COLOURS)
DEFAULT_TFDS_SPLITS = {"train": "train", "eval": "validation"}
RRC_RATIO = (3 / 4, 4 / 3)
_SHAPES_STREAM = 101  # folded into the seed: independent of the synthetic corpus' kinds (0..4)


class ShapesSource:
  """The embedded shape x colour task; `SHAPE_CLASSES[label]` names a record's class."""

  classes = SHAPE_CLASSES

  def __init__(self, split: str = "train", num_records: int = 100_000, image_size: int = 64,
               seed: int = 0):
    if split not in synthetic.SPLITS:
      raise ValueError(f"shapes: split {split!r} is not one of {synthetic.SPLITS}")
    if num_records <= 0 or image_size < 16 or seed < 0:
      raise ValueError(f"shapes: need num_records > 0, image_size >= 16 and seed >= 0; got "
                       f"{num_records}, {image_size}, {seed}")
    self.split, self.num_records, self.image_size, self.seed = split, num_records, image_size, seed

  def __len__(self) -> int:
    return self.num_records

  def __repr__(self) -> str:
    return (f"ShapesSource(split={self.split!r}, num_records={self.num_records}, "
            f"image_size={self.image_size}, seed={self.seed})")

  def __getitem__(self, index: int) -> dict[str, Any]:
    index = int(index)
    if not 0 <= index < self.num_records:
      raise IndexError(f"shapes: index {index} out of range [0, {self.num_records})")
    rng = np.random.default_rng([self.seed, synthetic.SPLITS.index(self.split), _SHAPES_STREAM,
                                 index])
    shape = int(rng.integers(len(synthetic.SHAPES)))
    colour = int(rng.integers(len(synthetic.COLOURS)))
    size = synthetic.SIZES[int(rng.integers(len(synthetic.SIZES)))]
    position = synthetic.POSITIONS[int(rng.integers(len(synthetic.POSITIONS)))]
    image = synthetic.render_shape_image(rng, self.image_size, synthetic.SHAPES[shape],
                                         synthetic.COLOURS[colour], size, position)
    return {"image": image, "label": shape * len(synthetic.COLOURS) + colour,
            "id": f"shapes:{self.split}:{index}"}


def folder_classes(root: str) -> list[str]:
  """The sorted sub-folder names of `root` (hidden ones left out)."""
  if not os.path.isdir(root):
    raise ValueError(f"image_folder: {root!r} is not a directory")
  classes = sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))
  if not classes:
    raise ValueError(f"image_folder: {root!r} has no class sub-folders (root/<class>/<image>)")
  return classes


class ImageFolderSource:
  """root/<class>/<image>: records in class order, files sorted within a class.

  classes: the class list that fixes the label ids (default: `folder_classes(root)`); a sub-folder
  of root that is not in it is an error (its images would get no label or a wrong one).
  """

  def __init__(self, root: str, classes: list[str] | None = None):
    root = files.local_path(root)
    found = folder_classes(root)
    self.classes = list(classes) if classes is not None else found
    unknown = sorted(set(found) - set(self.classes))
    if unknown:
      raise ValueError(f"image_folder: {root!r} has class folders {unknown[:5]} that the train "
                       f"root does not have ({len(self.classes)} classes)")
    self.root = root
    self._paths, labels = [], []
    for label, name in enumerate(self.classes):
      folder = os.path.join(root, name)
      if not os.path.isdir(folder):
        continue  # a class without images in this split
      names = sorted(e.name for e in os.scandir(folder)
                     if not e.name.startswith(".") and e.name.lower().endswith(IMAGE_EXTENSIONS))
      self._paths += [os.path.join(folder, n) for n in names]
      labels += [label] * len(names)
    if not self._paths:
      raise ValueError(f"image_folder: no image files ({', '.join(IMAGE_EXTENSIONS)}) under "
                       f"{root!r}")
    self._labels = np.asarray(labels, np.int32)

  def __len__(self) -> int:
    return len(self._paths)

  def __repr__(self) -> str:
    return f"ImageFolderSource({self.root!r}, {len(self.classes)} classes, {len(self)} images)"

  def __getitem__(self, index: int) -> dict[str, Any]:
    path = self._paths[int(index)]
    return {"image": path, "label": int(self._labels[int(index)]), "id": path}


class TfdsClassificationSource:
  """One split of a prepared TFDS dataset with "image" (encoded) and "label" features."""

  def __init__(self, data_source):
    self._data_source = data_source
    features = data_source.dataset_info.features
    missing = [k for k in ("image", "label") if k not in features]
    if missing:
      raise ValueError(f"tfds_classification: {data_source.dataset_info.name} has no feature(s) "
                       f"{missing}; it has {sorted(features)}")
    self.num_classes = getattr(features["label"], "num_classes", None)

  def __len__(self) -> int:
    return len(self._data_source)

  def __repr__(self) -> str:
    info = self._data_source.dataset_info
    return (f"TfdsClassificationSource({info.name}:{info.version}, "
            f"split={self._data_source.split!r}, {len(self)} records)")

  def __getitem__(self, index: int) -> dict[str, Any]:
    example = self._data_source[int(index)]
    name = example.get("file_name", index)
    name = name.decode("utf-8", "replace") if isinstance(name, bytes) else name
    return {"image": bytes(example["image"]), "label": int(example["label"]),
            "id": f"{self._data_source.dataset_info.name}:{self._data_source.split}:{name}"}


def _tfds_data_source(data: DataConfig, split: str):
  """TFDS's data source for `split` (`tfds_dir`, or `tfds_name` + `tfds_data_dir`), images left
  encoded."""
  splits = data.get("tfds_splits", DEFAULT_TFDS_SPLITS)
  try:
    expr = str(splits[split])
  except (KeyError, TypeError, AttributeError):
    raise ValueError(f"tfds_classification: config.data.tfds_splits has no entry for split "
                     f"{split!r}; give {{{split!r}: <TFDS split, e.g. 'validation'>}}") from None
  if data.tfds_dir is None:
    data.require("tfds_name", "tfds_classification")
  where = (f"tfds_dir={data.tfds_dir!r}" if data.tfds_dir is not None else
           f"tfds_name={data.tfds_name!r} under tfds_data_dir={data.tfds_data_dir!r}")
  decoders = {"image": tfds.decode.SkipDecoding()}  # encoded bytes: `decode_image` decodes
  try:
    if data.tfds_dir is not None:
      return tfds.builder_from_directory(files.local_path(data.tfds_dir)).as_data_source(
        split=expr, decoders=decoders)
    data_dir = None if data.tfds_data_dir is None else files.local_path(data.tfds_data_dir)
    return tfds.data_source(data.tfds_name, split=expr, data_dir=data_dir, download=False,
                            try_gcs=False, decoders=decoders)
  except Exception as e:  # DatasetNotFoundError, not prepared as ArrayRecord, unknown split, ...
    message = (str(e).strip().splitlines() or [""])[0]  # not TFDS's list of every dataset
    raise ValueError(f"tfds_classification: cannot open split {expr!r} of config.data.{where} "
                     f"(prepared in ArrayRecord format?): {type(e).__name__}: {message}") from e


def make_source(data: DataConfig, split: str):
  """config.data (`source` one of SOURCES) -> the random-access source of `split`."""
  if data.source == "shapes":
    return ShapesSource(split, data.num_records, data.require("image_size", "shapes"), data.seed)
  if data.source == "image_folder":
    root = config_fields.split_value(data, "path", split, reader="image_folder")
    try:  # the train root's classes fix the label ids of every split
      train_root = config_fields.split_value(data, "path", "train", reader="image_folder")
    except ValueError:  # no train root given: this split's own folders
      train_root = None
    classes = folder_classes(files.local_path(train_root)) if train_root else None
    return ImageFolderSource(root, classes)
  if data.source == "tfds_classification":
    return TfdsClassificationSource(_tfds_data_source(data, split))
  raise ValueError(f"config.data.source={data.source!r} is not a classification source {SOURCES}")


class CropSeed(grain.transforms.RandomMap):
  """record -> record with "crop_seed", the draw its random resized crop is made from."""

  def random_map(self, element: Any, rng: np.random.Generator) -> Any:
    if isinstance(element, Skip):
      return element
    return {**element, "crop_seed": int(rng.integers(2**63))}


def random_resized_crop_box(height: int, width: int, rng: np.random.Generator,
                            scale: tuple[float, float], ratio: tuple[float, float] = RRC_RATIO
                            ) -> tuple[int, int, int, int]:
  """torchvision's RandomResizedCrop.get_params: (top, left, h, w) covering a fraction in `scale`
  of the area with aspect ratio w / h in `ratio` (log-uniform); 10 tries, then the whole image
  clamped to `ratio`, centred."""
  area = height * width
  log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
  for _ in range(10):
    target = area * rng.uniform(*scale)
    aspect = math.exp(rng.uniform(*log_ratio))
    w, h = int(round(math.sqrt(target * aspect))), int(round(math.sqrt(target / aspect)))
    if 0 < w <= width and 0 < h <= height:
      return int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1)), h, w
  in_ratio = width / height
  if in_ratio < min(ratio):
    w, h = width, int(round(width / min(ratio)))
  elif in_ratio > max(ratio):
    h, w = height, int(round(height * max(ratio)))
  else:
    w, h = width, height
  return (height - h) // 2, (width - w) // 2, h, w


class ClassificationTransform(grain.transforms.Map):
  """record -> {"images": float32[S, S, 3], "labels": int32}; see the module docstring."""

  def __init__(self, image_size: int, *, random_resized_crop: float | None = None,
               crop_pct: float | None = None, mean=IMAGENET_MEAN, std=IMAGENET_STD,
               **decode_checks):
    if random_resized_crop is not None and not 0.0 < random_resized_crop <= 1.0:
      raise ValueError(f"config.data.random_resized_crop={random_resized_crop} must be the "
                       "smallest crop area fraction, in (0, 1] (DeiT: 0.08)")
    if crop_pct is not None and not 0.0 < crop_pct <= 1.0:
      raise ValueError(f"config.data.crop_pct={crop_pct} must be in (0, 1] (DeiT: 0.875)")
    self.image_size, self.min_scale = image_size, random_resized_crop
    self.crop_pct = 1.0 if crop_pct is None else crop_pct
    self.mean, self.std, self.decode_checks = tuple(mean), tuple(std), decode_checks

  def crop(self, rgb: np.ndarray, crop_seed: int | None) -> np.ndarray:
    """uint8[H, W, 3] -> uint8[S, S, 3]: the random resized crop (with a seed) or the centre crop."""
    s = self.image_size
    if self.min_scale is not None and crop_seed is not None:
      top, left, h, w = random_resized_crop_box(*rgb.shape[:2], np.random.default_rng(crop_seed),
                                                (self.min_scale, 1.0))
      patch = rgb[top:top + h, left:left + w]
      if patch.shape[:2] == (s, s):
        return np.ascontiguousarray(patch)
      return np.asarray(Image.fromarray(patch).resize((s, s), Image.Resampling.BICUBIC))
    resized = clip_preprocess(rgb, int(math.floor(s / self.crop_pct)), normalize=False)
    offset = round((resized.shape[0] - s) / 2.0)
    return np.ascontiguousarray(resized[offset:offset + s, offset:offset + s])

  def map(self, record: dict[str, Any]) -> dict[str, Any]:
    rgb = decode_image(record["image"], **self.decode_checks)
    crop = self.crop(rgb, record.get("crop_seed"))
    if record.get("flip"):
      crop = crop[:, ::-1]
    image = clip_preprocess(np.ascontiguousarray(crop), self.image_size, self.mean, self.std)
    return {"images": image, "labels": np.int32(record["label"])}


def source_transform_collate(data: DataConfig, split: str):
  """(source, transform, collate) of a classification `config.data` for `split`."""
  if data.image_dtype != "float32":
    raise ValueError(f"{data.source}: config.data.image_dtype={data.image_dtype!r}; classification "
                     "batches are normalised float32 (the classifiers do not normalise on device)")
  transform = ClassificationTransform(
    data.require("image_size", data.source), random_resized_crop=data.random_resized_crop,
    crop_pct=data.crop_pct, min_side=data.min_image_side, max_pixels=data.max_image_pixels,
    max_bytes=data.max_image_bytes)
  return make_source(data, split), transform, streams.collate
