"""The dirt corpus (`tests/data/dirt.py`) through every reader and the full `make_dataset` pipeline
with a real (byte-level BPE) tokenizer: no exception, the exact survivors, the counts per reason, and
the k-th `<image>` token of every batch row holding the k-th image of its own document."""

from __future__ import annotations

import collections
import json
import tarfile
import warnings

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from tests.data import dirt
from tests.data.web_fixtures import write_tar
from vlm_jax.data import images, tokenizer as tok_lib
from vlm_jax.data.formats import mmc4, obelics, webdataset
from vlm_jax.data.pipeline import make_dataset
from vlm_jax.data.records import BadRecord
from vlm_jax.data.tfds import builder


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
  root = tmp_path_factory.mktemp("dirt")
  docs = dirt.documents()
  jsonl, image_dir = dirt.write_mmc4(root, docs)
  return {"root": root, "docs": docs, "jsonl": jsonl, "image_dir": image_dir,
          "tokenizer": dirt.train_bpe_tokenizer(root / "tokenizer")}


def _expected_counts(docs):
  skipped = collections.Counter(d.skip for d in docs if d.skip)
  dropped = collections.Counter()
  for d in docs:
    dropped.update(d.dropped)
  return ({f"skipped/{k}": v for k, v in skipped.items()},
          {f"dropped_images/{k}": v for k, v in dropped.items()})


def _all_batches(config):
  it = iter(make_dataset(config, split="train", batch_size=1, process_index=0, process_count=1,
                         repeat=False))
  return list(it), it.counters()


def _check_rows(batches, docs, tokenizer_spec):
  """Every row: its images' fingerprints are its own document's survivors, in order, and the text
  after the k-th <image> is the sentence the k-th image was matched to. Returns the docs seen."""
  tok, ids = tok_lib.tokenizer_and_special_ids(tokenizer_spec)
  specials = {ids["media"], ids["endofchunk"], ids["pad"], tok.token_to_id("<|endoftext|>")}
  seen = []
  for batch in batches:
    vision = batch["inputs"]["vision_x"][0]
    input_ids = batch["inputs"]["input_ids"][0]
    media = np.flatnonzero(input_ids == ids["media"])
    prints = [dirt.read_fingerprint(vision[k]) for k in range(len(media))]
    doc = prints[0][0]
    assert all(p[0] == doc for p in prints), prints  # no image from another document
    survivors = docs[doc].survivors
    assert [p for _, p in prints] == [p for p, _ in survivors], (doc, prints)
    assert not vision[len(media):].any()  # padded slots are zero
    for k, start in enumerate(media):
      end = start + 1
      while end < len(input_ids) and int(input_ids[end]) not in specials:
        end += 1
      text = tok.decode(input_ids[start + 1:end].tolist()).strip()
      assert text.startswith(f"d{doc} s{survivors[k][1]} "), (doc, k, text)
    seen.append(doc)
  return seen


# ----------------------------------------------------------------------------- images alone


@pytest.mark.parametrize("kind", list(dirt.IMAGE_KINDS))
def test_each_image_kind_is_kept_with_its_pixels_or_refused_with_its_reason(kind):
  spec = dirt.IMAGE_KINDS[kind]
  data = spec.build(5, 3)
  if data is None:
    return  # "missing" is a file that does not exist: the readers' business
  if spec.reason is None:
    checked = images.check_image(data, size=32)
    assert checked.encoded == data and checked.pixels.shape == (32, 32, 3)
    assert dirt.read_fingerprint(checked.pixels) == (5, 3)
  else:
    with pytest.raises(BadRecord) as e:
      images.check_image(data, size=32)
    assert e.value.reason == spec.reason


def test_the_bomb_of_the_issue_is_refused_from_its_header_whatever_pil_is_set_to(monkeypatch):
  bomb = dirt.full_png_bomb()  # valid 20000 x 20000 1-bit PNG, 48.7 kB
  assert len(bomb) < 50_000
  for pil_limit in (Image.MAX_IMAGE_PIXELS, None, 10**12):  # programs do switch PIL's guard off
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", pil_limit)
    with pytest.raises(BadRecord) as e:
      images.check_image(bomb, size=32)
    assert e.value.reason == "image_too_large"
  with warnings.catch_warnings():
    warnings.simplefilter("error")  # DecompressionBombWarning as an exception
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 50_000_000)
    with pytest.raises(BadRecord) as e:
      images.check_image(dirt.png_header_only(8000, 8000), size=32, max_pixels=None)
    assert e.value.reason == "image_too_large"
  # Our limit is configurable: a 1000 x 1000 image passes the default and fails a 0.5 M budget.
  monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)
  big = dirt.png_header_only(1000, 1000)
  with pytest.raises(BadRecord) as e:
    images.check_image(big, size=32, max_pixels=500_000)
  assert e.value.reason == "image_too_large"


# ----------------------------------------------------------------------------- MMC4 jsonl


def test_mmc4_reader_keeps_documents_and_leaves_bad_images_out(corpus):
  docs = corpus["docs"]
  options = mmc4.MMC4Options.from_config({**dirt.CONFIG, "image_dir": corpus["image_dir"]})
  source = mmc4.MMC4Source([corpus["jsonl"]], options)
  assert len(source) == len(docs)
  for i, doc in enumerate(docs):
    try:
      record = source[i]
    except BadRecord as e:
      assert (e.reason, e.dropped_images) == (doc.skip, doc.dropped), i
      continue
    assert doc.skip is None, (i, doc.skip)
    assert record["dropped_images"] == doc.dropped, i
    prints = [dirt.read_fingerprint(im.pixels) for im in record["images"]]
    assert {p[0] for p in prints} == {i}
    assert record["text"].count("<image>") == len(record["images"])
    # Before tokenization no truncation has happened yet: survivors are a prefix of what is here.
    assert [p for _, p in prints][:len(doc.survivors)] == [p for p, _ in doc.survivors], i


def test_make_dataset_mmc4_exact_survivors_counts_and_alignment(corpus):
  docs = corpus["docs"]
  config = {**dirt.CONFIG, "source": "mmc4", "paths": {"train": corpus["jsonl"]},
            "image_dir": corpus["image_dir"], "tokenizer": corpus["tokenizer"]}
  batches, counters = _all_batches(config)
  seen = _check_rows(batches, docs, corpus["tokenizer"])
  assert sorted(seen) == [i for i, d in enumerate(docs) if d.survivors is not None]
  skipped, dropped = _expected_counts(docs)
  assert counters == {"seen": len(docs), **skipped, **dropped}
  assert len(set(skipped) | set(dropped)) >= 10  # the corpus exercises many reasons


def test_drop_record_policy_drops_every_document_with_a_bad_image(corpus):
  options = mmc4.MMC4Options.from_config(
    {**dirt.CONFIG, "image_dir": corpus["image_dir"], "on_bad_image": "drop_record"})
  source = mmc4.MMC4Source([corpus["jsonl"]], options)
  for i, kind in enumerate(dirt.IMAGE_KINDS):  # the first documents: one per image kind
    reason = dirt.IMAGE_KINDS[kind].reason
    if reason is None:
      assert len(source[i]["images"]) == 3
    else:
      with pytest.raises(BadRecord) as e:
        source[i]
      assert e.value.reason == reason


# ----------------------------------------------------------------------------- WebDataset tars


@pytest.fixture(scope="module")
def wds_shards(corpus):
  root = corpus["root"] / "wds"
  root.mkdir()
  docs = dirt.documents(with_base64=True)  # images inside the json member, as OF's converter
  good = root / "mmc4-000.tar"
  write_tar(good, [(f"{i:06d}.json", d.line) for i, d in enumerate(docs)])
  # A shard cut in the middle of its third member: the first sample stays (the second is complete
  # but is the last before the cut, which tar_index does not trust), the damage counts once.
  cut = root / "mmc4-001.tar"
  extra = [dirt.documents(with_base64=True)[0], dirt.documents(with_base64=True)[2]]
  write_tar(cut, [(f"{i:06d}.json", d.line) for i, d in enumerate(extra * 2)])
  with tarfile.open(cut) as tar:
    third = tar.getmembers()[2]
  cut.write_bytes(cut.read_bytes()[: third.offset_data + third.size // 2])
  return docs, [str(good), str(cut)], extra[:1]


def test_make_dataset_webdataset_interleaved_with_a_truncated_shard(corpus, wds_shards):
  docs, paths, extra = wds_shards
  config = {**dirt.CONFIG, "source": "webdataset", "kind": "interleaved",
            "paths": {"train": paths}, "tokenizer": corpus["tokenizer"]}
  source = webdataset.make_source(config, "train")
  assert source.truncated_shards() and len(source) == len(docs) + 2
  batches, counters = _all_batches(config)
  seen = _check_rows(batches, docs, corpus["tokenizer"])
  want = sorted([i for i, d in enumerate(docs) if d.survivors is not None] + [0])
  assert sorted(seen) == want
  skipped, dropped = _expected_counts(docs + extra)
  skipped["skipped/truncated_shard"] = 1
  assert counters == {"seen": len(docs) + 2, **skipped, **dropped}


def test_webdataset_pairs_each_image_kind(corpus):
  root = corpus["root"] / "laion"
  root.mkdir()
  members, expected = [], collections.Counter()
  for i, (kind, spec) in enumerate(dirt.IMAGE_KINDS.items()):
    data = spec.build(i, 0)
    if data is not None:
      members.append((f"{i:06d}.png", data))
    members.append((f"{i:06d}.txt", dirt.sentence(i, 0).encode()))
    if spec.reason:
      expected[f"skipped/{spec.reason}"] += 1
  n = len(dirt.IMAGE_KINDS)
  members += [(f"{n:06d}.png", dirt.IMAGE_KINDS["rgb_png"].build(n, 0)),
              (f"{n:06d}.txt", b"\xff\xfe caf\xe9")]  # a caption that is not UTF-8: kept, repaired
  write_tar(root / "pairs-000.tar", members)
  config = {**dirt.CONFIG, "source": "webdataset", "kind": "pairs",
            "paths": {"train": str(root / "pairs-000.tar")}, "tokenizer": corpus["tokenizer"]}
  batches, counters = _all_batches(config)
  prints = [dirt.read_fingerprint(b["inputs"]["vision_x"][0, 0]) for b in batches]
  want = [(i, 0) for i, s in enumerate(dirt.IMAGE_KINDS.values()) if s.reason is None] + [(n, 0)]
  assert sorted(prints) == want
  assert counters == {"seen": n + 1, **expected}


def test_tar_member_that_is_not_utf8_json_is_counted(corpus):
  root = corpus["root"] / "badjson"
  root.mkdir()
  good = dirt.documents(with_base64=True)[0].line
  write_tar(root / "x-000.tar", [("000000.json", b"\xff\xfe{not json"), ("000001.json", good),
                                 ("000002.json", b'{"text_list": 5}')])
  source = webdataset.WebDatasetSource([str(root / "x-000.tar")], "interleaved",
                                       mmc4.MMC4Options.from_config(dirt.CONFIG))
  reasons = []
  for i in range(len(source)):
    try:
      source[i]
      reasons.append(None)
    except BadRecord as e:
      reasons.append(e.reason)
  assert reasons == ["malformed_json", None, "malformed_json"]


# ----------------------------------------------------------------------------- OBELICS parquet


def test_obelics_rows_and_a_row_group_with_a_null_column(corpus):
  root = corpus["root"] / "obelics"
  root.mkdir()
  rows, want = [], []
  for i, (kind, spec) in enumerate(dirt.IMAGE_KINDS.items()):
    texts, imgs = [], []
    for k, this in enumerate(["rgb_png", kind, "rgb_png"]):
      data = dirt.IMAGE_KINDS[this].build(i, k)
      texts += [None, dirt.sentence(i, k)]
      imgs += [{"bytes": data, "path": None} if data is not None else
               {"bytes": None, "path": f"http://x/{i}_{k}.jpg"}, None]
    rows.append({"texts": texts, "images": imgs})
    want.append([0, 2] if spec.reason else [0, 1, 2])
  image_type = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
  schema = pa.schema([("texts", pa.list_(pa.string())), ("images", pa.list_(image_type))])
  pq.write_table(pa.Table.from_pylist(rows, schema), root / "good.parquet", row_group_size=7)
  # A second file whose row group has a null `texts` column (a broken export).
  broken = [{"texts": None, "images": r["images"]} for r in rows[:3]]
  pq.write_table(pa.Table.from_pylist(broken, schema), root / "broken.parquet")
  config = {**dirt.CONFIG, "source": "obelics",
            "paths": {"train": [str(root / "good.parquet"), str(root / "broken.parquet")]},
            "tokenizer": corpus["tokenizer"], "image_dir": str(root)}
  source = obelics.make_source(config, "train")
  for i, positions in enumerate(want):
    record = source[i]
    assert [dirt.read_fingerprint(im.pixels) for im in record["images"]] == [
      (i, p) for p in positions]
  batches, counters = _all_batches(config)
  assert sorted(dirt.read_fingerprint(b["inputs"]["vision_x"][0, 0])[0] for b in batches) == list(
    range(len(rows)))
  dropped = collections.Counter(s.reason for s in dirt.IMAGE_KINDS.values() if s.reason)
  assert counters == {"seen": len(rows) + 3, "skipped/malformed_json": 3,
                      **{f"dropped_images/{k}": v for k, v in dropped.items()}}


# ----------------------------------------------------------------------------- LLaVA JSON


def test_llava_json_each_image_kind(corpus):
  root = corpus["root"] / "llava"
  root.mkdir()
  entries, expected = [], collections.Counter()
  for i, (kind, spec) in enumerate(dirt.IMAGE_KINDS.items()):
    data = spec.build(i, 0)
    if data is not None:
      (root / f"{i}.img").write_bytes(data)
    entries.append({"id": str(i), "image": f"{i}.img", "conversations": [
      {"from": "human", "value": "<image>\nWhat is it?"}, {"from": "gpt", "value": f"d{i} s0"}]})
    if spec.reason:
      expected[f"skipped/{spec.reason}"] += 1
  entries += [{"id": "x", "conversations": "not a list"}, ["not", "an", "object"],
              {"id": "y", "image": "0.img", "conversations": []}]
  expected.update({"skipped/malformed_json": 2, "skipped/text_empty": 1})
  (root / "data.json").write_text(json.dumps(entries))
  config = {"source": "llava", "path": str(root / "data.json"), "image_dir": str(root),
            "tokenizer": _llava_tokenizer(corpus), "image_size": 32, "max_text_len": 512,
            "num_image_tokens": 4, "num_threads": 2, "seed": 0}
  batches, counters = _all_batches(config)
  prints = sorted(dirt.read_fingerprint(b["inputs"]["images"][0]) for b in batches)
  assert prints == [(i, 0) for i, s in enumerate(dirt.IMAGE_KINDS.values()) if s.reason is None]
  assert counters == {"seen": len(entries), **expected}


def _llava_tokenizer(corpus):
  """The corpus BPE with LLaVA's tokens (`<s>`, `</s>`, `<unk>`, `<image>`) as specials."""
  from tokenizers import Tokenizer

  path = corpus["root"] / "llava_tokenizer.json"
  if not path.exists():
    tok = Tokenizer.from_file(str(corpus["root"] / "tokenizer" / "tokenizer.json"))
    tok.add_special_tokens(["<s>", "</s>", "<unk>", "<image>"])
    tok.save(str(path))
  return str(path)


# ----------------------------------------------------------------------------- TFDS build


def test_tfds_build_of_the_dirt_counts_once_and_trains_the_same(corpus, tmp_path):
  docs = corpus["docs"]
  config = {**{k: v for k, v in dirt.CONFIG.items() if k not in ("num_threads", "image_dtype")},
            "paths": {"train": corpus["jsonl"]}, "image_dir": corpus["image_dir"]}
  metadata = builder.RecordsBuilder("mmc4", config, tmp_path).build()
  split = metadata["splits"]["train"]
  # At build time no tokenizer runs: documents the transform would drop are still written.
  reader_skips = collections.Counter(d.skip for d in docs if d.skip)
  assert split["skipped"] == dict(sorted(reader_skips.items()))
  dropped = collections.Counter()
  for d in docs:
    dropped.update(d.dropped)
  assert split["dropped_images"] == dict(sorted(dropped.items()))
  train = {**dirt.CONFIG, "source": "tfds", "tfds_dir": str(tmp_path / "mmc4" / "1.0.0"),
           "tokenizer": corpus["tokenizer"]}
  batches, counters = _all_batches(train)
  seen = _check_rows(batches, docs, corpus["tokenizer"])
  assert sorted(seen) == [i for i, d in enumerate(docs) if d.survivors is not None]
  assert counters == {"seen": split["written"]}  # the build already counted everything


def test_an_unexpected_exception_of_one_record_is_a_counted_skip(corpus, monkeypatch):
  """A parser bug, a MemoryError: counted as record_error, never raised into the loop."""
  real = mmc4.build_record
  calls = {"n": 0}

  def flaky(raw, **kwargs):
    calls["n"] += 1
    if calls["n"] % 5 == 0:
      raise MemoryError("simulated")
    if calls["n"] % 7 == 0:
      raise KeyError("a bug")
    return real(raw, **kwargs)

  monkeypatch.setattr(mmc4, "build_record", flaky)
  config = {**dirt.CONFIG, "source": "mmc4", "paths": {"train": corpus["jsonl"]},
            "image_dir": corpus["image_dir"], "tokenizer": corpus["tokenizer"], "num_threads": 1}
  batches, counters = _all_batches(config)
  assert counters["skipped/record_error"] > 0 and counters["seen"] == len(corpus["docs"])
  _check_rows(batches, corpus["docs"], corpus["tokenizer"])
