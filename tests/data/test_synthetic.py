"""Tests for the synthetic corpus (vlm_jax.data.synthetic) and its tokenizer."""

import re

import numpy as np
import pytest

from vlm_jax.data import synthetic
from vlm_jax.data import tokenizer as tok_lib

SMALL_KINDS = ("interleaved", "vqa", "pairs", "classification")


@pytest.fixture(scope="module")
def tokenizer():
  return tok_lib.synthetic_tokenizer()


def _saturated(image, threshold=60):
  """bool[H, W]: pixels that are clearly coloured (background and distractors are grey)."""
  img = image.astype(np.int16)
  return img.max(-1) - img.min(-1) > threshold


def _dominant_colour(image):
  mask = _saturated(image)
  assert mask.sum() > 0, "no coloured pixels"
  mean = image[mask].astype(np.float64).mean(0)
  return min(
    synthetic.COLOURS, key=lambda c: np.sum((np.array(synthetic.COLOUR_RGB[c]) - mean) ** 2)
  )


def _guess_shape(image):
  """Classifies the coloured blob by how it fills its bounding box."""
  ys, xs = np.nonzero(_saturated(image))
  mask = _saturated(image)[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1]
  fill = mask.mean()
  if fill > 0.9:
    return "square"
  if fill > 0.68:
    return "circle"
  half = mask.shape[0] // 2
  # A triangle has most of its area in the lower half; a cross is symmetric.
  return "triangle" if mask[:half].sum() < 0.6 * mask[half:].sum() else "cross"


def test_determinism_and_random_access():
  a = synthetic.SyntheticSource("interleaved", num_records=50)
  b = synthetic.SyntheticSource("interleaved", num_records=50)
  _ = [a[i] for i in (3, 9, 1)]  # Access order must not matter.
  for i in (7, 0, 49):
    ra, rb = a[i], b[i]
    assert ra["text"] == rb["text"] and ra["label"] == rb["label"]
    assert len(ra["images"]) == len(rb["images"])
    for x, y in zip(ra["images"], rb["images"]):
      np.testing.assert_array_equal(x, y)


def test_splits_and_seeds_differ():
  train = synthetic.SyntheticSource("pairs", "train")
  evals = synthetic.SyntheticSource("pairs", "eval")
  other_seed = synthetic.SyntheticSource("pairs", "train", seed=1)
  for i in range(20):
    assert not np.array_equal(train[i]["images"][0], evals[i]["images"][0])
    assert not np.array_equal(train[i]["images"][0], other_seed[i]["images"][0])


def test_bad_arguments_name_the_field():
  with pytest.raises(ValueError, match="kind"):
    synthetic.SyntheticSource("video")
  with pytest.raises(ValueError, match="split"):
    synthetic.SyntheticSource("vqa", split="test")
  with pytest.raises(IndexError):
    synthetic.SyntheticSource("vqa", num_records=3)[3]


@pytest.mark.parametrize("kind", synthetic.KINDS)
def test_every_text_tokenizes_without_unk(tokenizer, kind):
  n = 60 if kind == "hires" else 300
  src = synthetic.SyntheticSource(kind, num_records=n, image_size=32 if kind == "hires" else 64)
  for i in range(n):
    rec = src[i]
    ids = tokenizer.encode(rec["text"], add_special_tokens=False).ids
    assert tok_lib.UNK_ID not in ids, rec["text"]
    assert ids.count(tok_lib.MEDIA_ID) == len(rec["images"])
    assert ids[-1] == tok_lib.EOS_ID and ids[-2] == tok_lib.EOC_ID
    if "prompt" in rec:
      assert tok_lib.UNK_ID not in tokenizer.encode(rec["prompt"], add_special_tokens=False).ids


def test_interleaved_structure():
  src = synthetic.SyntheticSource("interleaved", num_records=400, max_images=3)
  n_qa = n_chunks = n_filler = 0
  for i in range(400):
    rec = src[i]
    text = rec["text"]
    assert 1 <= len(rec["images"]) <= 3
    assert all(im.shape == (64, 64, 3) and im.dtype == np.uint8 for im in rec["images"])
    assert not re.search(r"\s<|>\s", text), "no spaces around special tokens"
    chunks = re.findall(r"<image>(.*?)<\|endofchunk\|>", text)
    assert len(chunks) == len(rec["images"])
    n_chunks += len(chunks)
    n_qa += sum(c.startswith("Question:") for c in chunks)
    n_filler += not text.startswith("<image>")
    assert rec["label"] == _shape_index_of(src[i]["images"][0])
  assert n_qa >= n_chunks / 2
  assert 0.35 < n_filler / 400 < 0.65


def _shape_index_of(image):
  return synthetic.SHAPES.index(_guess_shape(image))


def test_stated_colour_and_shape_match_pixels():
  # Every colour or shape word the text states about an image is what the pixels show.
  checked = 0
  for kind in ("interleaved", "pairs", "vqa"):
    src = synthetic.SyntheticSource(kind, num_records=150)
    for i in range(150):
      rec = src[i]
      chunks = re.findall(r"<image>(.*?)<\|endofchunk\|>", rec["text"])
      for image, chunk in zip(rec["images"], chunks):
        words = re.findall(r"\w+", chunk.lower())
        colours = [w for w in words if w in synthetic.COLOURS]
        shapes = [w for w in words if w in synthetic.SHAPES]
        if colours:
          assert colours == [_dominant_colour(image)], chunk
        if shapes:
          assert shapes == [_guess_shape(image)], chunk
        checked += 1
  assert checked > 500


def test_vqa_record_layout():
  src = synthetic.SyntheticSource("vqa", split="eval", num_records=200)
  types = []
  for i in range(200):
    rec = src[i]
    assert rec["text"] == f"{rec['prompt']} {rec['answer']}<|endofchunk|><|endoftext|>"
    assert rec["prompt"].endswith("Answer:") and rec["prompt"].startswith("<image>Question:")
    vocab = synthetic.COLOURS if rec["question_type"] == "colour" else synthetic.SHAPES
    assert rec["answer"] in vocab
    assert synthetic.SHAPES[rec["label"]] == _guess_shape(rec["images"][0])
    types.append(rec["question_type"])
  assert 0.35 < types.count("colour") / len(types) < 0.65


def test_classification_label():
  src = synthetic.SyntheticSource("classification", num_records=40)
  for i in range(40):
    rec = src[i]
    assert set(rec) >= {"images", "label"} and len(rec["images"]) == 1
    assert synthetic.SHAPES[rec["label"]] == _guess_shape(rec["images"][0])


def test_hires_target_small_and_present():
  src = synthetic.SyntheticSource("hires", num_records=20, image_size=64)
  for i in range(20):
    rec = src[i]
    image = rec["images"][0]
    assert image.shape == (384, 384, 3)
    x0, y0, x1, y1 = rec["target_box"]
    assert 0 < x1 - x0 <= 0.06 * 384 and 0 < y1 - y0 <= 0.06 * 384
    coloured = _saturated(image)
    inside = np.zeros_like(coloured)
    inside[y0:y1, x0:x1] = True
    assert coloured[inside].sum() >= 10, "target missing"
    assert not coloured[~inside].any(), "coloured pixels outside the target box"
    assert _dominant_colour(image) == rec["answer"]
    assert rec["question_type"] == "colour" and "small shape" in rec["prompt"]
  assert synthetic.SyntheticSource("hires", hires_size=200)[0]["images"][0].shape == (200, 200, 3)


def test_tokenizer_contract(tokenizer):
  assert [tokenizer.token_to_id(t) for t in tok_lib.SPECIAL_TOKENS] == [0, 1, 2, 3, 4]
  assert (
    tokenizer.get_vocab_size() == tok_lib.synthetic_vocab_size()
  )
  enc = tokenizer.encode("Answer: red.<|endofchunk|>", add_special_tokens=False)
  assert enc.tokens == ["answer", ":", "red", ".", "<|endofchunk|>"]
  assert tokenizer.decode(enc.ids) == "answer : red."
  assert tok_lib.special_token_id(tokenizer, "<image>") == tok_lib.MEDIA_ID
  with pytest.raises(ValueError, match="<nope>"):
    tok_lib.special_token_id(tokenizer, "<nope>")


def test_load_tokenizer(tmp_path, tokenizer):
  assert tok_lib.load_tokenizer("synthetic").get_vocab() == tokenizer.get_vocab()
  tokenizer.save(str(tmp_path / "tokenizer.json"))
  assert tok_lib.load_tokenizer(str(tmp_path)).get_vocab() == tokenizer.get_vocab()
  assert tok_lib.load_tokenizer(str(tmp_path / "tokenizer.json")).get_vocab_size() == len(
    tokenizer.get_vocab()
  )
  with pytest.raises(ValueError, match="no_such_dir"):
    tok_lib.load_tokenizer(str(tmp_path / "no_such_dir"))
  (tmp_path / "empty").mkdir()
  with pytest.raises(ValueError, match="tokenizer.json"):
    tok_lib.load_tokenizer(str(tmp_path / "empty"))
  (tmp_path / "bad.json").write_text("{not json")
  with pytest.raises(ValueError, match="bad.json"):
    tok_lib.load_tokenizer(str(tmp_path / "bad.json"))
