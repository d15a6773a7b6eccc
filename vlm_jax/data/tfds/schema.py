"""The stored form of a record: TFDS features per kind, and record <-> example conversion.

Stored examples are the records of `vlm_jax.data.records`, with images kept encoded so decoding
stays in the input workers:

  interleaved, pairs   {"text": Text, "images": Sequence(bytes), "id": Text}
  llava                {"conversations": Text (JSON list of {"from", "value"}),
                        "images": Sequence(bytes), "id": Text}

LLaVA records name their image by path; the builder stores the file's bytes instead, so a built
dataset does not depend on the image folder any more.

Serialization goes through TFDS's own feature encoding and `tf.train.Example` proto (no
TensorFlow needed), but with `SerializeToString(deterministic=True)`: TFDS's
`FeaturesDict.serialize_example` writes the proto's feature map in an order that changes from one
process to the next, so two builds of the same input would differ byte for byte.
"""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np
import tensorflow_datasets as tfds
from tensorflow_datasets.core import example_serializer

from vlm_jax.data.records import BadRecord, CheckedImage

KINDS = ("interleaved", "pairs", "llava")
# Version of the stored layout (a TFDS dataset version: the directory name under the dataset).
VERSION = "1.0.0"


def features(kind: str) -> tfds.features.FeaturesDict:
  """The TFDS features of a dataset of `kind` records."""
  if kind not in KINDS:
    raise ValueError(f"tfds: kind={kind!r}; expected one of {KINDS}.")
  spec = {
    "images": tfds.features.Sequence(
      tfds.features.Tensor(shape=(), dtype=np.object_),
      doc="Encoded image files (JPEG/PNG/...), one per <image> in order; decoded by the workers."),
    "id": tfds.features.Text(doc="Where the record came from, e.g. mmc4/shard_00003.jsonl:17."),
  }
  if kind == "llava":
    spec["conversations"] = tfds.features.Text(
      doc='JSON list of {"from": "human"|"gpt", "value": str} turns.')
  else:
    spec["text"] = tfds.features.Text(doc="OpenFlamingo layout with <image> and <|endofchunk|>.")
  return tfds.features.FeaturesDict(spec)


def image_bytes(item: Any, record_id: str) -> bytes:
  """One record image as encoded bytes: bytes as they are, a reader's `CheckedImage` by its
  original bytes, a path read from disk.

  Raises:
    BadRecord("image_missing"): the path cannot be read.
    TypeError: for decoded images (PIL / arrays): records to store must keep them encoded.
  """
  if isinstance(item, CheckedImage):
    return item.encoded
  if isinstance(item, (bytes, bytearray, memoryview)):
    return bytes(item)
  if isinstance(item, (str, os.PathLike)):
    try:
      with open(item, "rb") as f:
        return f.read()
    except OSError as e:
      raise BadRecord("image_missing",
                      f"{record_id}: {os.fspath(item)}: {e.strerror or e}") from None
  raise TypeError(f"tfds: record {record_id} has a {type(item).__name__} image; stored records "
                  "keep images as encoded bytes or file paths.")


def record_to_example(record: dict[str, Any], kind: str) -> dict[str, Any]:
  """A reader's record -> the feature dict stored for it (see the module docstring)."""
  record_id = str(record["id"])
  example = {"id": record_id,
             "images": [image_bytes(item, record_id) for item in record.get("images") or []]}
  if kind == "llava":
    example["conversations"] = json.dumps(record["conversations"], ensure_ascii=False,
                                          separators=(",", ":"))
  else:
    example["text"] = record["text"]
  return example


def _text(value: Any) -> str:
  return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def example_to_record(example: dict[str, Any], kind: str) -> dict[str, Any]:
  """A decoded stored example (TFDS gives text as bytes) -> the record the readers produce."""
  record = {"id": _text(example["id"]), "images": [bytes(b) for b in example["images"]]}
  if kind == "llava":
    record["conversations"] = json.loads(_text(example["conversations"]))
  else:
    record["text"] = _text(example["text"])
  return record


class Serializer:
  """Record -> deterministic serialized `tf.train.Example` bytes, as TFDS reads them back."""

  def __init__(self, kind: str):
    self.kind = kind
    self.features = features(kind)
    self._serializer = example_serializer.ExampleSerializer(self.features.get_serialized_info())

  def __call__(self, record: dict[str, Any]) -> bytes:
    encoded = self.features.encode_example(record_to_example(record, self.kind))
    return self._serializer.get_tf_example(encoded).SerializeToString(deterministic=True)
