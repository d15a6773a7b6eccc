"""Classification data (`vlm_jax.data.classification`): the synthetic shapes task draws the class
it names, deterministically; an image folder reads root/<class>/<image> with sorted classes and
skips and counts a corrupt file; a TFDS imagenet2012-format dataset (written here, ArrayRecord,
read without TensorFlow) gives its labels and skips its corrupt image; the crops are DeiT's."""

import io
import math
import os

import numpy as np
import pytest
from PIL import Image

from vlm_jax.data import classification, synthetic
from vlm_jax.data.data_config import parse
from vlm_jax.data.pipeline import make_dataset


def _png(rgb, size=(24, 20)):
  buf = io.BytesIO()
  Image.new("RGB", size, rgb).save(buf, "PNG")
  return buf.getvalue()


def _all(data, split="train", batch_size=1):
  """(images, labels, counters) of one pass over `split`."""
  it = iter(make_dataset(data, split=split, batch_size=batch_size, repeat=False,
                         process_index=0, process_count=1))
  batches = list(it)
  images = np.concatenate([b["inputs"]["images"] for b in batches])
  labels = np.concatenate([b["labels"] for b in batches])
  return images, labels, it.counters()


def _denormalise(image):
  return image * np.asarray(classification.IMAGENET_STD) * 255 + np.asarray(
    classification.IMAGENET_MEAN) * 255


# ----------------------------------------------------------------------------- shapes


def test_shapes_records_show_the_class_they_name_and_are_deterministic():
  train = classification.ShapesSource("train", num_records=40, image_size=32, seed=3)
  again = classification.ShapesSource("train", num_records=40, image_size=32, seed=3)
  held_out = classification.ShapesSource("eval", num_records=40, image_size=32, seed=3)
  palette = np.asarray(list(synthetic.COLOUR_RGB.values()), np.float64)
  labels = []
  for i in range(40):
    rec = train[i]
    np.testing.assert_array_equal(rec["image"], again[i]["image"])
    assert not np.array_equal(rec["image"], held_out[i]["image"])
    label = rec["label"]
    labels.append(label)
    name = classification.SHAPE_CLASSES[label]
    colour = synthetic.COLOURS[label % len(synthetic.COLOURS)]
    assert name == f"{colour} {synthetic.SHAPES[label // len(synthetic.COLOURS)]}"
    # The shape's pixels are the only saturated ones (the background is grey): their mean is
    # nearest to the palette colour the label names.
    img = rec["image"].astype(np.float64)
    saturated = img.max(-1) - img.min(-1) > 60
    assert saturated.sum() > 0.05 * saturated.size
    mean = img[saturated].mean(0)
    assert synthetic.COLOURS[int(np.argmin(((palette - mean) ** 2).sum(-1)))] == colour
  assert len(set(labels)) > 12 and len(classification.SHAPE_CLASSES) == 24


def test_shapes_batches_through_the_pipeline():
  data = dict(source="shapes", image_size=32, num_records=16, seed=0)
  images, labels, counters = _all(data, batch_size=8)
  assert images.shape == (16, 32, 32, 3) and images.dtype == np.float32
  assert labels.dtype == np.int32 and labels.shape == (16,)
  src = classification.ShapesSource("train", 16, 32, 0)
  # No crop, no flip: each image is its record's pixels, normalised with ImageNet's mean / std.
  by_label = {}
  for i in range(16):
    by_label.setdefault(src[i]["label"], []).append(src[i]["image"].astype(np.float32))
  for image, label in zip(images, labels):
    assert min(np.abs(_denormalise(image) - r).max() for r in by_label[int(label)]) < 1e-3
  assert counters["seen"] == 16


# ----------------------------------------------------------------------------- image folder


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
  """train/{cat,dog,eel}/ (cat: red, dog: green, eel: blue) with a corrupt dog/bad.jpg, a text file
  and a hidden file; eval/{cat,eel}/."""
  root = tmp_path_factory.mktemp("folder")
  colours = {"cat": (200, 0, 0), "dog": (0, 200, 0), "eel": (0, 0, 200)}
  for split, counts in (("train", {"cat": 3, "dog": 2, "eel": 2}), ("eval", {"cat": 1, "eel": 2})):
    for name, n in counts.items():
      d = root / split / name
      d.mkdir(parents=True)
      for i in range(n):
        (d / f"{i}.PNG").write_bytes(_png(colours[name]))
  (root / "train" / "dog" / "bad.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated, not a jpeg")
  (root / "train" / "dog" / "notes.txt").write_text("not an image")
  (root / "train" / "cat" / ".hidden.png").write_bytes(_png((9, 9, 9)))
  return root


def test_image_folder_sorted_classes_and_a_corrupt_file_skipped_and_counted(folder):
  data = dict(source="image_folder", image_size=16,
              path={"train": str(folder / "train"), "eval": str(folder / "eval")})
  src = classification.make_source(parse(data), "train")
  assert src.classes == ["cat", "dog", "eel"] and len(src) == 8  # 7 images + bad.jpg
  images, labels, counters = _all(data)  # bad.jpg (index 5) is not last in seed 0's shuffle
  assert counters["skipped/image_undecodable"] == 1 and counters["seen"] == 8
  assert sorted(labels.tolist()) == [0, 0, 0, 1, 1, 2, 2]
  # Every image is its class's solid colour: the label went with the right file.
  channel = _denormalise(images).mean((1, 2)).argmax(-1)
  np.testing.assert_array_equal(channel, labels)
  # The eval folder lacks "dog": its labels are still the train root's ids.
  _, eval_labels, _ = _all(data, "eval")
  assert sorted(eval_labels.tolist()) == [0, 2, 2]


def test_image_folder_errors_name_the_problem(folder, tmp_path):
  (tmp_path / "train" / "cat").mkdir(parents=True)
  (tmp_path / "train" / "cat" / "0.png").write_bytes(_png((1, 2, 3)))
  (tmp_path / "eval" / "unicorn").mkdir(parents=True)
  data = parse(dict(source="image_folder", image_size=16,
                    path={"train": str(tmp_path / "train"), "eval": str(tmp_path / "eval")}))
  with pytest.raises(ValueError, match="unicorn"):
    classification.make_source(data, "eval")
  with pytest.raises(ValueError, match="for split 'train' only"):
    classification.make_source(data.replace(path=str(folder / "train")), "eval")
  with pytest.raises(ValueError, match="no image files"):
    classification.ImageFolderSource(str(tmp_path / "eval"))


# ----------------------------------------------------------------------------- TFDS


def _write_imagenet_like(data_dir, labels, bad_index):
  """<data_dir>/imagenet2012/5.1.0 with imagenet2012's features, one ArrayRecord shard per split;
  the image of record `bad_index` of each split is corrupt. Image i is solid grey 20 * label."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  from array_record.python import array_record_module  # pylint: disable=g-import-not-at-top
  from tensorflow_datasets.core import example_serializer  # pylint: disable=g-import-not-at-top

  directory = os.path.join(data_dir, "imagenet2012", "5.1.0")
  os.makedirs(directory)
  features = tfds.features.FeaturesDict({
    "image": tfds.features.Image(encoding_format="jpeg"),
    "label": tfds.features.ClassLabel(num_classes=1000), "file_name": tfds.features.Text()})
  serializer = example_serializer.ExampleSerializer(features.get_serialized_info())
  infos = []
  for split, split_labels in labels.items():
    path = os.path.join(directory, f"imagenet2012-{split}.array_record-00000-of-00001")
    writer = array_record_module.ArrayRecordWriter(path, "group_size:1")
    num_bytes = 0
    for i, label in enumerate(split_labels):
      image = b"\xff\xd8 broken" if i == bad_index else _png((20 * label,) * 3, (30, 24))
      example = serializer.get_tf_example({"image": image, "label": np.int64(label),
                                           "file_name": f"n{i}.JPEG".encode()})
      data = example.SerializeToString()
      writer.write(data)
      num_bytes += len(data)
    writer.close()
    infos.append(tfds.core.SplitInfo(
      name=split, shard_lengths=[len(split_labels)], num_bytes=num_bytes,
      filename_template=tfds.core.ShardedFileTemplate(
        data_dir=directory, dataset_name="imagenet2012", split=split,
        filetype_suffix="array_record")))
  tfds.folder_dataset.write_metadata(data_dir=directory, features=features, split_infos=infos,
                                     version="5.1.0", check_data=False)


def test_tfds_imagenet2012_labels_and_a_corrupt_image_skipped(tmp_path):
  labels = {"train": [3, 1, 4, 1, 5, 9], "validation": [2, 6, 5]}
  # Record 0 is first in seed 0's shuffle: a Skip after a pass's last good record is not counted
  # (it falls in the dropped partial batch, `counting`).
  _write_imagenet_like(str(tmp_path), labels, bad_index=0)
  data = dict(source="tfds_classification", tfds_name="imagenet2012",
              tfds_data_dir=str(tmp_path), image_size=16, crop_pct=0.875)
  src = classification.make_source(parse(data), "eval")  # default: eval -> validation
  assert len(src) == 3 and src[2]["label"] == 5 and src[2]["id"].endswith("n2.JPEG")
  images, got, counters = _all(data, "eval")
  assert counters["skipped/image_undecodable"] == 1
  assert sorted(got.tolist()) == [5, 6]
  grey = _denormalise(images).mean((1, 2, 3))
  np.testing.assert_allclose(grey, 20 * got, atol=1.5)
  _, train_labels, counters = _all(data, "train")
  assert sorted(train_labels.tolist()) == [1, 1, 4, 5, 9] and counters["seen"] == 6
  with pytest.raises(ValueError, match="cannot open split 'test'"):
    classification.make_source(parse({**data, "tfds_splits": {"eval": "test"}}), "eval")


# ----------------------------------------------------------------------------- crops


def test_random_resized_crop_boxes_follow_torchvision_bounds():
  rng = np.random.default_rng(0)
  fractions = []
  for _ in range(300):
    top, left, h, w = classification.random_resized_crop_box(60, 80, rng, (0.08, 1.0))
    assert 0 <= top and top + h <= 60 and 0 <= left and left + w <= 80
    fractions.append(h * w / (60 * 80))
    if h * w < 60 * 80:  # sampled, not the fallback: ratio within 3/4..4/3 up to rounding
      assert 3 / 4 - 0.05 < w / h < 4 / 3 + 0.05
  assert min(fractions) < 0.2 and max(fractions) > 0.8
  # A very wide image cannot fit a 4/3 crop of most areas: the fallback is a centred 4/3 box.
  top, left, h, w = classification.random_resized_crop_box(
    10, 400, np.random.default_rng(1), (1.0, 1.0))
  assert (top, h, w) == (0, 10, 13) and left == (400 - 13) // 2


def test_centre_crop_is_deit_eval_resize_then_crop_and_flip_mirrors():
  rgb = np.random.default_rng(0).integers(0, 256, (40, 50, 3), dtype=np.uint8)
  t = classification.ClassificationTransform(16, crop_pct=0.875, min_side=1)
  crop = t.crop(rgb, None)
  # DeiT: Resize(floor(16 / 0.875) = 18, bicubic) of the shorter side, then CenterCrop(16).
  side = math.floor(16 / 0.875)
  resized = np.asarray(Image.fromarray(rgb).resize((int(side * 50 / 40), side),
                                                   Image.Resampling.BICUBIC))
  top, left = round((side - 16) / 2), round((resized.shape[1] - 16) / 2)
  np.testing.assert_array_equal(crop, resized[top:top + 16, left:left + 16])
  out = t.map({"image": rgb, "label": 2, "flip": True})
  np.testing.assert_allclose(_denormalise(out["images"]), crop[:, ::-1], atol=1e-3)
  assert out["labels"] == 2
  rrc = classification.ClassificationTransform(16, random_resized_crop=0.08, min_side=1)
  a, b = rrc.crop(rgb, 7), rrc.crop(rgb, 8)
  assert a.shape == (16, 16, 3) and not np.array_equal(a, b)
  np.testing.assert_array_equal(a, rrc.crop(rgb, 7))  # the record's seed decides the crop


def test_train_split_crops_are_random_per_epoch_and_replayed_on_restore():
  data = dict(source="shapes", image_size=32, num_records=4, seed=0, random_resized_crop=0.3)
  ds = make_dataset(data, split="train", batch_size=4, process_index=0, process_count=1)
  it = iter(ds)
  first = next(it)
  state = it.get_state()
  second = next(it)
  assert not np.array_equal(np.sort(first["inputs"]["images"], axis=None),
                            np.sort(second["inputs"]["images"], axis=None))
  again = iter(ds)
  again.set_state(state)
  np.testing.assert_array_equal(next(again)["inputs"]["images"], second["inputs"]["images"])
  # The eval split takes no random draws: the same images every pass.
  ev = [next(iter(make_dataset(data, split="eval", batch_size=4, process_index=0,
                               process_count=1)))["inputs"]["images"] for _ in range(2)]
  np.testing.assert_array_equal(*ev)
