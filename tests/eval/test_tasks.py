"""Few-shot task readers on tiny hand-made files: Karpathy captions, VQA question + annotation JSON,
HatefulMemes jsonl, ImageNet-style folders and CSVs, the synthetic corpus; bad files fail naming the
file and the field."""

import json

import numpy as np
import pytest
from PIL import Image

from vlm_jax.eval import inputs, tasks


def _png(path, colour=(200, 30, 30)):
  path.parent.mkdir(parents=True, exist_ok=True)
  Image.fromarray(np.full((40, 48, 3), colour, np.uint8)).save(path)
  return path


def _write(path, obj):
  path.write_text(json.dumps(obj))
  return str(path)


def _karpathy(tmp_path):
  images = [
    {"split": "train", "filepath": "train2014", "filename": "a.jpg", "cocoid": 1,
     "sentences": [{"raw": " A cat. "}, {"raw": "A kitten."}]},
    {"split": "restval", "filepath": "val2014", "filename": "b.jpg", "cocoid": 2,
     "sentences": [{"raw": "A dog."}]},
    {"split": "test", "filepath": "val2014", "filename": "c.jpg", "cocoid": 3,
     "sentences": [{"raw": "A bus."}, {"raw": "A red bus."}]},
  ]
  return _write(tmp_path / "dataset_coco.json", {"images": images})


def test_karpathy_splits_references_and_image_paths(tmp_path):
  path = _karpathy(tmp_path)
  task = tasks.build_task("coco", {"dataset": "coco", "karpathy_json": path,
                                   "image_dir": str(tmp_path)}, 32)
  assert task.kind == "captioning" and task.metric == "cider" and task.max_new_tokens == 20
  assert [r["id"] for r in task.train] == [1]  # "train" only, as OpenFlamingo (no restval)
  assert task.train[0]["answer"] == "A cat."  # first caption, stripped (OF: caption.strip())
  assert task.test[0]["references"] == ["A bus.", "A red bus."]
  assert task.test[0]["image"][0] == str(tmp_path / "val2014" / "c.jpg")
  with_restval = tasks.build_task("coco", {"dataset": "coco", "karpathy_json": path,
                                           "image_dir": str(tmp_path),
                                           "demo_splits": ["train", "restval"]}, 32)
  assert [r["id"] for r in with_restval.train] == [1, 2]
  # Images load from <image_dir>/<filepath>/<filename>, or <image_dir>/<filename>.
  _png(tmp_path / "c.jpg")
  loader = inputs.ImageLoader(32)
  (img,) = loader.load([task.test[0]], [("coco", "test", 0)], "coco")
  assert img.shape == (32, 32, 3) and img.dtype == np.uint8
  with pytest.raises(FileNotFoundError, match=r"task coco: image of record 1 not found.*a\.jpg"):
    loader.load([task.train[0]], [("coco", "train", 0)], "coco")
  (tmp_path / "a.jpg").write_bytes(b"not an image")
  with pytest.raises(ValueError, match="record 1 is unusable"):
    loader.load([task.train[0]], [("coco", "train", 0)], "coco")


def _vqa_files(tmp_path, split, qids):
  questions = [{"question_id": q, "image_id": 7 + q, "question": f"Q{q}?"} for q in qids]
  annotations = [{"question_id": q, "answers": [{"answer": f"a{q}"}] * 9 + [{"answer": "x"}]}
                 for q in reversed(qids)]  # another order: matched by question_id, not position
  return (_write(tmp_path / f"{split}_q.json", {"questions": questions}),
          _write(tmp_path / f"{split}_a.json", {"annotations": annotations}))


def test_vqa_reader(tmp_path):
  tq, ta = _vqa_files(tmp_path, "train", [1, 2])
  vq, va = _vqa_files(tmp_path, "val", [5])
  cfg = {"dataset": "vqav2", "train_questions": tq, "train_annotations": ta,
         "train_image_dir": str(tmp_path / "train2014"), "test_questions": vq,
         "test_annotations": va, "test_image_dir": str(tmp_path / "val2014")}
  task = tasks.build_task("vqav2", cfg, 32)
  assert task.kind == "vqa" and task.max_new_tokens == 5 and task.postprocess == "vqa"
  assert task.train[1] == {"id": 2, "image": str(tmp_path / "train2014" / "COCO_train2014_000000000009.jpg"),
                           "question": "Q2?", "answer": "a2", "references": ["a2"] * 9 + ["x"]}
  assert task.test[0]["image"].endswith("val2014/COCO_val2014_000000000012.jpg")
  ok = tasks.build_task("okvqa", {**cfg, "dataset": "ok_vqa"}, 32)
  assert ok.postprocess == "ok_vqa"
  text = tasks.build_task("textvqa", {**cfg, "dataset": "textvqa"}, 32)
  assert text.max_new_tokens == 10 and text.test[0]["image"].endswith("val2014/12.jpg")
  # Errors name the file and what is wrong.
  with pytest.raises(ValueError, match="should end in one of"):
    tasks.build_task("vqav2", {**cfg, "train_image_dir": str(tmp_path / "imgs")}, 32)
  bad_q = _write(tmp_path / "bad_q.json", {"questions": [{"question_id": 9, "image_id": 1,
                                                          "question": "?"}]})
  with pytest.raises(ValueError, match=r"bad_q\.json: questions\[0\]: question_id 9 has no entry"):
    tasks.build_task("vqav2", {**cfg, "train_questions": bad_q}, 32)
  no_field = _write(tmp_path / "nofield.json", {"questions": [{"question_id": 1, "image_id": 1}]})
  with pytest.raises(ValueError, match=r"nofield\.json: questions\[0\] has no field 'question'"):
    tasks.build_task("vqav2", {**cfg, "train_questions": no_field}, 32)
  (tmp_path / "broken.json").write_text("{not json")
  with pytest.raises(ValueError, match=r"broken\.json is not valid JSON"):
    tasks.build_task("vqav2", {**cfg, "test_annotations": str(tmp_path / "broken.json")}, 32)
  with pytest.raises(FileNotFoundError, match="missing.json does not exist"):
    tasks.build_task("vqav2", {**cfg, "test_questions": str(tmp_path / "missing.json")}, 32)
  with pytest.raises(ValueError, match=r"config.fewshot.tasks.vqav2.test_questions is required"):
    tasks.build_task("vqav2", {**cfg, "test_questions": None}, 32)


def test_hateful_memes_reader(tmp_path):
  lines = [{"id": 1, "img": "img/01.png", "text": "hello", "label": 0},
           {"id": 2, "img": "img/02.png", "text": "bye", "label": 1}]
  path = tmp_path / "train.jsonl"
  path.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
  cfg = {"dataset": "hateful_memes", "image_dir": str(tmp_path / "img"),
         "train_annotations": str(path), "test_annotations": str(path)}
  task = tasks.build_task("hm", cfg, 32)
  assert task.metric == "roc_auc" and task.class_names == ("no", "yes")
  assert task.train[1] == {"id": 2, "image": str(tmp_path / "img" / "02.png"), "ocr": "bye",
                           "answer": "yes", "label": 1}
  bad = tmp_path / "bad.jsonl"
  bad.write_text(json.dumps(lines[0]) + "\n" + json.dumps({**lines[1], "label": 3}) + "\n")
  with pytest.raises(ValueError, match=r"bad\.jsonl: line 2: label 3 must be 0 or 1"):
    tasks.build_task("hm", {**cfg, "test_annotations": str(bad)}, 32)
  bad.write_text('{"id": 1, "img": "a.png", "label": 0}\n')
  with pytest.raises(ValueError, match=r"bad\.jsonl: line 1 has no field 'text'"):
    tasks.build_task("hm", {**cfg, "test_annotations": str(bad)}, 32)


def test_imagenet_style_readers(tmp_path):
  names = tmp_path / "classes.txt"
  names.write_text("tench\ngoldfish\n")
  for split in ("train", "val"):
    _png(tmp_path / split / "n01" / "x.JPEG")
    _png(tmp_path / split / "n02" / "y.png")
  cfg = {"dataset": "imagenet", "class_names": str(names), "train_dir": str(tmp_path / "train"),
         "test_dir": str(tmp_path / "val")}
  task = tasks.build_task("imagenet", cfg, 32)
  assert task.class_names == ("tench", "goldfish") and task.metric == "top1_accuracy"
  assert [(r["answer"], r["label"]) for r in task.test] == [("tench", 0), ("goldfish", 1)]
  csv = tmp_path / "test.csv"
  csv.write_text("image,label\nval/n01/x.JPEG,1\nval/n02/y.png,tench\n")
  task = tasks.build_task("imagenet", {"dataset": "imagenet", "class_names": str(names),
                                       "train_dir": str(tmp_path / "train"),
                                       "test_annotations": str(csv), "image_dir": str(tmp_path)}, 32)
  assert [r["label"] for r in task.test] == [1, 0]
  csv.write_text("image,label\nval/n01/x.JPEG,zebra\n")
  with pytest.raises(ValueError, match=r"test\.csv: row 0: label 'zebra' is neither"):
    tasks.build_task("imagenet", {"dataset": "imagenet", "class_names": str(names),
                                  "train_dir": str(tmp_path / "train"),
                                  "test_annotations": str(csv), "image_dir": str(tmp_path)}, 32)
  names.write_text("tench\n")
  with pytest.raises(ValueError, match="2 class subdirectories but class_names lists 1"):
    tasks.build_task("imagenet", cfg, 32)


def test_synthetic_tasks_and_unknown_dataset():
  cap = tasks.build_task("c", {"dataset": "synthetic_caption", "num_train": 4, "num_test": 2}, 32)
  rec = cap.test[0]
  assert rec["image"].shape == (32, 32, 3) and rec["references"] == [rec["answer"]]
  assert rec["answer"].startswith(("a small ", "a large ")) and rec["answer"].endswith(".")
  assert tasks.synthetic_description("There is a large red cross on the left.") == (
    "a large red cross on the left.")
  vqa = tasks.build_task("v", {"dataset": "synthetic_vqa", "num_train": 4, "num_test": 2}, 32)
  assert vqa.test[0]["question"] in ("What colour is the shape?", "What shape is it?")
  cls = tasks.build_task("s", {"dataset": "synthetic_classification", "num_train": 4,
                               "num_test": 2}, 32)
  assert cls.class_names[cls.test[1]["label"]] == cls.test[1]["answer"]
  with pytest.raises(ValueError, match=r"config.fewshot.tasks.x.dataset='cifar' is not one of"):
    tasks.build_task("x", {"dataset": "cifar"}, 32)
