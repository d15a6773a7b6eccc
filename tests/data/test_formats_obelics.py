"""Tests for the OBELICS parquet reader (vlm_jax.data.formats.obelics)."""

import pickle

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.data.web_fixtures import noise_png, small_jpeg
from vlm_jax.data import tokenizer as tok_lib
from vlm_jax.data.formats import obelics, transforms
from vlm_jax.data.records import BadRecord, CheckedImage

IGN = -100

# Page: text, image (relative path), text, image (bytes), image (missing file), text, image (URL).
HAND_TEXTS = ["Here are some pictures.", None, "A red circle.", None, None, "A blue square.", None]
HAND_IMAGES = [None, "pics/a.png", None, noise_png(1), "pics/gone.png", None,
               "https://example.com/img/c.png?x=1"]
EXPECTED_TEXT = (
  "Here are some pictures.<image>A red circle.<|endofchunk|><image>A blue square.<|endofchunk|>"
  "<image><|endofchunk|><|endoftext|>")
ROWS = [
  (HAND_TEXTS, HAND_IMAGES),
  (["A red circle."], [None]),                                 # no image
  ([None, "A red circle."], [{"bytes": noise_png(3), "path": None}, None]),  # HF image struct
  (["A red circle.", None], [None, "pics/empty.png"]),         # only image is a zero-byte file
  (["A red circle.", None], [None, "pics/a.png"]),             # only image, nothing after it
  (["A red circle.", "A blue square."], [None, "pics/a.png"]),  # both set at position 1
  (["A red circle."], [None, None]),                           # lengths differ
]


def _struct_table(rows):
  # Mixed bytes and paths do not fit one arrow type: images are structs, as HF datasets writes them.
  struct = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
  images = []
  for _, row_images in rows:
    out = []
    for im in row_images:
      if im is None or isinstance(im, dict):
        out.append(im)
      elif isinstance(im, bytes):
        out.append({"bytes": im, "path": None})
      else:
        out.append({"bytes": None, "path": im})
    images.append(out)
  return pa.table({"texts": pa.array([t for t, _ in rows], pa.list_(pa.string())),
                   "images": pa.array(images, pa.list_(struct))})


@pytest.fixture()
def image_dir(tmp_path):
  d = tmp_path / "images"
  (d / "pics").mkdir(parents=True)
  (d / "pics" / "a.png").write_bytes(noise_png(0))
  (d / "pics" / "empty.png").write_bytes(b"")
  (d / "example.com" / "img").mkdir(parents=True)
  (d / "example.com" / "img" / "c.png?x=1").write_bytes(noise_png(2))
  return d


@pytest.fixture()
def parquet_paths(tmp_path):
  first, second = tmp_path / "obelics-000.parquet", tmp_path / "obelics-001.parquet"
  pq.write_table(_struct_table(ROWS), first, row_group_size=2)  # 4 row groups
  # OBELICS as published: images are URL strings.
  pq.write_table(pa.table({
    "texts": [["Look."], [None, "A blue square."]],
    "images": [[None], ["https://example.com/img/c.png?x=1", None]]}), second)
  return [str(first), str(second)]


def _reason(fn):
  with pytest.raises(BadRecord) as e:
    fn()
  return e.value.reason


def test_hand_checked_record(parquet_paths, image_dir):
  source = obelics.ObelicsSource(parquet_paths, obelics.ObelicsOptions(image_dir=str(image_dir)))
  record = source[0]
  # The missing image is left out; the URL resolves to image_dir/example.com/img/c.png?x=1.
  assert record["text"] == EXPECTED_TEXT
  assert [im.encoded for im in record["images"]] == [noise_png(0), noise_png(1), noise_png(2)]
  assert record["id"] == "obelics/obelics-000.parquet:0"


def test_hand_checked_ids_and_labels(parquet_paths, image_dir):
  tokenizer = tok_lib.synthetic_tokenizer()
  source = obelics.ObelicsSource(parquet_paths, obelics.ObelicsOptions(image_dir=str(image_dir)))
  out = transforms.InterleavedDocTransform(tokenizer, 16, max_text_len=24, max_images=3).map(
    source[0])
  words = ("here are some pictures . <image> a red circle . <|endofchunk|> <image> a blue square . "
           "<|endofchunk|> <image> <|endofchunk|> <|endoftext|>")
  ids = [tokenizer.token_to_id(w) for w in words.split()]
  n = len(ids)
  np.testing.assert_array_equal(out["input_ids"], ids + [tok_lib.PAD_ID] * (24 - n))
  trained = [False] * 6 + [True] * 5 + [False] + [True] * 5 + [False, True] + [False] * (1 + 24 - n)
  np.testing.assert_array_equal(out["labels"], np.where(trained, out["input_ids"], IGN))
  assert out["vision_x"].reshape(3, -1).any(-1).all()


def test_random_access_across_row_groups_and_files(parquet_paths, image_dir):
  source = obelics.ObelicsSource(parquet_paths, obelics.ObelicsOptions(image_dir=str(image_dir)),
                                 cached_row_groups=1)
  assert len(source) == len(ROWS) + 2
  assert source[2] == {"text": "<image>A red circle.<|endofchunk|><|endoftext|>",
                       "images": [CheckedImage(noise_png(3))], "id": "obelics/obelics-000.parquet:2",
                       "dropped_images": {}}
  assert source[len(ROWS) + 1] == {"text": "<image>A blue square.<|endofchunk|><|endoftext|>",
                                   "images": [CheckedImage(noise_png(2))],
                                   "id": "obelics/obelics-001.parquet:1", "dropped_images": {}}
  # Any order, after pickling (grain worker processes), gives the same records.
  clone = pickle.loads(pickle.dumps(source))
  assert clone[2] == source[2] and clone[0] == source[0]
  with pytest.raises(IndexError):
    source[len(source)]


def test_bad_rows_raise_their_reason(parquet_paths, image_dir):
  source = obelics.ObelicsSource(parquet_paths, obelics.ObelicsOptions(image_dir=str(image_dir)))
  assert [_reason(lambda i=i: source[i]) for i in (1, 3, 4, 5, 6)] == [
    "no_image", "image_empty", "image_only_at_end", "malformed_json", "malformed_json"]
  strict = obelics.ObelicsSource(parquet_paths, obelics.ObelicsOptions(
    image_dir=str(image_dir), on_bad_image="drop_record"))
  assert _reason(lambda: strict[0]) == "image_missing"


def test_min_image_bytes_and_single_image_coin():
  options = obelics.ObelicsOptions(min_image_bytes=11_000)
  assert _reason(lambda: obelics.build_record(
    [None, "A red circle."], [small_jpeg(), None], index=0, record_id="t",
    options=options)) == "image_too_small"
  # Raw bytes in the images list work too, and a big one passes the floor.
  record = obelics.build_record([None, "A red circle."], [noise_png(4), None], index=0,
                                record_id="t", options=options)
  assert [im.encoded for im in record["images"]] == [noise_png(4)]
  coin = obelics.ObelicsOptions(single_image_keep_prob=0.5)
  decisions = []
  for index in range(40):
    try:
      obelics.build_record([None, "A red circle."], [noise_png(0), None], index=index,
                           record_id="t", options=coin)
      decisions.append(True)
    except BadRecord as e:
      assert e.reason == "single_image_dropped"
      decisions.append(False)
  assert 5 < sum(decisions) < 35


def test_make_source(parquet_paths, image_dir, tmp_path):
  source = obelics.make_source({"paths": parquet_paths, "image_dir": str(image_dir),
                                "max_images": 1}, "train")
  record = source[0]
  assert record["text"] == "Here are some pictures.<image>A red circle.<|endofchunk|><|endoftext|>"
  assert [im.encoded for im in record["images"]] == [noise_png(0)]
  pq.write_table(pa.table({"text": ["x"]}), tmp_path / "wrong.parquet")
  with pytest.raises(ValueError, match=r"no column\(s\) \['texts', 'images'\]"):
    obelics.make_source({"paths": str(tmp_path / "wrong.parquet")}, "train")
  (tmp_path / "junk.parquet").write_bytes(b"not parquet")
  with pytest.raises(ValueError, match="junk.parquet"):
    obelics.make_source({"paths": [str(tmp_path / "junk.parquet")]}, "train")
  with pytest.raises(ValueError, match=r"config\.data\.paths is missing"):
    obelics.make_source({}, "train")
