"""Shard patterns as OpenFlamingo users write them (brace ranges, lists, globs) and remote paths for
every reader and the TFDS writer, on local files and on fsspec's in-memory file system (which stands
in for gs:// / s3://: the same fsspec calls, no network)."""

from __future__ import annotations

import os
import uuid

import fsspec
import pytest

from tests.data import dirt
from tests.data.web_fixtures import write_tar
from vlm_jax.data import files, images
from vlm_jax.data.formats import llava_json, mmc4, obelics, webdataset
from vlm_jax.data.pipeline import make_dataset
from vlm_jax.data.records import BadRecord
from vlm_jax.data.tfds import builder


def _upload(local_dir, prefix: str) -> str:
  """Copies a local folder tree to memory://<prefix>/ and returns that URL."""
  fs = fsspec.filesystem("memory")
  for root, _, names in os.walk(local_dir):
    for name in names:
      path = os.path.join(root, name)
      rel = os.path.relpath(path, local_dir).replace(os.sep, "/")
      fs.pipe_file(f"/{prefix}/{rel}", open(path, "rb").read())
  return f"memory://{prefix}"


@pytest.fixture(scope="module")
def trees(tmp_path_factory):
  """The dirt corpus laid out locally as MMC4 jsonl (3 shards), WebDataset tars, OBELICS parquet
  and LLaVA JSON, and the same tree uploaded to memory://."""
  root = tmp_path_factory.mktemp("remote")
  docs = dirt.documents()
  image_dir = root / "images"
  image_dir.mkdir()
  for doc in docs:
    for name, data in doc.files.items():
      (image_dir / name).write_bytes(data)
  for s in range(3):
    (root / f"mmc4-{s:03d}.jsonl").write_bytes(b"\n".join(d.line for d in docs[s::3]) + b"\n")
  b64 = dirt.documents(with_base64=True)
  for s in range(2):
    write_tar(root / f"wds-{s:06d}.tar", [(f"{i:06d}.json", d.line) for i, d in
                                          enumerate(b64[s::2])])
  import json  # pylint: disable=g-import-not-at-top

  (root / "llava.json").write_text(json.dumps([
    {"id": str(i), "image": f"images/{name}", "conversations": [
      {"from": "human", "value": "<image>\nWhat?"}, {"from": "gpt", "value": "d0 s0"}]}
    for i, name in enumerate(sorted(os.listdir(image_dir))[:6])] + [
    {"id": "gone", "image": "images/none.png", "conversations": [
      {"from": "human", "value": "<image>\nWhat?"}, {"from": "gpt", "value": "d0 s0"}]}]))
  import pyarrow as pa  # pylint: disable=g-import-not-at-top
  import pyarrow.parquet as pq  # pylint: disable=g-import-not-at-top

  rows = [{"texts": [None, dirt.sentence(i, 0)],
           "images": [{"bytes": dirt.IMAGE_KINDS["rgb_png"].build(i, 0), "path": None}, None]}
          for i in range(5)]
  rows.append({"texts": [None, "x"], "images": [{"bytes": None, "path": "images/nope.png"}, None]})
  pq.write_table(pa.Table.from_pylist(rows), root / "obelics-000.parquet", row_group_size=2)
  remote = _upload(root, f"bucket-{uuid.uuid4().hex[:8]}")
  return {"local": str(root), "remote": remote, "docs": docs}


def _records(source, base):
  """Every record (the reason for a bad one), image paths made relative to `base` (LLaVA records
  name their image files, which are decoded later; the bytes are compared too)."""
  out = []
  for i in range(len(source)):
    try:
      record = source[i]
    except BadRecord as e:
      out.append(e.reason)
      continue
    named = [im for im in record["images"] if isinstance(im, str)]
    pixels = []
    for im in named:
      try:
        pixels.append(images.decode_image(im).tobytes())
      except BadRecord as e:
        pixels.append(e.reason)
    out.append({**record, "images": [im.replace(base, "<base>") if isinstance(im, str) else im
                                     for im in record["images"]], "pixels": pixels})
  return out


def test_expand_brace_ranges_lists_and_globs_locally_and_remotely(trees):
  for base in (trees["local"], trees["remote"]):
    found, missing = files.expand(base + "/mmc4-{000..002}.jsonl")
    assert [files.basename(p) for p in found] == ["mmc4-000.jsonl", "mmc4-001.jsonl",
                                                  "mmc4-002.jsonl"] and not missing
    found, missing = files.expand(base + "/{wds-00000[01].tar,mmc4-00[12].jsonl}")
    assert [files.basename(p) for p in found] == ["wds-000000.tar", "wds-000001.tar",
                                                  "mmc4-001.jsonl", "mmc4-002.jsonl"]
    found, missing = files.expand(base + "/mmc4-{000..004}.jsonl")
    assert len(found) == 3 and [files.basename(p) for p in missing] == ["mmc4-003.jsonl",
                                                                        "mmc4-004.jsonl"]
    assert files.expand(base + "/*.nothing") == ([], [base + "/*.nothing"])
  with pytest.raises(ValueError, match=r"mmc4-003\.jsonl' \(and 1 more\) is not a file"):
    mmc4.make_source({"paths": trees["remote"] + "/mmc4-{000..004}.jsonl"}, "train")


@pytest.mark.parametrize("reader", ["mmc4", "webdataset", "obelics", "llava"])
def test_every_reader_gives_the_same_records_from_a_remote_tree(trees, reader):
  def source(base):
    if reader == "mmc4":
      return mmc4.make_source({**dirt.CONFIG, "paths": [base + "/mmc4-{000..002}.jsonl"],
                               "image_dir": base + "/images"}, "train")
    if reader == "webdataset":
      return webdataset.make_source({**dirt.CONFIG, "paths": base + "/wds-{000000..000001}.tar",
                                     "kind": "interleaved"}, "train")
    if reader == "obelics":
      return obelics.make_source({**dirt.CONFIG, "paths": {"train": base + "/obelics-*.parquet"},
                                  "image_dir": base}, "train")
    return llava_json.make_source({"path": base + "/llava.json"}, "train")

  local = _records(source(trees["local"]), trees["local"])
  remote = _records(source(trees["remote"]), trees["remote"])
  assert len(local) == len(remote) > 5
  assert remote == local
  assert sum(isinstance(r, dict) for r in remote) >= 5 and any(isinstance(r, str) for r in remote)


def test_make_dataset_from_a_remote_brace_range_matches_local(trees):
  def batches(base):
    config = {**dirt.CONFIG, "source": "mmc4", "tokenizer": "synthetic",
              "paths": {"train": base + "/mmc4-{000..002}.jsonl"}, "image_dir": base + "/images"}
    it = iter(make_dataset(config, split="train", batch_size=2, process_index=0, process_count=1,
                           repeat=False))
    return [b["inputs"]["vision_x"].tobytes() for b in it], it.counters()

  assert batches(trees["remote"]) == batches(trees["local"])


def test_tfds_build_uploads_to_a_remote_data_dir(trees, tmp_path):
  config = {"paths": {"train": trees["local"] + "/mmc4-{000..002}.jsonl"},
            "image_dir": trees["local"] + "/images", "min_image_bytes": 0}
  local = builder.RecordsBuilder("mmc4", config, tmp_path / "local").build()
  target = f"memory://out-{uuid.uuid4().hex[:8]}"
  remote_builder = builder.RecordsBuilder("mmc4", config, target)
  remote = remote_builder.build()
  assert remote["splits"] == local["splits"]
  fs, root = files.filesystem(remote_builder.dataset_dir)
  local_dir = tmp_path / "local" / "mmc4" / "1.0.0"
  names = sorted(os.listdir(local_dir))
  assert sorted(files.basename(p) for p in fs.ls(root, detail=False)) == names
  for name in names:
    if name.endswith(".array_record-00000-of-00001"):  # the records themselves: byte-identical
      assert fs.cat_file(f"{root}/{name}") == (local_dir / name).read_bytes()
  with pytest.raises(FileExistsError):
    builder.RecordsBuilder("mmc4", config, target).build()
