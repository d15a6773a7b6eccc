"""Tests for the MMC4 jsonl reader (vlm_jax.data.formats.mmc4) and OpenFlamingo's MMC4 rules."""

import base64
import json
import pickle

import grain
import numpy as np
import pytest

from tests.data.web_fixtures import noise_png, small_jpeg
from vlm_jax.data import images as images_lib
from vlm_jax.data import tokenizer as tok_lib
from vlm_jax.data.counting import CountingBatch
from vlm_jax.data.formats import image_payloads, matching, mmc4, of_layout, transforms
from vlm_jax.data.records import BadRecord, skipping

IGN = -100
SENTENCES = [
  "Here are some pictures.",        # s0
  "A red circle.",                  # s1
  "Look at these images.",          # s2
  "A blue square.",                 # s3
  "Some shapes are shown below.",   # s4
]
# Rows: a.png -> s3, b.png -> s1, c.png nothing >= 0.24, tiny.jpg is under 11,000 bytes and
# gone.png does not exist (both would take s0 if they took part).
SIM = [
  [0.10, 0.20, 0.10, 0.31, 0.10],
  [0.10, 0.30, 0.25, 0.10, 0.10],
  [0.20, 0.23, 0.20, 0.23, 0.10],
  [0.90, 0.10, 0.10, 0.10, 0.10],
  [0.90, 0.10, 0.10, 0.10, 0.10],
]
NAMES = ["a.png", "b.png", "c.png", "tiny.jpg", "gone.png"]
EXPECTED_TEXT = (
  "Here are some pictures.<image>A red circle. Look at these images.<|endofchunk|>"
  "<image>A blue square. Some shapes are shown below.<|endofchunk|><|endoftext|>"
)


def _doc(sentences=SENTENCES, names=NAMES, sim=SIM, **extra):
  infos = [{"image_name": n, "matched_text_index": 0, "matched_sim": 0.3,
            "raw_url": f"http://x/{n}"} for n in names]
  return {"text_list": list(sentences), "image_info": infos, "similarity_matrix": sim, **extra}


@pytest.fixture()
def image_dir(tmp_path):
  d = tmp_path / "images"
  d.mkdir()
  for seed, name in enumerate(["a.png", "b.png", "c.png", "d.png"]):
    (d / name).write_bytes(noise_png(seed))
  (d / "tiny.jpg").write_bytes(small_jpeg())
  (d / "empty.png").write_bytes(b"")
  (d / "page.jpg").write_bytes(b"<html><body>404 not found</body></html>" * 400)
  return d


def _options(image_dir, **kw):
  return mmc4.MMC4Options(image_dir=str(image_dir), **kw)


def _build(doc, image_dir, index=0, **kw):
  return mmc4.build_record(doc, index=index, record_id="t:0", options=_options(image_dir, **kw))


def _write_jsonl(path, lines):
  path.write_text("".join(line if isinstance(line, str) else json.dumps(line) + "\n"
                          for line in lines))
  return path


def test_hand_checked_record_text_and_image_order(image_dir):
  record = _build(_doc(), image_dir)
  assert record["text"] == EXPECTED_TEXT
  # Images follow the text (b.png's sentence comes first), not image_info order as in OF.
  assert [im.encoded for im in record["images"]] == [noise_png(1), noise_png(0)]


def test_hand_checked_ids_and_labels_through_transform(image_dir):
  tokenizer = tok_lib.synthetic_tokenizer()
  record = _build(_doc(), image_dir)
  transform = transforms.InterleavedDocTransform(tokenizer, image_size=16, max_text_len=40,
                                                 max_images=3)
  out = transform.map(record)
  words = ("here are some pictures . <image> a red circle . look at these images . <|endofchunk|> "
           "<image> a blue square . some shapes are shown below . <|endofchunk|> <|endoftext|>")
  ids = [tokenizer.token_to_id(w) for w in words.split()]
  assert None not in ids and tok_lib.UNK_ID not in ids
  n = len(ids)
  np.testing.assert_array_equal(out["input_ids"], ids + [tok_lib.PAD_ID] * (40 - n))
  np.testing.assert_array_equal(out["attention_mask"], [1] * n + [0] * (40 - n))
  trained = (
    [False] * 6            # text before the first <image>, and the <image>
    + [True] * 10          # a red circle . look at these images . <eoc>
    + [False]              # <image>
    + [True] * 11          # a blue square . some shapes are shown below . <eoc>
    + [False] * (1 + 40 - n))  # <eos> after the last chunk, padding
  np.testing.assert_array_equal(out["labels"], np.where(trained, out["input_ids"], IGN))
  for slot, png in enumerate([noise_png(1), noise_png(0)]):
    want = images_lib.clip_preprocess(images_lib.to_rgb_uint8(png), 16)
    np.testing.assert_allclose(out["vision_x"][slot], want, rtol=1e-6)
  assert not out["vision_x"][2].any()


def test_hungarian_differs_from_argmax_and_greedy():
  sim = np.array([[0.90, 0.80], [0.85, 0.30]])
  # argmax: both images to s0; greedy (best pair first) gives 0->0, 1->1 (total 1.2);
  # the one-to-one optimum is 0->1, 1->0 (total 1.65).
  assert matching.assign_images(sim, 0.24, "hungarian") == [(0, 1), (1, 0)]
  assert matching.assign_images(sim, 0.24, "argmax") == [(0, 0), (1, 0)]
  # The threshold applies after matching: 1->1 at 0.30 would survive a threshold of 0.5 only
  # through a different assignment, which OF does not look for.
  assert matching.assign_images(sim, 0.82, "hungarian") == [(1, 0)]


def test_hungarian_and_argmax_records(image_dir):
  doc = _doc(["A red circle.", "A blue square."], ["a.png", "b.png"], [[0.9, 0.8], [0.85, 0.3]])
  hungarian = _build(doc, image_dir)
  assert hungarian["text"] == (
    "<image>A red circle.<|endofchunk|><image>A blue square.<|endofchunk|><|endoftext|>")
  assert [im.encoded for im in hungarian["images"]] == [noise_png(1), noise_png(0)]
  argmax = _build(doc, image_dir, matching="argmax")
  # The PyPI release's layout: both images before s0, the first with an empty chunk.
  assert argmax["text"] == (
    "<image><|endofchunk|><image>A red circle. A blue square.<|endofchunk|><|endoftext|>")
  assert [im.encoded for im in argmax["images"]] == [noise_png(0), noise_png(1)]


def test_similarity_threshold_is_inclusive_and_configurable(image_dir):
  doc = _doc(["A red circle.", "A blue square."], ["a.png", "b.png"],
             [[0.24, 0.0], [0.0, 0.2399]])
  record = _build(doc, image_dir, single_image_keep_prob=1.0)
  assert [im.encoded for im in record["images"]] == [noise_png(0)]
  assert record["text"] == "<image>A red circle. A blue square.<|endofchunk|><|endoftext|>"
  assert len(_build(doc, image_dir, sim_threshold=0.2)["images"]) == 2
  with pytest.raises(BadRecord) as e:
    _build(doc, image_dir, sim_threshold=0.3)
  assert e.value.reason == "no_image"


def test_image_byte_floor_is_11000():
  jpeg = small_jpeg()
  padded = jpeg + b"\0" * (11_000 - len(jpeg))  # PIL reads the header; trailing bytes don't matter
  assert image_payloads.check_image(padded, "x", size=None, min_bytes=11_000).encoded == padded
  with pytest.raises(image_payloads.ImageProblem) as e:
    image_payloads.check_image(padded[:-1], "x", size=None, min_bytes=11_000)
  assert e.value.reason == "image_too_small" and e.value.floor
  assert mmc4.MMC4Options().min_image_bytes == 11_000
  assert mmc4.MMC4Options().sim_threshold == 0.24


def test_max_images_keeps_first_in_text_order_and_cuts_text(image_dir):
  for seed in range(8):
    (image_dir / f"n{seed}.png").write_bytes(noise_png(100 + seed))
  sentences = [f"S{k}." for k in range(9)]
  sim = np.full((8, 9), 0.1)
  for k in range(8):
    sim[k, 8 - k] = 0.5  # image k before sentence 8-k: text order is the reverse of image order
  doc = _doc(sentences, [f"n{k}.png" for k in range(8)], sim.tolist())
  record = _build(doc, image_dir)
  assert [im.encoded for im in record["images"]] == [noise_png(100 + k) for k in (7, 6, 5, 4, 3, 2)]
  assert record["text"] == (
    "S0.<image>S1.<|endofchunk|><image>S2.<|endofchunk|><image>S3.<|endofchunk|><image>S4."
    "<|endofchunk|><image>S5.<|endofchunk|><image>S6.<|endofchunk|><|endoftext|>")


def test_literal_special_tokens_in_web_text_are_removed(image_dir):
  doc = _doc(["Use <image> and <|endofchunk|> tags.", "A red circle."], ["a.png", "b.png"],
             [[0.0, 0.5], [0.5, 0.0]])
  record = _build(doc, image_dir)
  assert record["text"] == (
    "<image>Use  and  tags.<|endofchunk|><image>A red circle.<|endofchunk|><|endoftext|>")
  assert record["text"].count("<image>") == len(record["images"]) == 2


def test_single_image_documents_kept_half_the_time_deterministically(image_dir):
  doc = _doc(["A red circle.", "A blue square."], ["a.png"], [[0.5, 0.1]])

  def kept(seed):
    out = []
    for index in range(200):
      try:
        _build(doc, image_dir, index=index, seed=seed)
        out.append(index)
      except BadRecord as e:
        assert e.reason == "single_image_dropped"
    return out

  first = kept(0)
  assert 70 < len(first) < 130
  assert kept(0) == first  # same (seed, index) -> same decision, in any process and after restore
  assert kept(1) != first
  # Two-image documents are never dropped by the coin.
  two = _doc(["A red circle.", "A blue square."], ["a.png", "b.png"], [[0.5, 0.1], [0.1, 0.5]])
  assert all(len(_build(two, image_dir, index=i)["images"]) == 2 for i in range(20))


def test_base64_images_including_ofs_bytes_repr(image_dir):
  png = noise_png(7)
  infos = [{"image_name": "x.png", "image_base64": base64.b64encode(png).decode()},
           {"image_name": "y.png", "image_base64": str(base64.b64encode(noise_png(8)))}]
  doc = {"text_list": ["A red circle.", "A blue square."], "image_info": infos,
         "similarity_matrix": [[0.5, 0.1], [0.1, 0.5]]}
  # No image_dir needed: the bytes are in the record. OF's converter writes str(bytes) = "b'...'".
  record = mmc4.build_record(doc, index=0, record_id="t", options=mmc4.MMC4Options())
  assert [im.encoded for im in record["images"]] == [png, noise_png(8)]


def _reason(fn):
  with pytest.raises(BadRecord) as e:
    fn()
  return e.value.reason


@pytest.mark.parametrize("line, reason", [
  ("{not json", "malformed_json"),
  ("[1, 2]", "malformed_json"),
  (json.dumps({"image_info": [], "similarity_matrix": []}), "malformed_json"),  # no text_list
  (json.dumps(_doc(sim=[[0.5, 0.1]])), "malformed_json"),  # 1 row for 5 images
  (json.dumps(_doc(names=["a.png"], sim=[[0.5, 0.1, 0.1, 0.1, float("nan")]])), "malformed_json"),
  (json.dumps(_doc(is_gpt=True)), "malformed_json"),
  (json.dumps(_doc(names=[], sim=[])), "no_image"),
  (json.dumps(_doc(names=["c.png"], sim=[SIM[2]])), "no_image"),  # nothing over the threshold
  (json.dumps(_doc(names=["gone.png"], sim=[SIM[4]])), "image_missing"),
  (json.dumps(_doc(names=["empty.png"], sim=[SIM[4]])), "image_empty"),
  (json.dumps(_doc(names=["tiny.jpg"], sim=[SIM[3]])), "image_too_small"),
  (json.dumps(_doc(names=["../images/../../etc.png"], sim=[SIM[3]])), "image_missing"),
  (json.dumps(_doc(["A red circle.", ""], ["a.png"], [[0.1, 0.5]])), "image_only_at_end"),
])
def test_bad_documents_raise_their_reason(image_dir, line, reason):
  options = _options(image_dir, single_image_keep_prob=1.0)
  assert _reason(lambda: mmc4.build_record(line, index=0, record_id="t", options=options)) == reason


def test_undecodable_file_and_drop_policy(image_dir):
  page = _doc(["A red circle."], ["page.jpg"], [[0.5]])
  assert _reason(lambda: _build(page, image_dir, single_image_keep_prob=1.0)) == "image_undecodable"
  # One missing image among good ones: left out by default, the whole document with "drop_record".
  doc = _doc(["A red circle.", "A blue square.", "Look."], ["a.png", "gone.png", "b.png"],
             [[0.5, 0.1, 0.1], [0.1, 0.5, 0.1], [0.1, 0.1, 0.5]])
  assert [im.encoded for im in _build(doc, image_dir)["images"]] == [noise_png(0), noise_png(1)]
  assert _reason(lambda: _build(doc, image_dir, on_bad_image="drop_record")) == "image_missing"


def test_transform_rejects_what_truncation_leaves_untrainable():
  tokenizer = tok_lib.synthetic_tokenizer()
  record = {"text": "Here are some pictures.<image>A red circle.<|endofchunk|><|endoftext|>",
            "images": [small_jpeg()], "id": "t"}

  def reason(max_text_len):
    transform = transforms.InterleavedDocTransform(tokenizer, 16, max_text_len=max_text_len,
                                                   max_images=2)
    return _reason(lambda: transform.map(record))

  assert reason(5) == "no_image"  # the <image> is token 6
  assert reason(6) == "image_only_at_end"  # OF's case: the only <image> is the last token
  out = transforms.InterleavedDocTransform(tokenizer, 16, max_text_len=7, max_images=2).map(record)
  assert (out["labels"] != IGN).sum() == 1


def test_source_random_access_ids_pickling_and_counting(tmp_path, image_dir):
  good = _doc()
  path = _write_jsonl(tmp_path / "shard_00003.jsonl", [
    good, "\n", "{broken\n", _doc(names=["gone.png"], sim=[SIM[4]]), good])
  source = mmc4.MMC4Source([str(path)], _options(image_dir))
  assert len(source) == 4  # the empty line is not a document
  assert source[3]["id"] == "mmc4/shard_00003.jsonl:3" and source[0]["text"] == EXPECTED_TEXT
  assert _reason(lambda: source[1]) == "malformed_json"
  assert _reason(lambda: source[2]) == "image_missing"
  assert pickle.loads(pickle.dumps(source))[3] == source[3]
  with pytest.raises(IndexError):
    source[4]
  # Through grain and CountingBatch: bad documents are counted, good ones batched. The reader
  # raises BadRecord from __getitem__, so it is wrapped in `skipping` like the transform.
  transform = transforms.InterleavedDocTransform(tok_lib.synthetic_tokenizer(), 16, 40, 3)
  ds = (grain.MapDataset.range(len(source)).map(skipping(source.__getitem__))
        .map(skipping(transform)).to_iter_dataset())
  it = iter(CountingBatch(ds, 2, lambda xs: np.stack([x["input_ids"] for x in xs])))
  assert next(it).shape == (2, 40)
  # Each good document leaves out its missing and its tiny image; the third one's image is missing.
  assert it.counters() == {"seen": 4, "skipped/image_missing": 1, "skipped/malformed_json": 1,
                           "dropped_images/image_missing": 3, "dropped_images/image_too_small": 2}


def test_make_source_reads_config_and_names_missing_fields(tmp_path, image_dir):
  path = _write_jsonl(tmp_path / "a.jsonl", [_doc()])
  cfg = {"paths": str(tmp_path / "*.jsonl"), "image_dir": str(image_dir), "sim_threshold": 0.305,
         "max_images": 4, "single_image_keep_prob": 1.0}
  source = mmc4.make_source(cfg, "train")
  assert source.options.max_images == 4 and source.options.min_image_bytes == 11_000
  assert [im.encoded for im in source[0]["images"]] == [noise_png(0)]  # only a.png reaches 0.305
  with pytest.raises(ValueError, match=r"config\.data\.paths is missing"):
    mmc4.make_source({"image_dir": str(image_dir)}, "train")
  with pytest.raises(ValueError, match="matches no files"):
    mmc4.make_source({"paths": str(tmp_path / "*.none")}, "train")
  with pytest.raises(ValueError, match="split 'train' only"):
    mmc4.make_source(cfg, "eval")
  assert len(mmc4.make_source({**cfg, "paths": {"eval": [str(path)]}}, "eval")) == 1
  with pytest.raises(ValueError, match="image_dir"):
    mmc4.make_source({**cfg, "image_dir": str(tmp_path / "nope")}, "train")
  with pytest.raises(ValueError, match="matching"):
    mmc4.make_source({**cfg, "matching": "greedy"}, "train")


def test_layout_rules_on_their_own():
  assert of_layout.interleave(["A.", "B.", "C.", "D."], [1, 3], 6) == (
    "A.<image>B. C.<|endofchunk|><image>D.<|endofchunk|><|endoftext|>", 2)
  # An image after the last sentence has an empty chunk; text before the first image is kept.
  assert of_layout.interleave(["A."], [1], 6)[0] == "A.<image><|endofchunk|><|endoftext|>"
  assert of_layout.single_image_without_text("A.<image><|endofchunk|><|endoftext|>")
  assert not of_layout.single_image_without_text("<image>B.<|endofchunk|><|endoftext|>")
  assert of_layout.pair_text("  A red circle. \n") == (
    "<image>A red circle.<|endofchunk|><|endoftext|>")
