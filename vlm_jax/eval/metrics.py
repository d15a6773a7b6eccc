"""Task metrics of the OpenFlamingo few-shot evaluation, with its answer post-processing.

Each function names the protocol it follows (reference/flamingo.md section 5, OpenFlamingo's
`open_flamingo/eval/`) and how it differs. Scores are percentages, as OpenFlamingo reports them.

- Captioning (COCO, Flickr30K): `postprocess_caption`, `cider` (CIDEr-D of the COCO caption evaluation,
  pycocoevalcap, including its tokenization, in Python).
- VQA (VQAv2, OK-VQA, TextVQA, VizWiz): `postprocess_vqa`, `postprocess_ok_vqa`, `vqa_scores`,
  `vqa_accuracy` (the VQA evaluation's answer normalization and leave-one-out accuracy).
- Classification: `roc_auc` (HatefulMemes), `top1_accuracy` (ImageNet).

Writing results is the evaluator's job, not this module's.
"""

import functools
import math
import re
from collections import Counter
from collections.abc import Sequence

import numpy as np

from vlm_jax.eval import okvqa_stemmer

# ------------------------------------------------------------------------------------------------
# Post-processing of generated text (open_flamingo/eval/coco_metric.py, vqa_metric.py, ok_vqa_utils.py)


def postprocess_caption(text: str) -> str:
  """A generated caption cut where the model starts the next demo, quotes removed, stripped.

  OpenFlamingo: `postprocess_captioning_generation(text).replace('"', "")`, i.e.
  `text.split("Output", 1)[0]` without `"`. The strip is ours; the caption tokenizer ignores the
  surrounding whitespace anyway, so CIDEr is unchanged.
  """
  return text.split("Output", 1)[0].replace('"', "").strip()


def postprocess_vqa(text: str) -> str:
  """A generated answer cut at the next "Question"/"Answer"/"Short" and at the first ", ", stripped.

  OpenFlamingo's `postprocess_vqa_generation`; the strip is ours (the VQA evaluation strips answers
  before comparing them, so accuracy is unchanged).
  """
  answer = re.split("Question|Answer|Short", text, maxsplit=1)[0]
  return answer.split(", ", 1)[0].strip()


def postprocess_ok_vqa(text: str) -> str:
  """`postprocess_vqa`, then OK-VQA's stemming of the answer (OpenFlamingo's
  `postprocess_ok_vqa_generation`).

  OpenFlamingo stems with nltk's POS tagger and WordNet lemmatizer, whose data nltk downloads at run
  time; `vlm_jax.eval.okvqa_stemmer` does the same steps from data shipped in the nltk, inflection and
  lemminflect wheels. Its docstring says where the result can differ (the tagger is replaced by a
  lexicon rule; WordNet's verb list by lemminflect's, 87% agreement on "-ing" words).
  """
  return okvqa_stemmer.stem(postprocess_vqa(text))


# ------------------------------------------------------------------------------------------------
# VQA accuracy (open_flamingo/eval/vqa_metric.py = the VQA evaluation's vqaEval.py, as OF ships it)

# Verbatim from the VQA evaluation code (including its oddities, e.g. "somebody'd" -> "somebodyd":
# changing them would change scores).
_CONTRACTIONS = {
  "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
  "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't",
  "dont": "don't", "hadnt": "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've",
  "hasnt": "hasn't", "havent": "haven't", "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've",
  "hes": "he's", "howd": "how'd", "howll": "how'll", "hows": "how's", "Id've": "I'd've",
  "I'dve": "I'd've", "Im": "I'm", "Ive": "I've", "isnt": "isn't", "itd": "it'd",
  "itd've": "it'd've", "it'dve": "it'd've", "itll": "it'll", "let's": "let's", "maam": "ma'am",
  "mightnt": "mightn't", "mightnt've": "mightn't've", "mightn'tve": "mightn't've",
  "mightve": "might've", "mustnt": "mustn't", "mustve": "must've", "neednt": "needn't",
  "notve": "not've", "oclock": "o'clock", "oughtnt": "oughtn't", "ow's'at": "'ow's'at",
  "'ows'at": "'ow's'at", "'ow'sat": "'ow's'at", "shant": "shan't", "shed've": "she'd've",
  "she'dve": "she'd've", "she's": "she's", "shouldve": "should've", "shouldnt": "shouldn't",
  "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've", "somebody'd": "somebodyd",
  "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've", "somebodyll": "somebody'll",
  "somebodys": "somebody's", "someoned": "someone'd", "someoned've": "someone'd've",
  "someone'dve": "someone'd've", "someonell": "someone'll", "someones": "someone's",
  "somethingd": "something'd", "somethingd've": "something'd've", "something'dve": "something'd've",
  "somethingll": "something'll", "thats": "that's", "thered": "there'd", "thered've": "there'd've",
  "there'dve": "there'd've", "therere": "there're", "theres": "there's", "theyd": "they'd",
  "theyd've": "they'd've", "they'dve": "they'd've", "theyll": "they'll", "theyre": "they're",
  "theyve": "they've", "twas": "'twas", "wasnt": "wasn't", "wed've": "we'd've", "we'dve": "we'd've",
  "weve": "we've", "werent": "weren't", "whatll": "what'll", "whatre": "what're", "whats": "what's",
  "whatve": "what've", "whens": "when's", "whered": "where'd", "wheres": "where's",
  "whereve": "where've", "whod": "who'd", "whod've": "who'd've", "who'dve": "who'd've",
  "wholl": "who'll", "whos": "who's", "whove": "who've", "whyll": "why'll", "whyre": "why're",
  "whys": "why's", "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't",
  "wouldnt've": "wouldn't've", "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll",
  "y'allll": "y'all'll", "yall'd've": "y'all'd've", "y'alld've": "y'all'd've",
  "y'all'dve": "y'all'd've", "youd": "you'd", "youd've": "you'd've", "you'dve": "you'd've",
  "youll": "you'll", "youre": "you're", "youve": "you've",
}
_NUMBER_WORDS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4",
                 "five": "5", "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
_ARTICLES = frozenset(["a", "an", "the"])
_PUNCTUATION = [";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@",
                "`", ",", "?", "!"]
# The evaluation code's pattern, kept as written: "(?!<=\d)" is a look-ahead (it meant the look-behind
# "(?<!\d)"), so the pattern removes every period not followed by a digit ("1.5" keeps its period,
# "5." loses it).
_PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")
_COMMA_STRIP = re.compile(r"(\d)(\,)(\d)")


def _normalize_answer(answer: str) -> str:
  """The VQA evaluation's answer normalization (`processPunctuation`, then `processDigitArticle`)."""
  text = answer.replace("\n", " ").replace("\t", " ").strip()
  out = text
  for p in _PUNCTUATION:
    # Punctuation next to a space, or anywhere in an answer holding a number like 10,000, is deleted;
    # elsewhere it becomes a space ("hot-dog" -> "hot dog").
    if p + " " in text or " " + p in text or _COMMA_STRIP.search(text) is not None:
      out = out.replace(p, "")
    else:
      out = out.replace(p, " ")
  # The original passes re.UNICODE (= 32) as sub's third argument, which is `count`: at most 32 periods
  # go. Kept so that answers score identically.
  out = _PERIOD_STRIP.sub("", out, 32)
  words = [_NUMBER_WORDS.get(w, w) for w in out.lower().split()]
  return " ".join(_CONTRACTIONS.get(w, w) for w in words if w not in _ARTICLES)


def vqa_scores(predictions: Sequence[str], gt_answers: Sequence[Sequence[str]]) -> list[float]:
  """Per-question VQA accuracy in [0, 1] (not a percentage), in the order given.

  The VQA evaluation (Antol et al. 2015; `vqaEval.py`, as in OpenFlamingo's vqa_metric.py): the
  prediction and every human answer are normalized (punctuation, number words -> digits, articles
  dropped, contractions restored); for each of the n human answers, acc_i = min(1, #matches among the
  other n - 1 / 3), and the question scores mean_i acc_i. With 10 answers of which k match:
  k = 0 -> 0, 1 -> 0.3, 2 -> 0.6, 3 -> 0.9, k >= 4 -> 1.

  The normalization is OpenFlamingo's: the prediction and the human answers always get both steps.
  (The VQA repository's vqaEval.py punctuation-normalizes the human answers only when they disagree
  and never applies the digit/article step to them, the released answers being normalized already;
  OpenFlamingo's copy does both always, and its numbers are the ones we match.)

  Leave-one-out is by position. OpenFlamingo's code leaves out every answer *record* equal to the
  held-out one; VQAv2 and OK-VQA records carry distinct `answer_id`s, so that is the same thing. For an
  annotation file whose records have no distinct id (identical {"answer", "answer_confidence"}
  records, as in raw VizWiz) OpenFlamingo would drop all identical records at once and score lower.
  """
  if len(predictions) != len(gt_answers):
    raise ValueError(f"vqa_scores: {len(predictions)} predictions but {len(gt_answers)} answer lists")
  scores = []
  for i, (prediction, answers) in enumerate(zip(predictions, gt_answers)):
    if isinstance(answers, str) or not answers:
      raise ValueError(f"vqa_scores: gt_answers[{i}] must be a non-empty list of strings, got "
                       f"{answers!r}")
    pred = _normalize_answer(prediction)
    matches = [_normalize_answer(a) == pred for a in answers]
    total = sum(matches)
    # Leaving out answer j keeps total - matches[j] matching answers.
    scores.append(sum(min(1.0, (total - m) / 3) for m in matches) / len(matches))
  return scores


def vqa_accuracy(predictions: Sequence[str], gt_answers: Sequence[Sequence[str]]) -> float:
  """VQA accuracy in percent: 100 x the mean of `vqa_scores` over the questions.

  OpenFlamingo reports `VQAEval.accuracy["overall"]`, the same number rounded to 2 decimals; we leave
  the rounding to whoever prints it.
  """
  if not predictions:
    raise ValueError("vqa_accuracy: no predictions")
  return 100.0 * float(np.mean(vqa_scores(predictions, gt_answers)))


# ------------------------------------------------------------------------------------------------
# CIDEr-D (pycocoevalcap: tokenizer/ptbtokenizer.py, cider/cider_scorer.py)

# Tokens pycocoevalcap drops after Stanford's PTBTokenizer. It lower-cases tokens (-lowerCase) before
# this filter, so the bracket escapes here never match: "(" survives as "-lrb-", and so here.
_PTB_DROPPED = frozenset(["''", "'", "``", "`", "-LRB-", "-RRB-", "-LCB-", "-RCB-", ".", "?", "!", ",",
                          ":", "-", "--", "...", ";"])
_PTB_BRACKETS = {"(": "-lrb-", ")": "-rrb-", "[": "-lsb-", "]": "-rsb-", "{": "-lcb-", "}": "-rcb-"}
_PTB_ASCII = str.maketrans({"\u2018": "'", "\u2019": "'", "\u201c": '"', "\u201d": '"', "\u2026": "..."})
# Words PTBTokenizer keeps a period on mid-caption (its abbreviation lists, the common part).
_PTB_ABBREVIATIONS = frozenset(
    "mr mrs ms dr drs prof st mt ft jr sr gen col lt capt sgt rev gov sen rep co corp inc ltd bros vs "
    "etc al no nos jan feb mar apr jun jul aug sep sept oct nov dec ave rd blvd".split())


# Cached: an evaluation scores the same references once per shot count and seed, and tokenizing is
# most of CIDEr's cost (~0.3 ms a caption).
@functools.lru_cache(maxsize=1 << 17)
def _ptb_tokenize(caption: str) -> tuple[str, ...]:
  """pycocoevalcap's caption tokenization, in Python: the tokens it scores.

  pycocoevalcap runs Stanford CoreNLP 3.4.1's PTBTokenizer (Java) with -preserveLines -lowerCase and
  drops the punctuation tokens in `_PTB_DROPPED`. Here: nltk's Treebank-style word tokenizer (the same
  conventions: "dog's" -> "dog 's", "can't" -> "ca n't", "cannot" -> "can not", quotes and periods
  split off), brackets escaped as PTBTokenizer does, a period split off a mid-caption word unless the
  word is an abbreviation (initials like "u.s.", single letters, `_PTB_ABBREVIATIONS`), lower case,
  then the same filter. Checked against the Java tokenizer on typical captions (tests). Known
  differences, all rare in captions: runs of "!"/"?" ("!!", "?!" stay single tokens in Java and are
  kept), "<b>" (one token in Java), "5:30pm" (Java splits off "pm"), "a+b=c" and "w/" (Java splits
  "+", "=", "/"), "rock'n'roll" and "'tis" (Java splits them).
  """
  from nltk.tokenize import NLTKWordTokenizer  # pylint: disable=g-import-not-at-top  (slow import)

  # PTB's escaping turns Unicode quotes and ellipses into ASCII ones before splitting.
  raw = NLTKWordTokenizer().tokenize(caption.replace("\n", " ").translate(_PTB_ASCII))
  tokens = []
  for tok in raw:
    if tok == "." and tokens and _ptb_abbreviation(tokens[-1] + "."):
      tokens[-1] += "."  # nltk splits the caption's last period off; PTB keeps it on an abbreviation
    elif tok.endswith(".") and len(tok) > 1 and not _ptb_abbreviation(tok):
      tokens.append(tok[:-1])  # a sentence end inside the caption; the period is dropped below
    else:
      tokens.append(_PTB_BRACKETS.get(tok, tok))
  tokens = [t.lower() for t in tokens]
  # PTB turns any run of periods into an ellipsis, which is dropped.
  return tuple(t for t in tokens if t not in _PTB_DROPPED and t.strip("."))


def _ptb_abbreviation(token: str) -> bool:
  """Whether PTBTokenizer keeps the final period on `token` ("u.s.", "p.m.", "a.", "st.")."""
  stem = token[:-1]
  return "." in stem or (len(stem) == 1 and stem.isalpha()) or stem.lower() in _PTB_ABBREVIATIONS


def _ngrams(tokens: Sequence[str], n: int) -> Counter:
  return Counter(tuple(tokens[i:i + k]) for k in range(1, n + 1) for i in range(len(tokens) - k + 1))


def _cider_d_scores(candidates: Sequence[Sequence[str]], references: Sequence[Sequence[Sequence[str]]],
                    n: int = 4, sigma: float = 6.0) -> list[float]:
  """Per-image CIDEr-D of tokenized captions, as pycocoevalcap's `CiderScorer` computes it.

  Document frequencies come from the references of the images scored (each image counts an n-gram
  once); idf = log(#images) - log(max(1, df)). Per n-gram order, candidate and each reference are
  tf-idf vectors; sim = sum over the candidate's n-grams of min(c, r) * r (clipping), over |c| |r|
  (both norms of the unclipped vectors; left unnormalized when either is 0), times the length penalty
  exp(-(len_c - len_r)^2 / (2 sigma^2)). Score = 10 x mean over orders, mean over references. As in
  pycocoevalcap the "length" is the number of bigrams (its counter sits under `n == 1`, which indexes
  bigrams), not of words; kept so the penalty matches.
  """
  cand_counts = [_ngrams(c, n) for c in candidates]
  ref_counts = [[_ngrams(r, n) for r in refs] for refs in references]
  df = Counter(g for refs in ref_counts for g in set().union(*refs))
  log_images = math.log(float(len(candidates)))

  def tfidf(counts):
    vec = [{} for _ in range(n)]
    for gram, tf in counts.items():
      vec[len(gram) - 1][gram] = tf * (log_images - math.log(max(1.0, df[gram])))
    norms = [math.sqrt(sum(v * v for v in order.values())) for order in vec]
    length = sum(tf for gram, tf in counts.items() if len(gram) == 2)
    return vec, norms, length

  scores = []
  for cand, refs in zip(cand_counts, ref_counts):
    vec, norm, length = tfidf(cand)
    total = np.zeros(n)
    for ref in refs:
      vec_r, norm_r, length_r = tfidf(ref)
      for k in range(n):
        val = sum(min(w, vec_r[k].get(g, 0.0)) * vec_r[k].get(g, 0.0) for g, w in vec[k].items())
        if norm[k] != 0 and norm_r[k] != 0:
          val /= norm[k] * norm_r[k]
        total[k] += val * math.exp(-((length - length_r) ** 2) / (2 * sigma**2))
    scores.append(float(np.mean(total)) / len(refs) * 10.0)
  return scores


def cider(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> float:
  """Corpus CIDEr-D in percent (100 x pycocoevalcap's `Cider` score), OpenFlamingo's caption metric.

  OpenFlamingo scores captions with pycocoevalcap's `COCOEvalCap` (PTBTokenizer, then `Cider`: n = 4,
  sigma = 6, document frequencies from the references of the images evaluated) and reports
  `CIDEr * 100`. Same computation here (`_cider_d_scores`, equal to pycocoevalcap's to 1e-9 in the
  tests), with the Java tokenizer replaced by `_ptb_tokenize`; pycocoevalcap itself is a test-only
  dependency (its wheel is ~100 MB of Java jars).

  predictions: one caption per image; references: the human captions of each image (COCO: 5).
  """
  if len(predictions) != len(references):
    raise ValueError(f"cider: {len(predictions)} predictions but {len(references)} reference lists")
  if not predictions:
    raise ValueError("cider: no predictions")
  for i, refs in enumerate(references):
    if isinstance(refs, str) or not refs:
      raise ValueError(f"cider: references[{i}] must be a non-empty list of strings, got {refs!r}")
  scores = _cider_d_scores([_ptb_tokenize(p) for p in predictions],
                           [[_ptb_tokenize(r) for r in refs] for refs in references])
  return 100.0 * float(np.mean(scores))


# ------------------------------------------------------------------------------------------------
# Classification


def roc_auc(labels: Sequence[int] | np.ndarray, scores: Sequence[float] | np.ndarray) -> float:
  """Area under the ROC curve in percent (HatefulMemes; OpenFlamingo calls sklearn's `roc_auc_score`).

  The larger of the two label values is the positive class, as in sklearn. AUC = P(score of a random
  positive > score of a random negative) + P(tie) / 2: the Mann-Whitney U over n_pos n_neg, from
  average ranks (scipy), which is what sklearn's trapezoidal curve gives with tied scores.
  OpenFlamingo returns the fraction (e.g. 0.65); we return percent (65.0), as the paper's tables do.
  """
  y = np.asarray(labels).ravel()
  s = np.asarray(scores, dtype=np.float64).ravel()
  if y.shape != s.shape:
    raise ValueError(f"roc_auc: {y.size} labels but {s.size} scores")
  if not np.all(np.isfinite(s)):
    raise ValueError("roc_auc: scores must be finite")
  classes = np.unique(y)
  if classes.size != 2:
    raise ValueError(f"roc_auc: labels must hold exactly two classes (ROC AUC is undefined "
                     f"otherwise), got {classes.tolist()}")
  from scipy import stats  # pylint: disable=g-import-not-at-top  (~1 s to import; only needed here)

  positive = y == classes[1]
  n_pos, n_neg = int(positive.sum()), int((~positive).sum())
  ranks = stats.rankdata(s)  # ties get their average rank
  u = ranks[positive].sum() - n_pos * (n_pos + 1) / 2.0
  return 100.0 * float(u / (n_pos * n_neg))


def top1_accuracy(predictions: Sequence, labels: Sequence) -> float:
  """Percent of predictions equal to their label (ImageNet; OpenFlamingo returns the fraction)."""
  if len(predictions) != len(labels):
    raise ValueError(f"top1_accuracy: {len(predictions)} predictions but {len(labels)} labels")
  if len(predictions) == 0:
    raise ValueError("top1_accuracy: no predictions")
  return 100.0 * sum(bool(p == t) for p, t in zip(predictions, labels)) / len(predictions)
