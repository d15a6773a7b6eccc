"""`vlm_jax.paths`: local paths absolute, URLs and names untouched, every path field of a config found
(stages, mixture components, few-shot tasks), shared references kept shared."""

import os

import ml_collections
import pytest

from tests.train.configs_loader import ROOT
from vlm_jax import paths
from vlm_jax.config_base import load_config


@pytest.fixture
def cwd(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  return str(tmp_path)


def test_resolve(cwd):
  assert paths.resolve("runs/x") == os.path.join(cwd, "runs", "x")
  assert paths.resolve("./runs/../runs/x/") == os.path.join(cwd, "runs", "x")
  assert paths.resolve("~/data") == os.path.join(os.path.expanduser("~"), "data")
  assert paths.resolve("/abs/p") == "/abs/p"
  # Patterns stay patterns; URLs, None and "" pass through.
  assert paths.resolve("laion/{000000..000999}.tar") == f"{cwd}/laion/{{000000..000999}}.tar"
  for url in ("gs://bucket/runs/x", "s3://b/k", "memory://m/x", "hf+https://x/y"):
    assert paths.resolve(url) == url
  assert paths.resolve(None) is None and paths.resolve("") == ""
  assert paths.resolve_all({"train": ["a/*.tar", "gs://b/c"], "eval": "e.jsonl"}) == {
    "train": [f"{cwd}/a/*.tar", "gs://b/c"], "eval": f"{cwd}/e.jsonl"}


def test_resolve_config_finds_every_path_field(cwd):
  os.makedirs("conv/lm")
  c = ml_collections.ConfigDict()
  c.hf_checkpoint = "openflamingo/OpenFlamingo-3B-vitl-mpt1b"   # an HF id, not a path
  c.model_name = "flamingo"
  c.data = ml_collections.ConfigDict(dict(
    source="mmc4", paths="mmc4/{0..3}.jsonl", image_dir="imgs", tokenizer="openflamingo:conv/lm",
    tfds_name="mmc4", mixture={"laion": {"paths": ["laion/*.tar", "gs://b/l/*.tar"]}},
    path={"train": "llava.json"}))
  c.data.mixture.laion.tokenizer = c.data.get_ref("tokenizer")
  c.init = ml_collections.ConfigDict(dict(checkpoint="conv/of3b", checkpoint_prefix="lm/"))
  c.init.stage = ml_collections.ConfigDict(dict(data=dict(tokenizer="synthetic", image_dir="s/i")))
  c.fewshot = ml_collections.ConfigDict(dict(rices_vision="", rices_projection="p.npy", tasks=dict(
    coco=dict(karpathy_json="coco/k.json", image_dir="coco"),
    vqav2=dict(train_questions="q.json", train_annotations="a.json", test_image_dir="v"),
    imagenet=dict(class_names="names.txt", train_dir="tr"))))
  c.lock()
  changes = {k: new for k, _, new in paths.resolve_config(c)}
  j = lambda p: os.path.join(cwd, p)  # noqa: E731
  assert c.data.paths == j("mmc4/{0..3}.jsonl") and c.data.image_dir == j("imgs")
  assert c.data.tokenizer == "openflamingo:" + j("conv/lm")
  assert c.data.mixture.laion.tokenizer == c.data.tokenizer          # the reference still shared
  assert c.data.mixture.laion.paths == [j("laion/*.tar"), "gs://b/l/*.tar"]
  assert c.data.path.train == j("llava.json")
  assert c.init.checkpoint == j("conv/of3b") and c.init.checkpoint_prefix == "lm/"
  assert c.init.stage.data.image_dir == j("s/i") and c.init.stage.data.tokenizer == "synthetic"
  t = c.fewshot.tasks
  assert (t.coco.karpathy_json, t.coco.image_dir) == (j("coco/k.json"), j("coco"))
  assert t.vqav2.train_questions == j("q.json") and t.vqav2.train_annotations == j("a.json")
  assert t.vqav2.test_image_dir == j("v")
  assert (t.imagenet.class_names, t.imagenet.train_dir) == (j("names.txt"), j("tr"))
  assert c.fewshot.rices_projection == j("p.npy") and c.fewshot.rices_vision == ""
  assert c.hf_checkpoint == "openflamingo/OpenFlamingo-3B-vitl-mpt1b"
  assert c.data.tfds_name == "mmc4" and c.data.source == "mmc4" and c.model_name == "flamingo"
  assert "hf_checkpoint" not in changes and len(changes) == 15  # the shared tokenizer once
  assert paths.resolve_config(c) == []  # idempotent


def test_tokenizer_names_are_not_paths(cwd):
  c = ml_collections.ConfigDict(dict(tokenizer="openflamingo:mpt-1b-redpajama-200b"))
  assert paths.resolve_config(c) == [] and c.tokenizer == "openflamingo:mpt-1b-redpajama-200b"
  open("tok.json", "w").close()
  c = ml_collections.ConfigDict(dict(tokenizer="tok.json"))
  paths.resolve_config(c)
  assert c.tokenizer == os.path.join(cwd, "tok.json")


def test_every_shipped_config_resolves(cwd):
  """The real presets: nothing but paths changes, and every placeholder stays None."""
  for name, arg in (("flamingo.py", None), ("flamingo.py", "of3b"),
                    ("eval_flamingo.py", "of3b,coco,vqav2,imagenet,hateful_memes")):
    c = load_config(os.path.join(ROOT, "configs", name), arg)
    before = c.to_dict()
    changes = paths.resolve_config(c)
    assert all(old != new and os.path.isabs(new if isinstance(new, str) else new[0])
               for _, old, new in changes), changes
    assert c.to_dict() == before  # the presets hold no relative path: placeholders stay None
