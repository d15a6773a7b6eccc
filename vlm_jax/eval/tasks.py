"""Few-shot evaluation tasks read from local files (OpenFlamingo's datasets) or the synthetic corpus.

A `Task` holds two sequences of records, `train` (where demonstrations come from) and `test` (the
queries). A record is a flat dict:

  id          the example's id (COCO image id, question id, file name, ...)
  image       a path to an image file, or uint8[H, W, 3]
  answer      the demonstration's answer: first caption (stripped), first GT answer, class name
  references  captioning: every reference caption; VQA: every GT answer (10 in VQAv2)
  label       classification: index into Task.class_names
  + the fields the task's prompt template names ({question}, {ocr}).

Readers and the files they expect (`config.fewshot.tasks.<name>` fields in brackets):

  coco, flickr30k   Karpathy-split JSON [karpathy_json] (`dataset_coco.json`, `dataset_flickr30k.json`:
                    {"images": [{"split", "filename", ["filepath"], "sentences": [{"raw"}], ["cocoid"]}]})
                    and [image_dir] holding `<filepath>/<filename>` or `<filename>`. Queries are
                    split "test", demonstrations split "train" only, as OpenFlamingo ([demo_splits]
                    adds "restval"). References are all the image's "raw" sentences (the captions of
                    COCO's own annotation file for these images).
  vqav2, ok_vqa,    official question JSON {"questions": [{"question_id", "image_id", "question"}]} +
  textvqa, vizwiz   annotation JSON {"annotations": [{"question_id", "answers": [{"answer"}]}]} per
                    split [train_questions, train_annotations, train_image_dir, test_questions,
                    test_annotations, test_image_dir]; answers are matched by question_id.
                    Image files: COCO_<train2014|val2014>_<image_id:012d>.jpg (the split from the image
                    dir's name), <image_id>.jpg (TextVQA), <image_id> (VizWiz); [image_pattern] overrides.
  imagenet          [class_names] (.txt, one per line, or a JSON list) and per split either an
                    ImageFolder tree [train_dir, test_dir] (class i = i-th subdirectory in sorted order,
                    as torchvision) or a CSV/JSON list of (image, label) [train_annotations,
                    test_annotations] with [image_dir]; a label is a class index or a class name.
  hateful_memes     jsonl lines {"id", "img", "text", "label": 0|1} [train_annotations,
                    test_annotations] and [image_dir] holding basename(img).
  synthetic_caption, synthetic_vqa, synthetic_classification
                    the embedded corpus (`vlm_jax.data.synthetic`): demonstrations from its train
                    split, queries from its eval split [num_train, num_test, seed]; prompts follow the
                    corpus's own format, which the embedded model was trained on.

Bad input fails with an error naming the file (or config field) and the record and field at fault.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import re
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from vlm_jax.data import synthetic
from vlm_jax.data.special_tokens import EOC_TOKEN, EOS_TOKEN, MEDIA_TOKEN
from vlm_jax.eval import prompts

KINDS = ("captioning", "vqa", "classification")
HM_CLASS_NAMES = ("no", "yes")  # OpenFlamingo's HM_CLASSNAMES; AUC scores p("yes")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm")


@dataclasses.dataclass(frozen=True)
class Task:
  """One benchmark. `metric`: cider | vqa_accuracy | top1_accuracy | roc_auc; `postprocess`: caption
  | vqa | ok_vqa (generation tasks)."""

  name: str
  kind: str
  metric: str
  template: str
  train: Sequence[dict]
  test: Sequence[dict]
  max_new_tokens: int = 0
  postprocess: str = ""
  class_names: tuple[str, ...] = ()

  def __post_init__(self):
    if self.kind not in KINDS:
      raise ValueError(f"task {self.name}: kind {self.kind!r} is not one of {KINDS}")
    prompts.check_template(self.template, f"config.fewshot.tasks.{self.name}")
    if not len(self.train) or not len(self.test):
      raise ValueError(f"task {self.name}: {len(self.train)} demonstration records and "
                       f"{len(self.test)} query records; both must be non-empty")

  @property
  def separator(self) -> str:
    if self.kind == "classification":
      return prompts.CLASSIFICATION_SEPARATOR
    return prompts.GENERATION_SEPARATOR


class LazyRecords:
  """A read-only sequence whose i-th record is `make(i)`, built on access (synthetic images)."""

  def __init__(self, n: int, make: Callable[[int], dict], fingerprint: str):
    self._n, self._make = n, make
    self.fingerprint = fingerprint  # identifies the records without building them (cache keys)

  def __len__(self) -> int:
    return self._n

  def __getitem__(self, i: int) -> dict:
    if not 0 <= i < self._n:
      raise IndexError(i)
    return self._make(int(i))


# ---------------------------------------------------------------------------------------------------
# File helpers: every error names the file and what was expected.


def _require(cfg: Mapping[str, Any], key: str, task: str) -> str:
  value = cfg.get(key)
  if not value:
    raise ValueError(f"config.fewshot.tasks.{task}.{key} is required for dataset "
                     f"{cfg.get('dataset')!r}")
  return os.fspath(value)


def _existing(path: str, field: str) -> str:
  if not os.path.exists(path):
    raise FileNotFoundError(f"{field}: {path} does not exist")
  return path


def _load_json(path: str, field: str) -> Any:
  _existing(path, field)
  try:
    with open(path) as f:
      return json.load(f)
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise ValueError(f"{field}: {path} is not valid JSON ({e})") from None


def _field(record: Any, key: str, where: str, kind: type | tuple = object) -> Any:
  if not isinstance(record, dict) or key not in record:
    raise ValueError(f"{where} has no field {key!r}")
  value = record[key]
  if not isinstance(value, kind):
    raise ValueError(f"{where}: field {key!r} is {type(value).__name__}, expected "
                     f"{getattr(kind, '__name__', kind)}")
  return value


def _list_field(obj: Any, key: str, path: str) -> list:
  if not isinstance(obj, dict) or not isinstance(obj.get(key), list):
    raise ValueError(f"{path}: expected a JSON object with a list {key!r} at the top level")
  return obj[key]


# ---------------------------------------------------------------------------------------------------
# Captioning: Karpathy splits.


def read_karpathy(path: str, image_dir: str, splits: Sequence[str], *, field: str = "karpathy_json"
                  ) -> list[dict]:
  """Records of the Karpathy-split JSON whose "split" is in `splits` (see the module docstring)."""
  images = _list_field(_load_json(path, field), "images", path)
  out = []
  for i, item in enumerate(images):
    where = f"{path}: images[{i}]"
    if _field(item, "split", where, str) not in splits:
      continue
    filename = _field(item, "filename", where, str)
    sentences = _field(item, "sentences", where, list)
    if not sentences:
      raise ValueError(f"{where}: 'sentences' is empty")
    refs = [_field(s, "raw", f"{where}.sentences[{j}]", str) for j, s in enumerate(sentences)]
    image_id = item.get("cocoid", os.path.splitext(filename)[0])
    candidates = [os.path.join(image_dir, item.get("filepath", ""), filename),
                  os.path.join(image_dir, filename)]
    out.append({"id": image_id, "image": candidates, "answer": refs[0].strip(), "references": refs})
  if not out:
    raise ValueError(f"{path}: no image has split in {list(splits)}")
  return out


# ---------------------------------------------------------------------------------------------------
# VQA: official question + annotation files.

_VQA_IMAGE_PATTERNS = {"vqav2": "COCO_{coco_split}_{image_id:012d}.jpg",
                       "ok_vqa": "COCO_{coco_split}_{image_id:012d}.jpg",
                       "textvqa": "{image_id}.jpg", "vizwiz": "{image_id}"}
_COCO_SPLITS = ("train2014", "val2014", "test2015")


def read_vqa(questions_path: str, annotations_path: str, image_dir: str, dataset: str,
             image_pattern: str | None = None, *, field: str = "questions") -> list[dict]:
  """Records of a VQA split: question JSON + annotation JSON, matched by question_id."""
  pattern = image_pattern or _VQA_IMAGE_PATTERNS[dataset]
  coco_split = os.path.basename(os.path.normpath(image_dir))
  if "{coco_split}" in pattern and coco_split not in _COCO_SPLITS:
    raise ValueError(f"{dataset}: image dir {image_dir} should end in one of {_COCO_SPLITS} (its "
                     "name gives the COCO_<split>_ file prefix); or set image_pattern")
  questions = _list_field(_load_json(questions_path, f"{field} questions"), "questions",
                          questions_path)
  annotations = _list_field(_load_json(annotations_path, f"{field} annotations"), "annotations",
                            annotations_path)
  answers = {}
  for i, a in enumerate(annotations):
    where = f"{annotations_path}: annotations[{i}]"
    qid = _field(a, "question_id", where)
    answers[qid] = [str(_field(x, "answer", f"{where}.answers[{j}]"))
                    for j, x in enumerate(_field(a, "answers", where, list))]
    if not answers[qid]:
      raise ValueError(f"{where}: 'answers' is empty")
  out = []
  for i, q in enumerate(questions):
    where = f"{questions_path}: questions[{i}]"
    qid = _field(q, "question_id", where)
    if qid not in answers:
      raise ValueError(f"{where}: question_id {qid!r} has no entry in {annotations_path}")
    image_id = _field(q, "image_id", where)
    try:
      name = pattern.format(image_id=image_id, coco_split=coco_split)
    except (ValueError, TypeError) as e:
      raise ValueError(f"{where}: image_id {image_id!r} does not fit image pattern {pattern!r} "
                       f"({e})") from None
    out.append({"id": qid, "image": os.path.join(image_dir, name),
                "question": _field(q, "question", where, str), "answer": answers[qid][0],
                "references": answers[qid]})
  if not out:
    raise ValueError(f"{questions_path}: no questions")
  return out


# ---------------------------------------------------------------------------------------------------
# Classification: ImageNet-style and HatefulMemes.


def read_class_names(path: str) -> tuple[str, ...]:
  _existing(path, "class_names")
  if path.endswith(".json"):
    names = _load_json(path, "class_names")
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
      raise ValueError(f"class_names: {path} must hold a JSON list of strings")
  else:
    with open(path) as f:
      names = [line.strip() for line in f if line.strip()]
  if len(set(names)) != len(names) or not names:
    raise ValueError(f"class_names: {path} must list distinct, non-empty class names "
                     f"({len(names)} names, {len(set(names))} distinct)")
  return tuple(names)


def read_image_folder(root: str, class_names: Sequence[str], *, field: str) -> list[dict]:
  """ImageFolder layout: class i = the i-th subdirectory of `root` in sorted order (torchvision)."""
  _existing(root, field)
  classes = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))
  if len(classes) != len(class_names):
    raise ValueError(f"{field}: {root} has {len(classes)} class subdirectories but class_names "
                     f"lists {len(class_names)}")
  out = []
  for label, cls in enumerate(classes):
    for name in sorted(os.listdir(os.path.join(root, cls))):
      if name.lower().endswith(IMAGE_EXTENSIONS):
        out.append({"id": f"{cls}/{name}", "image": os.path.join(root, cls, name),
                    "answer": class_names[label], "label": label})
  if not out:
    raise ValueError(f"{field}: {root} holds no images ({', '.join(IMAGE_EXTENSIONS)})")
  return out


def read_labelled_images(path: str, image_dir: str, class_names: Sequence[str], *, field: str
                         ) -> list[dict]:
  """A CSV (header with `image` and `label` columns) or JSON list of {"image", "label"}."""
  _existing(path, field)
  if path.endswith(".json"):
    rows = _load_json(path, field)
    if not isinstance(rows, list):
      raise ValueError(f"{field}: {path} must hold a JSON list of {{'image', 'label'}} objects")
  else:
    with open(path, newline="") as f:
      reader = csv.DictReader(f)
      if not reader.fieldnames or not {"image", "label"} <= set(reader.fieldnames):
        raise ValueError(f"{field}: {path} must be a CSV whose header has 'image' and 'label' "
                         f"columns, got {reader.fieldnames}")
      rows = list(reader)
  index = {n: i for i, n in enumerate(class_names)}
  out = []
  for i, row in enumerate(rows):
    where = f"{path}: row {i}"
    image = str(_field(row, "image", where))
    raw = _field(row, "label", where)
    if isinstance(raw, str) and raw.strip().lstrip("-").isdigit():
      raw = int(raw)
    if isinstance(raw, int) and not isinstance(raw, bool) and 0 <= raw < len(class_names):
      label = raw
    elif isinstance(raw, str) and raw in index:
      label = index[raw]
    else:
      raise ValueError(f"{where}: label {raw!r} is neither a class index in [0, "
                       f"{len(class_names)}) nor a name in class_names")
    out.append({"id": image, "image": os.path.join(image_dir, image), "answer": class_names[label],
                "label": label})
  if not out:
    raise ValueError(f"{field}: {path} has no rows")
  return out


def read_hateful_memes(path: str, image_dir: str, *, field: str) -> list[dict]:
  """HatefulMemes jsonl: {"id", "img", "text", "label": 0|1}; image = image_dir/basename(img)."""
  _existing(path, field)
  out = []
  with open(path) as f:
    for n, line in enumerate(f, 1):
      if not line.strip():
        continue
      where = f"{path}: line {n}"
      try:
        rec = json.loads(line)
      except json.JSONDecodeError as e:
        raise ValueError(f"{where} is not valid JSON ({e})") from None
      label = _field(rec, "label", where, int)
      if label not in (0, 1):
        raise ValueError(f"{where}: label {label!r} must be 0 or 1")
      img = _field(rec, "img", where, str)
      out.append({"id": rec.get("id", img), "image": os.path.join(image_dir, img.split("/")[-1]),
                  "ocr": _field(rec, "text", where, str), "answer": HM_CLASS_NAMES[label],
                  "label": label})
  if not out:
    raise ValueError(f"{field}: {path} has no records")
  return out


# ---------------------------------------------------------------------------------------------------
# The synthetic corpus.

# The corpus's captions start with one of four phrases, and after a bare <image> its documents more
# often ask a question than describe; the task fixes the phrase so that the answer, and the
# reference, is the description itself ("a large red circle on the left.").
SYNTHETIC_CAPTION_TEMPLATE = "<image>This image shows {answer}"
SYNTHETIC_VQA_TEMPLATE = "<image>Question: {question} Answer: {answer}"
SYNTHETIC_CLASSIFICATION_TEMPLATE = f"<image>Question: {synthetic.SHAPE_QUESTION} Answer: {{answer}}"
_QUESTION = re.compile(r"Question: (.*?) Answer:")


def _caption_regex(template: str) -> re.Pattern:
  words = {"size": synthetic.SIZES, "colour": synthetic.COLOURS, "shape": synthetic.SHAPES,
           "where": tuple(synthetic.POSITION_PHRASES.values())}
  parts = re.split(r"\{(\w+)\}", template)
  pattern = "".join(re.escape(p) if i % 2 == 0 else
                    f"(?P<{p}>{'|'.join(map(re.escape, words[p]))})" for i, p in enumerate(parts))
  return re.compile(f"^{pattern}$")


_CAPTION_REGEXES = [_caption_regex(t) for t in synthetic.CAPTION_TEMPLATES]


def synthetic_description(caption: str) -> str:
  """A corpus caption -> its description "a {size} {colour} {shape} {where}." (what follows "This
  image shows")."""
  for regex in _CAPTION_REGEXES:
    m = regex.match(caption)
    if m:
      return "a {size} {colour} {shape} {where}.".format(**m.groupdict())
  raise ValueError(f"synthetic caption {caption!r} matches no template of vlm_jax.data.synthetic")


def _strip_markup(text: str) -> str:
  for token in (MEDIA_TOKEN, EOC_TOKEN, EOS_TOKEN):
    text = text.replace(token, "")
  return text.strip()


def _synthetic_records(kind: str, split: str, n: int, image_size: int, seed: int) -> LazyRecords:
  source_kind = {"caption": "pairs", "vqa": "vqa", "classification": "classification"}[kind]
  source = synthetic.SyntheticSource(source_kind, split=split, num_records=n, image_size=image_size,
                                     max_images=1, seed=seed)

  def make(i: int) -> dict:
    rec = source[i]
    out = {"id": f"{split}/{i}", "image": rec["images"][0]}
    if kind == "caption":
      description = synthetic_description(_strip_markup(rec["text"]))
      out.update(answer=description, references=[description])
    elif kind == "vqa":
      # Ten identical GT answers, the shape of a VQAv2 annotation: a match scores 1.
      out.update(question=_QUESTION.search(rec["prompt"]).group(1), answer=rec["answer"],
                 references=[rec["answer"]] * 10)
    else:
      out.update(answer=synthetic.SHAPES[rec["label"]], label=int(rec["label"]))
    return out
  return LazyRecords(n, make, f"synthetic:{source!r}")


# ---------------------------------------------------------------------------------------------------
# The task registry: config.fewshot.tasks.<name> = {"dataset": ..., <files>, [template],
# [max_new_tokens]}.

def _caption_task(name, cfg, image_size):
  del image_size
  path = _existing(_require(cfg, "karpathy_json", name), f"config.fewshot.tasks.{name}.karpathy_json")
  image_dir = _require(cfg, "image_dir", name)
  demo_splits = tuple(cfg.get("demo_splits") or ("train",))
  return dict(kind="captioning", metric="cider", postprocess="caption", max_new_tokens=20,
              template=prompts.CAPTION_TEMPLATE,
              train=read_karpathy(path, image_dir, demo_splits),
              test=read_karpathy(path, image_dir, (cfg.get("query_split") or "test",)))


def _vqa_task(name, cfg, image_size):
  del image_size
  dataset = cfg["dataset"]
  splits = {}
  for split in ("train", "test"):
    image_dir = cfg.get(f"{split}_image_dir") or cfg.get("image_dir")
    if not image_dir:
      raise ValueError(f"config.fewshot.tasks.{name}.{split}_image_dir (or image_dir) is required")
    splits[split] = read_vqa(_require(cfg, f"{split}_questions", name),
                             _require(cfg, f"{split}_annotations", name), image_dir, dataset,
                             cfg.get("image_pattern"), field=f"config.fewshot.tasks.{name}.{split}")
  return dict(kind="vqa", metric="vqa_accuracy",
              postprocess="ok_vqa" if dataset == "ok_vqa" else "vqa",
              max_new_tokens=10 if dataset == "textvqa" else 5, template=prompts.VQA_TEMPLATE,
              train=splits["train"], test=splits["test"])


def _imagenet_task(name, cfg, image_size):
  del image_size
  names = read_class_names(_require(cfg, "class_names", name))
  splits = {}
  for split in ("train", "test"):
    field = f"config.fewshot.tasks.{name}"
    if cfg.get(f"{split}_dir"):
      splits[split] = read_image_folder(cfg[f"{split}_dir"], names, field=f"{field}.{split}_dir")
    else:
      splits[split] = read_labelled_images(_require(cfg, f"{split}_annotations", name),
                                           _require(cfg, "image_dir", name), names,
                                           field=f"{field}.{split}_annotations")
  return dict(kind="classification", metric="top1_accuracy", template=prompts.IMAGENET_TEMPLATE,
              class_names=names, train=splits["train"], test=splits["test"])


def _hateful_memes_task(name, cfg, image_size):
  del image_size
  image_dir = _require(cfg, "image_dir", name)
  return dict(kind="classification", metric="roc_auc", template=prompts.HATEFUL_MEMES_TEMPLATE,
              class_names=HM_CLASS_NAMES,
              train=read_hateful_memes(_require(cfg, "train_annotations", name), image_dir,
                                       field=f"config.fewshot.tasks.{name}.train_annotations"),
              test=read_hateful_memes(_require(cfg, "test_annotations", name), image_dir,
                                      field=f"config.fewshot.tasks.{name}.test_annotations"))


def _synthetic_task(kind):
  def build(name, cfg, image_size):
    del name
    n_train, n_test = int(cfg.get("num_train", 256)), int(cfg.get("num_test", 64))
    seed = int(cfg.get("seed", 0))
    common = dict(train=_synthetic_records(kind, "train", n_train, image_size, seed),
                  test=_synthetic_records(kind, "eval", n_test, image_size, seed))
    if kind == "caption":
      return dict(kind="captioning", metric="cider", postprocess="caption", max_new_tokens=20,
                  template=SYNTHETIC_CAPTION_TEMPLATE, **common)
    if kind == "vqa":
      return dict(kind="vqa", metric="vqa_accuracy", postprocess="vqa", max_new_tokens=5,
                  template=SYNTHETIC_VQA_TEMPLATE, **common)
    return dict(kind="classification", metric="top1_accuracy",
                template=SYNTHETIC_CLASSIFICATION_TEMPLATE, class_names=synthetic.SHAPES, **common)
  return build


DATASETS: dict[str, Callable[..., dict]] = {
  "coco": _caption_task, "flickr30k": _caption_task,
  "vqav2": _vqa_task, "ok_vqa": _vqa_task, "textvqa": _vqa_task, "vizwiz": _vqa_task,
  "imagenet": _imagenet_task, "hateful_memes": _hateful_memes_task,
  "synthetic_caption": _synthetic_task("caption"), "synthetic_vqa": _synthetic_task("vqa"),
  "synthetic_classification": _synthetic_task("classification"),
}


def build_task(name: str, cfg: Mapping[str, Any], image_size: int) -> Task:
  """`config.fewshot.tasks.<name>` -> Task. `template` and `max_new_tokens` override the dataset's."""
  cfg = dict(cfg)
  dataset = cfg.get("dataset", name)
  if dataset not in DATASETS:
    raise ValueError(f"config.fewshot.tasks.{name}.dataset={dataset!r} is not one of "
                     f"{sorted(DATASETS)}")
  cfg["dataset"] = dataset
  spec = DATASETS[dataset](name, cfg, image_size)
  if cfg.get("template"):
    spec["template"] = cfg["template"]
  if cfg.get("max_new_tokens"):
    spec["max_new_tokens"] = int(cfg["max_new_tokens"])
  return Task(name=name, **spec)


def image_candidates(record: Mapping[str, Any]) -> list[Any]:
  """The record's image: a list of candidate paths (first existing wins), one path, or an array."""
  image = record["image"]
  if isinstance(image, np.ndarray):
    return [image]
  return list(image) if isinstance(image, (list, tuple)) else [image]
