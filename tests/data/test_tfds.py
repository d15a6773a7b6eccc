"""TFDS ArrayRecord datasets of records: built from MMC4 jsonl, LAION tars and LLaVA JSON, read
back through tfds (no TensorFlow) equal to what the direct readers give, bad records counted at
build time, byte-identical output whatever the worker count, the pipeline's transforms unchanged."""

import base64
import collections
import json
import os
import pickle
import sys

import grain
import numpy as np
import pytest

from tests.data.web_fixtures import noise_png, write_tar
from vlm_jax.data.formats import llava_json, mmc4, webdataset
from vlm_jax.data.formats import transforms as web_transforms
from vlm_jax.data.pipeline import SkippingSource
from vlm_jax.data.records import DROPPED_KEY, BadRecord, CheckedImage, Skip, skipping
from vlm_jax.data.tfds import build as build_cli
from vlm_jax.data.tfds import builder, source
from vlm_jax.data.tokenizer import load_tokenizer


def _stored_form(record):
  """A reader's record as the TFDS build stores it: images by their encoded bytes, no counts."""
  return {**{k: v for k, v in record.items() if k != DROPPED_KEY},
          "images": [im.encoded if isinstance(im, CheckedImage) else im
                     for im in record.get("images") or []]}


def _direct(src):
  """(good records in index order, in their stored form; Counter of skip reasons) from a direct
  reader."""
  good, skipped = [], collections.Counter()
  for i in range(len(src)):
    try:
      good.append(_stored_form(src[i]))
    except BadRecord as e:
      skipped[e.reason] += 1
  return good, skipped


def _read_all(src):
  return [src[i] for i in range(len(src))]


@pytest.fixture(scope="module")
def laion(tmp_path_factory):
  """Two LAION shards (sample 5: corrupt JPEG, sample 9: empty caption) and a truncated third."""
  root = tmp_path_factory.mktemp("laion")
  for s in range(3):
    members = []
    for k in range(10):
      i = s * 10 + k
      image = b"\xff\xd8\xff\xe0 not really a jpeg" if i == 5 else noise_png(i, 16)
      caption = b"" if i == 9 else f"a red circle {i}".encode()
      members += [(f"{i:06d}.png", image), (f"{i:06d}.txt", caption)]
    path = root / f"shard-{s:05d}.tar"
    write_tar(path, members)
  cut = root / "shard-00002.tar"
  cut.write_bytes(cut.read_bytes()[:5000])  # ends inside a member
  return {"kind": "pairs", "paths": {"train": str(root / "shard-*.tar"),
                                     "eval": [str(root / "shard-00001.tar")]}}


@pytest.fixture(scope="module")
def mmc4_config(tmp_path_factory):
  """MMC4 train/eval shards: two-image documents, single-image ones (OF's coin), one whose images
  all miss the similarity threshold, and a line that is not JSON."""
  root = tmp_path_factory.mktemp("mmc4")

  def doc(d, sims):
    infos = [{"image_name": f"{d}_{k}.png", "matched_text_index": k, "matched_sim": 0.3,
              "image_base64": base64.b64encode(noise_png(100 * d + k)).decode()}
             for k in range(len(sims))]
    return json.dumps({"text_list": [f"sentence {d} {j}." for j in range(3)], "image_info": infos,
                       "similarity_matrix": sims})

  two = [[0.5, 0.1, 0.1], [0.1, 0.5, 0.1]]
  lines = [doc(d, two) for d in range(6)] + [doc(6, [[0.3, 0.1, 0.1]]), doc(7, [[0.1, 0.3, 0.1]]),
                                             doc(8, [[0.1, 0.1, 0.1]]), "{not json"]
  (root / "docs_00000.jsonl").write_text("\n".join(lines[:5]) + "\n")
  (root / "docs_00001.jsonl").write_text("\n".join(lines[5:]) + "\n")
  (root / "val_00000.jsonl").write_text("\n".join(doc(20 + d, two) for d in range(3)) + "\n")
  return {"paths": {"train": str(root / "docs_*.jsonl"), "eval": str(root / "val_*.jsonl")}}


def test_laion_tars_round_trip_equal_to_the_reader_with_skips_in_metadata(laion, tmp_path):
  b = builder.RecordsBuilder("webdataset", laion, tmp_path, shard_size=7)
  metadata = b.build()
  assert b.dataset_dir == str(tmp_path / "webdataset_pairs" / "1.0.0")
  for split in ("train", "eval"):
    reader = webdataset.make_source(laion, split)
    good, skipped = _direct(reader)
    stored = source.make_source({"tfds_dir": b.dataset_dir}, split)
    assert stored.kind == "pairs"
    assert _read_all(stored) == good  # text, encoded image bytes and id, index by index
    counts = stored.build_metadata["splits"][split]
    assert counts == metadata["splits"][split]
    assert counts["source_records"] == len(reader) and counts["written"] == len(good)
    assert counts["skipped"] == dict(skipped)
  assert metadata["splits"]["train"]["skipped"] == {
    "image_undecodable": 1, "text_empty": 1, "truncated_shard": 1}
  assert metadata["splits"]["eval"]["skipped"] == {}
  assert "wds/shard-00000.tar:9" in metadata["splits"]["train"]["skipped_examples"]["text_empty"][0]


def test_mmc4_round_trip_by_name_with_openflamingo_semantics_applied_once(mmc4_config, tmp_path):
  metadata = builder.RecordsBuilder("mmc4", mmc4_config, tmp_path, shard_size=4).build()
  assert metadata["reader_options"]["sim_threshold"] == 0.24
  for split in ("train", "eval"):
    good, skipped = _direct(mmc4.make_source(mmc4_config, split))
    stored = source.make_source(
      {"tfds_name": "mmc4", "tfds_data_dir": str(tmp_path), "kind": "interleaved"}, split)
    records = _read_all(stored)
    assert records == good
    assert stored.build_metadata["splits"][split]["skipped"] == dict(skipped)
  train = metadata["splits"]["train"]
  assert train["skipped"]["malformed_json"] == 1 and train["skipped"]["no_image"] == 1
  assert train["written"] + sum(train["skipped"].values()) == train["source_records"] == 10


def test_build_is_byte_identical_whatever_the_worker_count(mmc4_config, tmp_path):
  dirs = []
  for workers in (1, 2):
    b = builder.RecordsBuilder("mmc4", mmc4_config, tmp_path / f"w{workers}", shard_size=3,
                               workers=workers)
    b.build()
    dirs.append(b.dataset_dir)
  names = sorted(os.listdir(dirs[0]))
  assert names == sorted(os.listdir(dirs[1]))
  assert sum(n.startswith("mmc4-train.array_record-") for n in names) == 4  # ceil(10 / 3)
  for name in names:
    contents = []
    for d in dirs:
      with open(os.path.join(d, name), "rb") as f:
        contents.append(f.read())
    assert contents[0] == contents[1], name
  assert "tensorflow" not in sys.modules


def test_llava_conversations_keep_their_image_bytes(tmp_path):
  images = tmp_path / "images"
  images.mkdir()
  (images / "a.png").write_bytes(noise_png(1, 32))
  turns = [{"from": "human", "value": "<image>\nWhat is it?"}, {"from": "gpt", "value": "Noise."}]
  entries = [{"id": "a", "image": "a.png", "conversations": turns},
             {"id": "b", "image": "missing.png", "conversations": turns},
             {"id": "c", "conversations": [{"from": "human", "value": "Hi"},
                                           {"from": "gpt", "value": "Hello, ünïcode."}]}]
  path = tmp_path / "llava.json"
  path.write_text(json.dumps(entries))
  config = {"path": str(path), "image_dir": str(images)}
  b = builder.RecordsBuilder("llava", config, tmp_path / "tfds")
  metadata = b.build()
  assert metadata["splits"]["train"]["skipped"] == {"image_missing": 1}
  stored = source.make_source({"tfds_dir": b.dataset_dir}, "train")
  good, _ = _direct(llava_json.make_source(config, "train"))
  got = _read_all(stored)
  assert [r["conversations"] for r in got] == [r["conversations"] for r in good]
  assert [r["id"] for r in got] == [r["id"] for r in good]
  assert got[0]["images"] == [(images / "a.png").read_bytes()] and got[1]["images"] == []


def test_pipeline_transforms_apply_unchanged(laion, tmp_path):
  b = builder.RecordsBuilder("webdataset", laion, tmp_path)
  b.build()
  stored = source.make_source({"tfds_dir": b.dataset_dir, "tfds_splits": {"train": "train[:12]"}},
                              "train")
  assert len(stored) == 12
  stored = pickle.loads(pickle.dumps(stored))  # grain ships sources to worker processes
  transform = web_transforms.laion_transform(load_tokenizer("synthetic"), 16)
  ds = grain.MapDataset.source(SkippingSource(stored)).map(skipping(transform))
  examples = list(ds.to_iter_dataset(grain.ReadOptions(num_threads=2)))
  direct, _ = _direct(webdataset.make_source(laion, "train"))
  assert not any(isinstance(e, Skip) for e in examples)
  for got, record in zip(examples, direct[:12], strict=True):
    want = transform.map(record)
    assert got.keys() == want.keys()
    for key in want:
      np.testing.assert_array_equal(got[key], want[key])


def test_cli_builds_with_progress_and_refuses_to_overwrite(laion, tmp_path, capsys):
  argv = ["--source", "webdataset", "--kind", "pairs",
          "--paths", f"train={laion['paths']['train']}",
          "--paths", f"eval={laion['paths']['eval'][0]}",
          "--out", str(tmp_path), "--name", "laion", "--shard_size", "8"]
  assert build_cli.main(argv) == 0
  out, err = capsys.readouterr()
  summary = json.loads(out.strip().splitlines()[-1])
  assert summary["dataset_dir"] == str(tmp_path / "laion" / "1.0.0")
  written = {split: len(_direct(webdataset.make_source(laion, split))[0])
             for split in ("train", "eval")}
  assert {s: c["written"] for s, c in summary["splits"].items()} == written
  # The tqdm line's postfix.
  assert f"written={sum(written.values())}" in err and "text_empty:1" in err
  with pytest.raises(FileExistsError, match="--overwrite"):
    build_cli.main(argv)
  assert build_cli.main(argv + ["--overwrite", "--set", "seed=3"]) == 0
  assert not [n for n in os.listdir(tmp_path / "laion") if n.startswith("incomplete")]


def test_reading_errors_name_the_field(laion, tmp_path):
  b = builder.RecordsBuilder("webdataset", laion, tmp_path)
  b.build()
  with pytest.raises(ValueError, match="built as 'pairs'"):
    source.make_source({"tfds_dir": b.dataset_dir, "kind": "interleaved"}, "train")
  with pytest.raises(ValueError, match="Unknown split 'validation'"):
    source.make_source({"tfds_dir": b.dataset_dir}, "validation")
  with pytest.raises(ValueError, match="tfds_dir"):
    source.make_source({"tfds_dir": str(tmp_path)}, "train")
  with pytest.raises(ValueError, match="tfds_name"):
    source.make_source({}, "train")
  with pytest.raises(ValueError, match="kind"):
    builder.RecordsBuilder("webdataset", {"paths": laion["paths"]}, tmp_path)
