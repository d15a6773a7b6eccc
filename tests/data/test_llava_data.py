"""LLaVA-Instruct JSON source and vicuna_v1 conversation transform (formats.llava_json, llava)."""

import json

import numpy as np
import pytest
import tokenizers
from PIL import Image
from tokenizers import decoders, models, pre_tokenizers, trainers

from vlm_jax.data import images as images_lib
from vlm_jax.data import llava
from vlm_jax.data.formats import llava_json
from vlm_jax.data.records import BadRecord

IGN = -100
P = 3  # image tokens per image in these tests
SPECIALS = ["<s>", "</s>", "<unk>", "<image>", "<pad>"]
CORPUS = (llava.VICUNA_V1_SYSTEM + " Be nice. USER: ASSISTANT: What is this? A cat. Color? Red. "
          "Hello there! Hi, how can I help? Describe it. It is round.")


def _wordlevel_tokenizer():
  split = pre_tokenizers.Sequence(
    [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation("isolated")])
  vocab = {t: i for i, t in enumerate(SPECIALS)}
  for word, _ in split.pre_tokenize_str(CORPUS):
    vocab.setdefault(word, len(vocab))
  tok = tokenizers.Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
  tok.pre_tokenizer = split
  tok.add_special_tokens(
    [tokenizers.AddedToken(t, special=True, normalized=False) for t in SPECIALS])
  return tok


def _bpe_tokenizer(style):
  """A BPE trained on the corpus: byte-level (GPT-2 style, "Ġword") or metaspace (SentencePiece
  style, "▁word"), whose tokens carry their leading space, unlike the word-level one."""
  tok = tokenizers.Tokenizer(models.BPE(unk_token="<unk>"))
  if style == "bytelevel":
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    alphabet = pre_tokenizers.ByteLevel.alphabet()
  else:
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    alphabet = []
  trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=SPECIALS, initial_alphabet=alphabet,
                                show_progress=False)
  tok.train_from_iterator([CORPUS] * 3, trainer)
  return tok


@pytest.fixture(scope="module")
def tok():
  return _wordlevel_tokenizer()


def _ids(tok, tokens):
  ids = [tok.token_to_id(t) for t in tokens]
  assert None not in ids, tokens
  return ids


def _write_image(path, w=12, h=8, color=(255, 0, 0)):
  Image.new("RGB", (w, h), color).save(path)
  return path


TWO_TURNS = [
  {"from": "human", "value": "What is this?\n<image>"},  # LLaVA moves <image> to the front
  {"from": "gpt", "value": "A cat."},
  {"from": "human", "value": "Color?"},
  {"from": "gpt", "value": "Red."},
]


def test_render_vicuna_v1_exact_string():
  pairs = [("<image>\nWhat is this?", "A cat."), ("Color?", "Red.")]
  text, spans = llava.render_vicuna_v1(pairs)
  assert text == (llava.VICUNA_V1_SYSTEM + " USER: <image>\nWhat is this? ASSISTANT: A cat.</s>"
                  "USER: Color? ASSISTANT: Red.</s>")
  assert [text[s:e] for s, e in spans] == ["A cat.</s>", "Red.</s>"]


def test_two_turn_conversation_hand_checked(tok, tmp_path):
  image = _write_image(tmp_path / "cat.png")
  record = {"id": "x", "images": [str(image)], "conversations": TWO_TURNS}
  transform = llava.LlavaTransform(tok, max_text_len=32, image_size=4, num_image_tokens=P,
                                   system="Be nice.")
  out = transform.map(record)
  img = tok.token_to_id("<image>")
  prompt = _ids(tok, ["<s>", "Be", "nice", ".", "USER", ":"])
  q1 = _ids(tok, ["What", "is", "this", "?", "ASSISTANT", ":"])
  a1 = _ids(tok, ["A", "cat", ".", "</s>"])
  q2 = _ids(tok, ["USER", ":", "Color", "?", "ASSISTANT", ":"])
  a2 = _ids(tok, ["Red", ".", "</s>"])
  real = prompt + [img] * P + q1 + a1 + q2 + a2
  assert len(real) == 28
  pad = tok.token_to_id("<pad>")
  np.testing.assert_array_equal(out["input_ids"], real + [pad] * 4)
  np.testing.assert_array_equal(out["attention_mask"], [1] * 28 + [0] * 4)
  expected = [IGN] * (len(prompt) + P + len(q1)) + a1 + [IGN] * len(q2) + a2 + [IGN] * 4
  np.testing.assert_array_equal(out["labels"], expected)
  for key in ("input_ids", "attention_mask", "labels"):
    assert out[key].dtype == np.int32 and out[key].shape == (32,)
  assert out["images"].shape == (1, 4, 4, 3) and out["images"].dtype == np.float32
  assert out["image_mask"].tolist() == [True]


def test_image_run_is_num_image_tokens_long(tok, tmp_path):
  image = _write_image(tmp_path / "cat.png")
  record = {"id": "x", "images": [image], "conversations": TWO_TURNS}
  for n in (1, 7, 20):
    out = llava.LlavaTransform(tok, max_text_len=64, image_size=4, num_image_tokens=n).map(record)
    where = np.flatnonzero(out["input_ids"] == tok.token_to_id("<image>"))
    assert len(where) == n and (np.diff(where) == 1).all()  # one contiguous run
    assert (out["labels"][where] == IGN).all()


def test_image_preprocessing_pads_to_square_with_clip_mean():
  # 4 wide x 2 high red -> 4x4 with the CLIP-mean colour above and below (LLaVA's expand2square).
  red = np.zeros((2, 4, 3), np.uint8)
  red[...] = (255, 0, 0)
  square = llava.expand2square(red, (122, 116, 104))
  expected = np.empty((4, 4, 3), np.uint8)
  expected[...] = (122, 116, 104)
  expected[1:3] = (255, 0, 0)
  np.testing.assert_array_equal(square, expected)
  out = llava.preprocess_image(red, 4)
  mean, std = np.array(images_lib.CLIP_MEAN), np.array(images_lib.CLIP_STD)
  np.testing.assert_allclose(out, (expected / 255.0 - mean) / std, atol=1e-5)
  tall = llava.expand2square(np.zeros((5, 2, 3), np.uint8), (1, 2, 3))
  # Offset (5 - 2) // 2 = 1: one fill column on the left, two on the right.
  assert tall.shape == (5, 5, 3) and not tall[:, 1:3].any()
  assert (tall[:, [0, 3, 4]] == (1, 2, 3)).all()


def test_text_only_sample(tok):
  record = {"id": "t", "images": [], "conversations": [
    {"from": "human", "value": "Hello there!"}, {"from": "gpt", "value": "Hi, how can I help?"}]}
  out = llava.LlavaTransform(tok, max_text_len=24, image_size=4, num_image_tokens=P,
                             system="Be nice.").map(record)
  real = _ids(tok, ["<s>", "Be", "nice", ".", "USER", ":", "Hello", "there", "!", "ASSISTANT", ":"])
  answer = _ids(tok, ["Hi", ",", "how", "can", "I", "help", "?", "</s>"])
  n = len(real) + len(answer)
  np.testing.assert_array_equal(out["input_ids"][:n], real + answer)
  np.testing.assert_array_equal(out["labels"][:n], [IGN] * len(real) + answer)
  assert (out["labels"][n:] == IGN).all() and out["attention_mask"].sum() == n
  assert not (out["input_ids"] == tok.token_to_id("<image>")).any()
  assert not out["images"].any() and out["images"].shape == (1, 4, 4, 3)
  assert out["image_mask"].tolist() == [False]


@pytest.mark.parametrize("style", ["bytelevel", "metaspace"])
def test_labels_follow_offsets_for_space_carrying_tokenizers(style, tmp_path):
  # BPE tokens carry their leading space ("ĠA", "▁A"); the answer spans must still pick out exactly
  # the answer tokens, and the ids must be the chunks' own tokenization (no re-tokenizing).
  tok = _bpe_tokenizer(style)
  image = _write_image(tmp_path / "cat.png")
  out = llava.LlavaTransform(tok, max_text_len=200, image_size=4, num_image_tokens=P).map(
    {"id": "b", "images": [image], "conversations": TWO_TURNS})
  text, _ = llava.render_vicuna_v1([("<image>\nWhat is this?", "A cat."), ("Color?", "Red.")])
  before, after = text.split("<image>")
  expected = ([tok.token_to_id("<s>")] + tok.encode(before, add_special_tokens=False).ids
              + [tok.token_to_id("<image>")] * P + tok.encode(after, add_special_tokens=False).ids)
  n = int(out["attention_mask"].sum())
  np.testing.assert_array_equal(out["input_ids"][:n], expected)
  kept = out["labels"] != IGN
  runs = np.split(np.flatnonzero(kept), np.flatnonzero(np.diff(np.flatnonzero(kept)) > 1) + 1)
  answers = [tok.decode(out["input_ids"][r].tolist(), skip_special_tokens=False).strip()
             for r in runs]
  assert answers == ["A cat.</s>", "Red.</s>"]
  np.testing.assert_array_equal(out["labels"][kept], out["input_ids"][kept])


def test_truncation_never_cuts_the_image_run(tok, tmp_path):
  image = _write_image(tmp_path / "cat.png")
  record = {"id": "x", "images": [image], "conversations": TWO_TURNS}

  def run(max_len):
    return llava.LlavaTransform(tok, max_text_len=max_len, image_size=4, num_image_tokens=P,
                                system="Be nice.").map(record)
  # 6 prompt tokens + 3 image tokens = 9: any shorter cut would split the run.
  for max_len in (5, 8):
    with pytest.raises(BadRecord) as info:
      run(max_len)
    assert info.value.reason == "no_image"
  with pytest.raises(BadRecord) as info:  # fits the image and the question, not one answer token
    run(15)
  assert info.value.reason == "no_target_tokens"
  out = run(17)  # cut inside the first answer: "A cat" kept, the rest gone
  assert out["attention_mask"].sum() == 17
  np.testing.assert_array_equal(out["labels"][15:], _ids(tok, ["A", "cat"]))


def test_image_marker_placement_rules(tok, tmp_path):
  image = _write_image(tmp_path / "cat.png")
  transform = llava.LlavaTransform(tok, max_text_len=40, image_size=4, num_image_tokens=P,
                                   system="Be nice.")
  no_marker = [{"from": "human", "value": "What is this?"}, {"from": "gpt", "value": "A cat."}]
  out = transform.map({"id": "m", "images": [image], "conversations": no_marker})
  # Inserted in front of the first question even though the text never mentioned it.
  np.testing.assert_array_equal(out["input_ids"][6:6 + P], [tok.token_to_id("<image>")] * P)
  with pytest.raises(BadRecord) as info:  # a question about a picture that is not there
    transform.map({"id": "m", "images": [], "conversations": TWO_TURNS})
  assert info.value.reason == "image_count_mismatch"


@pytest.mark.parametrize("turns, reason", [
  ([], "text_empty"),
  ([{"from": "gpt", "value": "Hi"}], "text_empty"),
  ([{"from": "human", "value": "Hi"}, {"from": "human", "value": "Hi"}], "malformed_json"),
  ([{"from": "human", "value": "Hi"}], "malformed_json"),
  ([{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "  "}], "text_empty"),
])
def test_bad_conversations(tok, turns, reason):
  transform = llava.LlavaTransform(tok, max_text_len=40, image_size=4, num_image_tokens=P)
  with pytest.raises(BadRecord) as info:
    transform.map({"id": "c", "images": [], "conversations": turns})
  assert info.value.reason == reason


def _json_source(tmp_path, entries, **config):
  path = tmp_path / "instruct.json"
  path.write_text(json.dumps(entries))
  return llava_json.make_source({"path": str(path), **config}, "train")


def test_source_reads_entries_and_resolves_images(tmp_path):
  (tmp_path / "coco").mkdir()
  _write_image(tmp_path / "coco" / "1.png")
  source = _json_source(tmp_path, [
    {"id": "1", "image": "coco/1.png", "conversations": TWO_TURNS},
    {"id": "2", "conversations": TWO_TURNS[2:]},
  ], image_dir=str(tmp_path))
  assert len(source) == 2
  first = source[0]
  assert first["images"] == [str(tmp_path / "coco" / "1.png")]
  assert first["conversations"] == TWO_TURNS and first["id"].endswith(":0:1")
  assert source[1]["images"] == []


@pytest.mark.parametrize("entry, reason", [
  ({"id": "a", "image": "nope.jpg", "conversations": TWO_TURNS}, "image_missing"),
  ({"id": "a", "conversations": []}, "text_empty"),
  ({"id": "a"}, "malformed_json"),
  (["not", "an", "object"], "malformed_json"),
  ({"id": "a", "conversations": [{"from": "bot", "value": "x"}]}, "malformed_json"),
  ({"id": "a", "conversations": [{"from": "human", "value": 3}]}, "malformed_json"),
  ({"id": "a", "image": 5, "conversations": TWO_TURNS}, "malformed_json"),
  ({"id": "a", "image": ["a.jpg", "b.jpg"], "conversations": TWO_TURNS}, "image_count_mismatch"),
])
def test_source_bad_entries(tmp_path, entry, reason):
  source = _json_source(tmp_path, [entry])
  with pytest.raises(BadRecord) as info:
    source[0]
  assert info.value.reason == reason


def test_missing_image_at_decode_time_drops_the_record(tok, tmp_path):
  # The file vanished between reading the entry and decoding it.
  record = {"id": "x", "images": [str(tmp_path / "gone.jpg")], "conversations": TWO_TURNS}
  with pytest.raises(BadRecord) as info:
    llava.LlavaTransform(tok, max_text_len=64, image_size=4, num_image_tokens=P).map(record)
  assert info.value.reason == "image_missing"


def test_jsonl_source_and_splits(tmp_path):
  path = tmp_path / "instruct.jsonl"
  path.write_text(json.dumps({"id": "1", "conversations": TWO_TURNS[2:]}) + "\n{broken\n\n")
  source = llava_json.make_source({"path": str(path)}, "train")
  assert len(source) == 2 and source[0]["images"] == []
  with pytest.raises(BadRecord) as info:
    source[1]
  assert info.value.reason == "malformed_json"
  with pytest.raises(ValueError, match="split 'train' only"):
    llava_json.make_source({"path": str(path)}, "eval")
  assert len(llava_json.make_source({"path": {"eval": str(path)}}, "eval")) == 2
  with pytest.raises(ValueError, match="config.data.path is missing"):
    llava_json.make_source({}, "train")


def test_collate_puts_real_images_first(tok, tmp_path):
  transform = llava.LlavaTransform(tok, max_text_len=40, image_size=4, num_image_tokens=P,
                                   system="Be nice.")
  text_only = transform.map({"id": "t", "images": [], "conversations": TWO_TURNS[2:]})
  red = transform.map({"id": "r", "images": [_write_image(tmp_path / "r.png")],
                       "conversations": TWO_TURNS})
  blue = transform.map({"id": "b", "images": [_write_image(tmp_path / "b.png", color=(0, 0, 255))],
                        "conversations": TWO_TURNS})
  batch = llava.collate([text_only, red, blue])
  images = batch["inputs"]["images"]
  assert images.shape == (3, 4, 4, 3)
  # The k-th image-token run (reading order: red's, then blue's) meets the k-th image.
  np.testing.assert_array_equal(images[0], red["images"][0])
  np.testing.assert_array_equal(images[1], blue["images"][0])
  assert not images[2].any()
  assert batch["inputs"]["input_ids"].shape == (3, 40) and batch["labels"].shape == (3, 40)
  assert set(batch["inputs"]) == {"images", "input_ids", "attention_mask"}
