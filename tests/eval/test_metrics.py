"""vlm_jax.eval.metrics against hand-worked numbers and the reference implementations.

References: OpenFlamingo's eval modules (`open_flamingo/eval/{vqa_metric,ok_vqa_utils,coco_metric}.py`,
loaded from their files: the package's __init__ imports the PyTorch model), pycocoevalcap's `Cider`
and, where Java is installed, its Stanford PTBTokenizer. Tests needing one of them skip without it.
"""

import importlib.util
import json
import math
import pathlib
import random
import shutil

import numpy as np
import pytest

from vlm_jax.eval import metrics, okvqa_stemmer


def _of_eval_module(name: str):
  """open_flamingo/eval/<name>.py as a module, or skip when open_flamingo is not installed."""
  spec = importlib.util.find_spec("open_flamingo")
  if spec is None or not spec.submodule_search_locations:
    pytest.skip("open_flamingo is not installed (it is installed with --no-deps, see the README)")
  path = pathlib.Path(spec.submodule_search_locations[0]) / "eval" / f"{name}.py"
  module_spec = importlib.util.spec_from_file_location(f"_of_eval_{name}", path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module


# ------------------------------------------------------------------------------------------------
# Post-processing

GENERATIONS = [
    " a dog sitting on a couch<|endofchunk|>",
    "A \"big\" red bus. Output: a cat",
    "two cats\nOutput:",
    "  yes Question: is it red? Short answer: no",
    "red, white and blue",
    "Answer: blue",
    "Short",
    "",
    "skiing, surfing",
    "the dogs are running Question",
]


def test_postprocess_caption_and_vqa_hand_worked():
  assert metrics.postprocess_caption('A "big" red bus. Output: a cat') == "A big red bus."
  assert metrics.postprocess_caption("two cats\nOutput:") == "two cats"
  assert metrics.postprocess_caption("no cut here ") == "no cut here"
  assert metrics.postprocess_vqa("  yes Question: is it red? Short answer: no") == "yes"
  assert metrics.postprocess_vqa("red, white and blue") == "red"
  assert metrics.postprocess_vqa("red,white") == "red,white"  # the cut needs ", "
  assert metrics.postprocess_vqa("Answer: blue") == ""
  assert metrics.postprocess_vqa("blue\nShort answer: red") == "blue"


def test_postprocess_matches_openflamingo():
  coco = _of_eval_module("coco_metric")
  vqa = _of_eval_module("vqa_metric")
  for text in GENERATIONS:
    # evaluate.py removes the quotes after postprocess_captioning_generation; we also strip.
    want = coco.postprocess_captioning_generation(text).replace('"', "").strip()
    assert metrics.postprocess_caption(text) == want, text
    assert metrics.postprocess_vqa(text) == vqa.postprocess_vqa_generation(text).strip(), text


# OK-VQA stemming. "-ing" expectations are nltk 3.10.4's WordNetLemmatizer().lemmatize(w, "v") with
# WordNet 3.0 (computed offline; nltk's data cannot be downloaded here), including WordNet's
# shortest-lemma quirks ("rating" -> "rat"); plural expectations are inflection.singularize.
OK_VQA_CASES = {
    # OpenFlamingo's manual table wins over the rules.
    "clothes": "cloth", "riding": "ride", "leaves": "leaf", "christmas": "christmas",
    "tennis": "tennis", "yes": "yes", "dining": "dine",
    # "-ing": WordNet verb lemmatization (a capitalized word is not in WordNet's index: unchanged).
    "skiing": "ski", "running": "run", "swimming": "swim", "snowboarding": "snowboard",
    "rating": "rat", "hoping": "hop", "shining": "shin", "singing": "sing", "dying": "die",
    "evening": "even", "ceiling": "ceiling", "thing": "thing", "icing": "ice", "Skiing": "Skiing",
    # Plural nouns are singularized by inflection; other words stay.
    "dogs": "dog", "two dogs": "two dog", "glasses": "glass", "people": "person",
    "children": "child", "knives": "knife", "fire hydrants": "fire hydrant", "legos": "lego",
    "bus": "bus", "gas": "gas", "news": "news", "is": "is", "baseball": "baseball",
    # nltk's tokenizer splits clitics and final periods; OpenFlamingo joins the tokens with spaces.
    "men's": "man 's", "dog.": "dog .", "the dogs are running": "the dog are run",
}


@pytest.mark.parametrize("answer,want", sorted(OK_VQA_CASES.items()))
def test_postprocess_ok_vqa_cases(answer, want):
  assert metrics.postprocess_ok_vqa(answer + " Question: what?") == want


def test_ok_vqa_manual_table_is_openflamingos():
  of = _of_eval_module("ok_vqa_utils")
  assert okvqa_stemmer._MANUAL_MATCHES == of._MANUAL_MATCHES


def test_ok_vqa_stemmer_follows_openflamingos_rules(monkeypatch):
  """OpenFlamingo's own `OKVQAStemmer.stem`, with nltk's data-backed parts (tagger, WordNet, punkt)
  replaced by ours, gives our output: same branch order, table precedence and joining."""
  of = _of_eval_module("ok_vqa_utils")
  import nltk

  monkeypatch.setattr(nltk.tokenize, "word_tokenize",
                      lambda text: nltk.tokenize.NLTKWordTokenizer().tokenize(text))
  monkeypatch.setattr(nltk, "pos_tag", lambda words: [
      (w, "NNS" if okvqa_stemmer.is_plural_noun(w) else "NN") for w in words])

  class Lemmatizer:
    def lemmatize(self, word, pos):
      assert pos == "v"
      return okvqa_stemmer.lemmatize_verb(word)

  monkeypatch.setattr(of.stemmer, "_wordnet_lemmatizer", Lemmatizer())
  answers = list(OK_VQA_CASES) + GENERATIONS + ["jeans and leaves", "kid's toys", "hamburgers"]
  for text in answers:
    assert metrics.postprocess_ok_vqa(text) == of.postprocess_ok_vqa_generation(text), text


# ------------------------------------------------------------------------------------------------
# VQA accuracy


def test_vqa_scores_hand_worked():
  # 10 human answers, k of them "cat". Leaving out one of the k matching answers leaves k - 1, one of
  # the 10 - k others leaves k: acc = (k min(1, (k-1)/3) + (10-k) min(1, k/3)) / 10.
  # k=1: 9/3/10 = 0.3; k=2: (2/3 + 16/3)/10 = 0.6; k=3: (3*2/3 + 7)/10 = 0.9; k=4: 1.
  gts = [["cat"] * k + ["dog"] * (10 - k) for k in range(6)]
  assert metrics.vqa_scores(["cat"] * 6, gts) == pytest.approx([0.0, 0.3, 0.6, 0.9, 1.0, 1.0])
  assert metrics.vqa_accuracy(["cat"] * 6, gts) == pytest.approx(100 * 3.8 / 6)


def test_vqa_normalization():
  ten = lambda a: [[a] * 10]  # noqa: E731
  same = [("Two", "2"), ("the dog", "dog"), ("A Dog", "dog"), ("dont", "don't"), ("yes.", "yes"),
          ("10,000", "10000"), ("hot-dog", "hot dog"), ("none", "0"), ("Yes!", "yes"),
          ("  red\tcar\n", "red car"), ("1.5", "1.5"), ("(left)", "left")]
  for pred, gt in same:
    assert metrics.vqa_scores([pred], ten(gt)) == [1.0], (pred, gt)
  different = [("1.5", "15"), ("dogs", "dog"), ("red car", "redcar"), ("eleven", "11")]
  for pred, gt in different:
    assert metrics.vqa_scores([pred], ten(gt)) == [0.0], (pred, gt)


def test_vqa_normalization_tables_are_openflamingos():
  of = _of_eval_module("vqa_metric").VQAEval(None, None)
  assert metrics._CONTRACTIONS == of.contractions
  assert metrics._NUMBER_WORDS == of.manualMap
  assert sorted(metrics._ARTICLES) == sorted(of.articles)
  assert metrics._PUNCTUATION == of.punct
  assert metrics._PERIOD_STRIP.pattern == of.periodStrip.pattern
  assert metrics._COMMA_STRIP.pattern == of.commaStrip.pattern


def test_vqa_errors():
  with pytest.raises(ValueError, match="2 predictions but 1"):
    metrics.vqa_scores(["a", "b"], [["a"]])
  with pytest.raises(ValueError, match=r"gt_answers\[0\]"):
    metrics.vqa_scores(["a"], [[]])
  with pytest.raises(ValueError, match=r"gt_answers\[0\]"):
    metrics.vqa_scores(["a"], ["a"])
  with pytest.raises(ValueError, match="no predictions"):
    metrics.vqa_accuracy([], [])


_VQA_VOCAB = ["2", "two", "Two", "the dog", "dog", "a dog", "dog.", "Dogs", "hot-dog", "hot dog",
              "yes", "Yes!", "no", "none", "0", "10,000", "10000", "dont", "don't", "1.5", "15",
              "red, white", "red white", "red/white", "it's", "its", "left (side)", "left side"]


def _openflamingo_vqa(tmp_path, predictions, gt_answers):
  """OpenFlamingo's VQA evaluation on our inputs, through its files, as evaluate.py runs it:
  (compute_vqa_accuracy's overall accuracy, per-question accuracies in percent)."""
  of = _of_eval_module("vqa_metric")
  questions = {"info": {}, "task_type": "Open-Ended", "data_type": "mscoco", "data_subtype": "val",
               "license": {}, "questions": [
                   {"question_id": i, "image_id": i, "question": "?"} for i in range(len(predictions))]}
  annotations = {"annotations": [
      {"question_id": i, "image_id": i, "question_type": "what", "answer_type": "other",
       "answers": [{"answer": a, "answer_id": j + 1, "answer_confidence": "yes"}
                   for j, a in enumerate(answers)]}
      for i, answers in enumerate(gt_answers)]}
  results = [{"question_id": i, "answer": p} for i, p in enumerate(predictions)]
  paths = {}
  for name, data in [("q", questions), ("a", annotations), ("r", results)]:
    paths[name] = str(tmp_path / f"{name}.json")
    pathlib.Path(paths[name]).write_text(json.dumps(data))
  overall = of.compute_vqa_accuracy(paths["r"], paths["q"], paths["a"])
  vqa = of.VQA(paths["a"], paths["q"])
  evaluator = of.VQAEval(vqa, vqa.loadRes(paths["r"], paths["q"]), n=2)
  evaluator.evaluate()
  return overall, [evaluator.evalQA[i] for i in range(len(predictions))]


def test_vqa_accuracy_matches_openflamingo(tmp_path, capsys):
  rng = random.Random(0)
  gt_answers = [[rng.choice(_VQA_VOCAB) for _ in range(rng.choice([10, 10, 10, 5]))]
                for _ in range(300)]
  predictions = [rng.choice(_VQA_VOCAB) for _ in gt_answers]
  # Hand-made questions in front: each k of 10 matching, and normalization-only matches.
  for k in range(6):
    gt_answers.insert(0, ["cat"] * k + ["dog"] * (10 - k))
    predictions.insert(0, "Cat.")
  gt_answers.insert(0, ["2"] * 3 + ["two dogs"] * 7)
  predictions.insert(0, "two")
  overall, per_question = _openflamingo_vqa(tmp_path, predictions, gt_answers)
  capsys.readouterr()  # OpenFlamingo prints progress
  scores = metrics.vqa_scores(predictions, gt_answers)
  assert [round(100 * s, 2) for s in scores] == per_question
  assert per_question[:7] == [90.0, 100.0, 100.0, 90.0, 60.0, 30.0, 0.0]
  ours = metrics.vqa_accuracy(predictions, gt_answers)
  assert abs(ours - overall) <= 0.005 + 1e-9  # OpenFlamingo rounds to 2 decimals
  assert 0 < overall < 100


# ------------------------------------------------------------------------------------------------
# CIDEr-D


def test_cider_hand_worked():
  # Two images, no n-gram shared between them: every n-gram has df = 1, idf = log 2 - log 1.
  # "a cat" vs its only reference "a cat": unigram and bigram cosines 1, no 3-/4-grams (0), same
  # length: 10 * (1 + 1 + 0 + 0) / 4 = 5 per image; x100 -> 500.
  assert metrics.cider(["a cat", "A dog."], [["a cat"], ["a dog"]]) == pytest.approx(500.0)
  # "black cat" vs "black cat sat": unigram cosine 2 / (sqrt 2 sqrt 3), bigram 1 / sqrt 2; lengths
  # (in bigrams, as pycocoevalcap counts them) 1 vs 2 -> penalty exp(-1 / (2 * 6^2)).
  first = 10 * (2 / math.sqrt(6) + 1 / math.sqrt(2)) / 4 * math.exp(-1 / 72)
  got = metrics.cider(["black cat", "a dog"], [["black cat sat"], ["a dog"]])
  assert got == pytest.approx(100 * (first + 5) / 2, abs=1e-9)
  assert got == pytest.approx(437.8235, abs=1e-4)
  # One image: idf = log(1) - log(1) = 0 for every n-gram, so CIDEr-D is 0 whatever the caption.
  assert metrics.cider(["a cat"], [["a cat"]]) == 0.0


def test_cider_errors():
  with pytest.raises(ValueError, match="2 predictions but 1"):
    metrics.cider(["a", "b"], [["a"]])
  with pytest.raises(ValueError, match=r"references\[1\]"):
    metrics.cider(["a", "b"], [["a"], []])
  with pytest.raises(ValueError, match="no predictions"):
    metrics.cider([], [])


def _random_caption(rng):
  words = "a the man woman dog cat two sitting on of in with riding red big table bus street".split()
  return " ".join(rng.choice(words) for _ in range(rng.randint(1, 14)))


def test_cider_d_matches_pycocoevalcap():
  cider_module = pytest.importorskip("pycocoevalcap.cider.cider")
  rng = random.Random(0)
  for _ in range(10):
    n = rng.randint(1, 40)
    preds = [_random_caption(rng) for _ in range(n)]
    refs = [[_random_caption(rng) for _ in range(rng.randint(1, 6))] for _ in range(n)]
    want, want_each = cider_module.Cider().compute_score(
        {i: refs[i] for i in range(n)}, {i: [preds[i]] for i in range(n)})
    got_each = metrics._cider_d_scores([p.split() for p in preds],
                                       [[r.split() for r in rs] for rs in refs])
    np.testing.assert_allclose(got_each, want_each, rtol=0, atol=1e-9)
    assert metrics.cider(preds, refs) == pytest.approx(100 * want, abs=1e-9)


def test_ptb_tokenize_hand_worked():
  tok = lambda s: " ".join(metrics._ptb_tokenize(s))  # noqa: E731
  assert tok("A man riding a wave on top of a surfboard.") == (
      "a man riding a wave on top of a surfboard")
  assert tok("Two dogs (one brown) playing!") == "two dogs -lrb- one brown -rrb- playing"
  assert tok("A cat's toy; a dog can't, \"quotes\"?") == "a cat 's toy a dog ca n't quotes"
  assert tok("A dog. A cat at St. Louis in the U.S.") == "a dog a cat at st. louis in the u.s."
  assert tok("a black-and-white photo -- 3.5 feet... wait") == (
      "a black-and-white photo 3.5 feet wait")
  assert tok("the dog\u2019s \u201cbone\u201d\u2026") == "the dog 's bone"


# Typical COCO-style captions and generations, with the punctuation and casing models produce.
CAPTIONS = [
    "A man riding a wave on top of a surfboard.", "A group of people standing around a kitchen.",
    "A plate of food with broccoli, rice, and meat.", "Two zebras grazing on grass in a field.",
    "A red double-decker bus driving down a city street.", "a close up of a pizza on a plate",
    "A young boy swinging a baseball bat at a ball.", "The man is holding a frisbee in the park",
    "A bathroom with a toilet, sink, and shower.", "The cat is laying on the laptop keyboard!",
    "A stop sign at the corner of 5th Ave. and Main St.", "A \"no parking\" sign on a pole.",
    "A person holding an umbrella in the rain; it's raining hard.", "Is that a hot dog?",
    "The train (number 42) arrives at the station.", "A 2-year-old kid eating a sandwich.",
    "A woman is cutting a cake. She smiles.", "A MAN ON A HORSE", "a dog's bone, a cat's toy",
    "There's a dog, isn't there?", "A black-and-white photo of a 1950's car -- old.",
    "people can't stop won't stop", "Mr. Smith at 3:30 p.m. with $5.50 and 10,000 people...",
    "  leading spaces and  double   spaces ", "A sign that says 'STOP'.", "an image of a dog:",
    "U.S. flag on the pole. ", "a [bracket] {brace} a/b e&f 50%", "wait...what a -- b a--b",
    "the dog\u2019s \u201cbone\u201d isn\u2019t big\u2026", "cannot go", "A. B. c. x.",
]


def _java_ptb_tokenizer():
  if shutil.which("java") is None:
    pytest.skip("pycocoevalcap's PTBTokenizer needs Java")
  return pytest.importorskip("pycocoevalcap.tokenizer.ptbtokenizer").PTBTokenizer()


def test_ptb_tokenize_matches_java_ptbtokenizer():
  java = _java_ptb_tokenizer().tokenize({i: [{"caption": c}] for i, c in enumerate(CAPTIONS)})
  for i, caption in enumerate(CAPTIONS):
    assert " ".join(metrics._ptb_tokenize(caption)) == java[i][0], caption


def test_cider_matches_coco_caption_evaluation():
  """Raw captions through pycocoevalcap's PTBTokenizer + Cider (what COCOEvalCap does) vs `cider`."""
  tokenizer = _java_ptb_tokenizer()
  cider_module = pytest.importorskip("pycocoevalcap.cider.cider")
  rng = random.Random(1)
  n = 20
  preds = [rng.choice(CAPTIONS) for _ in range(n)]
  refs = [rng.sample(CAPTIONS, 5) for _ in range(n)]
  gts = tokenizer.tokenize({i: [{"caption": r} for r in refs[i]] for i in range(n)})
  res = tokenizer.tokenize({i: [{"caption": preds[i]}] for i in range(n)})
  want, _ = cider_module.Cider().compute_score(gts, res)
  assert want > 0
  assert metrics.cider(preds, refs) == pytest.approx(100 * want, abs=1e-9)


# ------------------------------------------------------------------------------------------------
# Classification


def test_roc_auc_hand_worked_with_ties():
  # Positives 0.35, 0.8, 0.4; negatives 0.1, 0.4, 0.4. Of the 9 pairs the positive wins 1 (0.35) +
  # 3 (0.8) + 1 (0.4 > 0.1) and ties 2 (0.4 = 0.4, half each): 6 / 9.
  labels = [0, 0, 1, 1, 0, 1]
  scores = [0.1, 0.4, 0.35, 0.8, 0.4, 0.4]
  assert metrics.roc_auc(labels, scores) == pytest.approx(200 / 3)
  assert metrics.roc_auc(np.array(labels), np.array(scores)) == pytest.approx(200 / 3)
  # sklearn's documented example: roc_auc_score([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8]) == 0.75.
  assert metrics.roc_auc([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8]) == pytest.approx(75.0)
  assert metrics.roc_auc([1, 1, 2, 2], [0.1, 0.4, 0.35, 0.8]) == pytest.approx(75.0)  # larger = pos
  assert metrics.roc_auc([0, 1, 0, 1], [0.5] * 4) == pytest.approx(50.0)  # all tied
  assert metrics.roc_auc([1, 0], [0.2, 0.9]) == 0.0


def test_roc_auc_errors():
  with pytest.raises(ValueError, match="exactly two classes"):
    metrics.roc_auc([1, 1, 1], [0.1, 0.2, 0.3])
  with pytest.raises(ValueError, match="3 labels but 2 scores"):
    metrics.roc_auc([0, 1, 1], [0.1, 0.2])
  with pytest.raises(ValueError, match="finite"):
    metrics.roc_auc([0, 1], [0.1, float("nan")])


def test_top1_accuracy():
  assert metrics.top1_accuracy([1, 2, 0, 4], [1, 2, 3, 4]) == 75.0
  assert metrics.top1_accuracy(np.array([3, 3]), np.array([3, 1])) == 50.0
  assert metrics.top1_accuracy(["cat", "dog", "cat"], ["cat", "cat", "cat"]) == pytest.approx(200 / 3)
  with pytest.raises(ValueError, match="2 predictions but 1"):
    metrics.top1_accuracy([1, 2], [1])
  with pytest.raises(ValueError, match="no predictions"):
    metrics.top1_accuracy([], [])
