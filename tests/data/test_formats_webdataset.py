"""Tests for the WebDataset tar reader (vlm_jax.data.formats.webdataset) and its tar index."""

import base64
import gzip
import io
import json
import os
import pathlib

import numpy as np
import pytest
from PIL import Image

from tests.data.web_fixtures import noise_png, small_jpeg, write_tar
from vlm_jax.data import tokenizer as tok_lib
from vlm_jax.data.formats import mmc4, tar_index, transforms, webdataset
from vlm_jax.data.records import BadRecord, CheckedImage

IGN = -100


def _webp() -> bytes:
  out = io.BytesIO()
  Image.new("RGB", (8, 8), (40, 80, 235)).save(out, "WEBP")
  return out.getvalue()


LAION_MEMBERS = [
  ("000.jpg", small_jpeg()), ("000.txt", b"  A red circle. \n"),
  ("001.png", noise_png(1)), ("001.txt", b"A blue square."), ("001.json", b'{"url": "x"}'),
  ("002.txt", b"Look."),                                    # no image
  ("003.jpg", small_jpeg()),                                 # no caption
  ("004.jpeg", small_jpeg((0, 0, 0))), ("004.png", noise_png(4)), ("004.txt", b"A cross."),
  ("005.jpg", b""), ("005.txt", b"A red circle."),           # zero-byte image
  ("006.jpg", small_jpeg()), ("006.txt", b" <image> "),     # nothing left of the caption
  ("dir/007.WEBP", _webp()), ("dir/007.txt", "Ünïcode circle.".encode()),
]


def _reason(fn):
  with pytest.raises(BadRecord) as e:
    fn()
  return e.value.reason


@pytest.fixture()
def laion_shard(tmp_path):
  path = tmp_path / "laion-000.tar"
  write_tar(path, LAION_MEMBERS)
  return str(path)


def _mmc4_doc(images, sim):
  infos = [{"image_name": f"{i}.jpg", "image_base64": base64.b64encode(b).decode()}
           for i, b in enumerate(images)]
  return {"text_list": ["A red circle.", "A blue square."], "image_info": infos,
          "similarity_matrix": sim}


def test_laion_pairs_hand_checked(laion_shard):
  source = webdataset.WebDatasetSource([laion_shard], "pairs")
  assert len(source) == 8
  assert source[0] == {"text": "<image>A red circle.<|endofchunk|><|endoftext|>",
                       "images": [CheckedImage(small_jpeg())], "id": "wds/laion-000.tar:0"}
  assert [im.encoded for im in source[1]["images"]] == [noise_png(1)]  # the .json member is ignored
  # png is preferred over jpeg, whatever the order
  assert [im.encoded for im in source[4]["images"]] == [noise_png(4)]
  assert source[7] == {"text": "<image>Ünïcode circle.<|endofchunk|><|endoftext|>",
                       "images": [CheckedImage(_webp())], "id": "wds/laion-000.tar:7"}
  assert [_reason(lambda i=i: source[i]) for i in (2, 3, 5, 6)] == [
    "image_missing", "text_empty", "image_empty", "text_empty"]


def test_laion_ids_and_labels_through_transform(laion_shard):
  tokenizer = tok_lib.synthetic_tokenizer()
  transform = transforms.laion_transform(tokenizer, image_size=16)
  out = transform.map(webdataset.WebDatasetSource([laion_shard], "pairs")[0])
  ids = [tokenizer.token_to_id(w) for w in
         "<image> a red circle . <|endofchunk|> <|endoftext|>".split()]
  assert out["input_ids"].shape == (32,) and out["vision_x"].shape == (1, 16, 16, 3)
  np.testing.assert_array_equal(out["input_ids"], ids + [tok_lib.PAD_ID] * 25)
  # OF's LAION rule: only <image> and padding are masked; <eoc> and <eos> are trained.
  np.testing.assert_array_equal(out["labels"], [IGN] + ids[1:] + [IGN] * 25)


def test_mmc4_in_tar_matches_the_jsonl_builder(tmp_path):
  doc = _mmc4_doc([noise_png(0), noise_png(1)], [[0.1, 0.5], [0.5, 0.1]])
  path = tmp_path / "mmc4-000.tar"
  write_tar(path, [("a1b2.json", json.dumps(doc).encode()), ("c3d4.json", b"{oops"),
                   ("e5f6.txt", b"stray member")])
  source = webdataset.WebDatasetSource([str(path)], "interleaved")
  assert len(source) == 3
  record = source[0]
  assert record["text"] == (
    "<image>A red circle.<|endofchunk|><image>A blue square.<|endofchunk|><|endoftext|>")
  assert [im.encoded for im in record["images"]] == [noise_png(1), noise_png(0)]
  expected = mmc4.build_record(doc, index=0, record_id=record["id"], options=mmc4.MMC4Options())
  assert record == expected
  assert _reason(lambda: source[1]) == "malformed_json"
  assert _reason(lambda: source[2]) == "malformed_json"  # no .json member


def test_truncated_shard_keeps_complete_samples_and_counts_once(tmp_path, laion_shard):
  full = webdataset.WebDatasetSource([laion_shard], "pairs")
  expected = []
  for i in range(len(full)):
    try:
      expected.append(full[i])
    except BadRecord as e:
      expected.append(e.reason)
  data = pathlib.Path(laion_shard).read_bytes()
  truncated_seen = 0
  for cut in list(range(0, len(data), 97)) + [len(data) - 10240 + 1024]:
    path = tmp_path / f"cut-{cut}.tar"
    path.write_bytes(data[:cut])
    source = webdataset.WebDatasetSource([str(path)], "pairs")  # never raises
    got = []
    for i in range(len(source)):
      try:
        record = source[i]
        got.append({**record, "id": record["id"].replace(f"cut-{cut}", "laion-000")})
      except BadRecord as e:
        got.append(e.reason)
    if source.truncated_shards():
      truncated_seen += 1
      assert got[-1] == "truncated_shard" and "truncated_shard" not in got[:-1]
      assert got[:-1] == expected[:len(got) - 1]
    else:  # cut inside the zero padding after the end-of-archive blocks: nothing is lost
      assert got == expected
  assert truncated_seen > 20


def test_truncated_at_member_boundary_and_second_shard_unaffected(tmp_path, laion_shard):
  index = tar_index.index_shard(laion_shard, webdataset._SLOTS["pairs"])
  end_of_sample_1 = int(index.offsets[1, 1] + index.sizes[1, 1])  # 001.txt data end
  # Cut right after 001.json's 512-byte-padded data: headers intact, no end-of-archive blocks.
  cut = int(index.offsets[2, 1]) - 512
  assert cut > end_of_sample_1
  path = tmp_path / "cut.tar"
  path.write_bytes(pathlib.Path(laion_shard).read_bytes()[:cut])
  source = webdataset.WebDatasetSource([str(path), laion_shard], "pairs")
  # Sample 001 was complete but could have had more members after the cut: only 000 is kept.
  assert len(source) == 1 + 1 + 8
  assert source[0]["text"] == "<image>A red circle.<|endofchunk|><|endoftext|>"
  assert _reason(lambda: source[1]) == "truncated_shard"
  assert source[2]["id"] == "wds/laion-000.tar:0"


def test_empty_and_gzip_shards(tmp_path, laion_shard):
  empty = tmp_path / "empty.tar"
  empty.write_bytes(b"")
  source = webdataset.WebDatasetSource([str(empty)], "pairs")
  assert len(source) == 1 and _reason(lambda: source[0]) == "truncated_shard"
  gz = tmp_path / "laion.tar.gz"
  gz.write_bytes(gzip.compress(pathlib.Path(laion_shard).read_bytes()))
  with pytest.raises(ValueError, match="gzip"):
    webdataset.WebDatasetSource([str(gz)], "pairs")


def test_split_key_follows_webdataset():
  assert tar_index.split_key("dir/000123.JPG") == ("dir/000123", "jpg")
  assert tar_index.split_key("a.b/c.seg.png") == ("a.b/c", "seg.png")
  assert tar_index.split_key("README") is None


def test_make_source(tmp_path, laion_shard):
  source = webdataset.make_source({"paths": os.path.join(tmp_path, "*.tar"), "kind": "pairs"},
                                  "train")
  assert len(source) == 8
  with pytest.raises(ValueError, match=r"config\.data\.kind is missing"):
    webdataset.make_source({"paths": laion_shard}, "train")
  with pytest.raises(ValueError, match="kind='vqa'"):
    webdataset.make_source({"paths": laion_shard, "kind": "vqa"}, "train")
  with pytest.raises(ValueError, match="not a file"):
    webdataset.make_source({"paths": [str(tmp_path / "nope.tar")], "kind": "pairs"}, "train")
  with pytest.raises(ValueError, match=r"000\.tar' \(and 9 more\) is not a file"):
    webdataset.make_source({"paths": str(tmp_path / "{000..009}.tar"), "kind": "pairs"}, "train")
  interleaved = webdataset.make_source(
    {"paths": [laion_shard], "kind": "interleaved", "sim_threshold": 0.3}, "train")
  assert interleaved.options.sim_threshold == 0.3
