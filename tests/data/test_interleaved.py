"""Tests for label masking and the record -> example transforms (vlm_jax.data.interleaved)."""

import numpy as np
import pytest

from vlm_jax.data import images as images_lib
from vlm_jax.data import interleaved
from vlm_jax.data import tokenizer as tok_lib

IGN = -100
PAD, EOS, MEDIA, EOC = tok_lib.PAD_ID, tok_lib.EOS_ID, tok_lib.MEDIA_ID, tok_lib.EOC_ID

DOC = (
  "Here are some pictures.<image>A red circle.<|endofchunk|>"
  "<image>Question: What shape is it? Answer: cross<|endofchunk|><|endoftext|>"
)
DOC_TOKENS = [
  "here", "are", "some", "pictures", ".",  # 0-4 filler
  "<image>", "a", "red", "circle", ".", "<|endofchunk|>",  # 5-10 first chunk
  "<image>", "question", ":", "what", "shape", "is", "it", "?", "answer", ":", "cross",  # 11-21
  "<|endofchunk|>", "<|endoftext|>",  # 22-23
]  # fmt: skip


@pytest.fixture(scope="module")
def tokenizer():
  return tok_lib.synthetic_tokenizer()


def _record():
  # Two flat, different images so we can tell which slot holds which.
  img0 = np.full((64, 64, 3), (200, 20, 20), np.uint8)
  img1 = np.full((64, 64, 3), (20, 200, 20), np.uint8)
  return {"images": [img0, img1], "text": DOC}


def _ids(tokenizer, tokens):
  return np.array([tokenizer.token_to_id(t) for t in tokens], np.int32)


def test_flamingo_labels_hand_checked():
  # filler filler <image> w w <eoc> between <image> w <eoc> <eos> pad pad
  ids = np.array([10, 11, MEDIA, 12, 13, EOC, 14, MEDIA, 15, EOC, EOS, PAD, PAD])
  expected = np.array([IGN, IGN, IGN, 12, 13, EOC, IGN, IGN, 15, EOC, IGN, IGN, IGN])
  labels = interleaved.flamingo_labels(ids, media_id=MEDIA, eoc_id=EOC, pad_id=PAD)
  np.testing.assert_array_equal(labels, expected)
  assert labels.dtype == np.int32


def test_flamingo_labels_edge_cases_and_batch():
  # Consecutive chunks without <eoc>, an <eoc> before any image, no images at all.
  rows = np.array(
    [
      [MEDIA, 10, MEDIA, 11, EOC, EOS],
      [EOC, 10, MEDIA, 11, EOC, 12],
      [10, 11, 12, EOS, PAD, PAD],
    ]
  )
  expected = np.array(
    [
      [IGN, 10, IGN, 11, EOC, IGN],
      [IGN, IGN, IGN, 11, EOC, IGN],
      [IGN] * 6,
    ]
  )
  labels = interleaved.flamingo_labels(rows, media_id=MEDIA, eoc_id=EOC, pad_id=PAD)
  np.testing.assert_array_equal(labels, expected)


def test_pair_labels_train_caption_eoc_and_eos():
  ids = np.array([MEDIA, 10, 11, EOC, EOS, PAD])
  labels = interleaved.pair_labels(ids, media_id=MEDIA, pad_id=PAD)
  np.testing.assert_array_equal(labels, [IGN, 10, 11, EOC, EOS, IGN])


def test_interleaved_transform_exact(tokenizer):
  out = interleaved.InterleavedTransform(tokenizer, 28, 3, 64).map(_record())
  ids = _ids(tokenizer, DOC_TOKENS)
  np.testing.assert_array_equal(out["input_ids"], np.concatenate([ids, [PAD] * 4]))
  np.testing.assert_array_equal(out["attention_mask"], [1] * 24 + [0] * 4)
  expected_labels = np.full(28, IGN)
  expected_labels[6:11] = ids[6:11]  # "a red circle . <eoc>"
  expected_labels[12:23] = ids[12:23]  # "question ... cross <eoc>"
  np.testing.assert_array_equal(out["labels"], expected_labels)
  rec = _record()
  assert out["vision_x"].shape == (3, 64, 64, 3) and out["vision_x"].dtype == np.float32
  np.testing.assert_allclose(out["vision_x"][0], images_lib.clip_preprocess(rec["images"][0], 64))
  np.testing.assert_allclose(out["vision_x"][1], images_lib.clip_preprocess(rec["images"][1], 64))
  assert not out["vision_x"][2].any()  # Padded slot.
  for key in ("input_ids", "attention_mask", "labels"):
    assert out[key].dtype == np.int32 and out[key].shape == (28,)


def test_interleaved_transform_more_images_than_slots(tokenizer):
  out = interleaved.InterleavedTransform(tokenizer, 28, 1, 32).map(_record())
  # Text is cut just before the second <image>; nothing is appended.
  ids = _ids(tokenizer, DOC_TOKENS[:11])
  np.testing.assert_array_equal(out["input_ids"], np.concatenate([ids, [PAD] * 17]))
  assert out["attention_mask"].sum() == 11
  assert out["vision_x"].shape == (1, 32, 32, 3)
  np.testing.assert_allclose(
    out["vision_x"][0], images_lib.clip_preprocess(_record()["images"][0], 32)
  )


@pytest.mark.parametrize("max_len, kept", [(11, 1), (12, 2), (5, 0)])
def test_interleaved_transform_text_truncation_keeps_alignment(tokenizer, max_len, kept):
  out = interleaved.InterleavedTransform(tokenizer, max_len, 3, 16).map(_record())
  assert np.count_nonzero(out["input_ids"] == MEDIA) == kept
  real_slots = [bool(out["vision_x"][i].any()) for i in range(3)]
  assert real_slots == [i < kept for i in range(3)]
  if kept == 2:
    # The second <image> survives as the very last token: its image must be kept, label masked.
    assert out["input_ids"][-1] == MEDIA and out["labels"][-1] == IGN


def test_interleaved_transform_mismatch_raises(tokenizer):
  record = _record()
  record["images"] = record["images"][:1]
  with pytest.raises(ValueError, match="1 images .* 2 <image>"):
    interleaved.InterleavedTransform(tokenizer, 28, 3, 16).map(record)


def test_pairs_rule(tokenizer):
  record = {
    "images": [np.zeros((8, 8, 3), np.uint8)],
    "text": "<image>A red circle.<|endofchunk|><|endoftext|>",
  }
  out = interleaved.InterleavedTransform(tokenizer, 10, 1, 8, label_rule="pairs").map(record)
  ids = out["input_ids"]
  # <image> a red circle . <eoc> <eos> pad pad pad
  np.testing.assert_array_equal(out["labels"][:7], np.concatenate([[IGN], ids[1:7]]))
  assert out["labels"][6] == EOS and (out["labels"][7:] == IGN).all()


def test_strip_media_markup():
  assert interleaved.strip_media_markup(DOC) == (
    "Here are some pictures. A red circle. Question: What shape is it? Answer: cross<|endoftext|>"
  )
  assert interleaved.strip_media_markup("<image>x<|endofchunk|> <image> y") == "x y"


def test_text_only_transform(tokenizer):
  out = interleaved.TextOnlyTransform(tokenizer, 30).map(_record())
  tokens = [t for t in DOC_TOKENS if t not in ("<image>", "<|endofchunk|>")]
  ids = _ids(tokenizer, tokens)
  n = len(ids)
  np.testing.assert_array_equal(out["input_ids"][:n], ids)
  assert (out["input_ids"][n:] == PAD).all() and out["attention_mask"].sum() == n
  np.testing.assert_array_equal(out["labels"], np.concatenate([ids, [IGN] * (30 - n)]))
  assert set(out) == {"input_ids", "attention_mask", "labels"}
  short = interleaved.TextOnlyTransform(tokenizer, 4).map(_record())
  np.testing.assert_array_equal(short["input_ids"], ids[:4])


def test_encode_prompt(tokenizer):
  ids, length = interleaved.encode_prompt(
    tokenizer, "<image>Question: What shape is it? Answer:", 16
  )
  assert length == 10 and ids.dtype == np.int32 and ids.shape == (16,)
  assert (
    ids[0] == MEDIA
    and ids[length - 1] == tokenizer.token_to_id(":")
    and (ids[length:] == PAD).all()
  )
  with pytest.raises(ValueError, match="max_len=4"):
    interleaved.encode_prompt(tokenizer, "<image>Question: What shape is it? Answer:", 4)
