"""Few-shot evaluation: OpenFlamingo's seeded demonstration sampling, RICES ordering and its feature
cache, rank classification against a direct log-likelihood computation, and end to end on the tiny
synthetic config: the `fewshot` evaluator inside training, `--mode=eval` writing results.json, and the
generation CLI."""

import json
import os
import random
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from PIL import Image

from tests.train.configs_loader import ROOT, load_config
from vlm_jax import sharding
from vlm_jax.data import tokenizer as tok_lib
from vlm_jax.eval import fewshot, rices, scoring
from vlm_jax.models import build_model, vit
from vlm_jax.param_paths import flatten, unflatten

TASKS = {"cap": {"dataset": "synthetic_caption", "num_train": 40, "num_test": 6},
         "cls": {"dataset": "synthetic_classification", "num_train": 40, "num_test": 6}}


@pytest.fixture(scope="module")
def tiny():
  """The tiny Flamingo with random params whose tanh gates are open (images matter), and a Runner."""
  config = load_config("eval_flamingo", "tiny")
  model = build_model(config.model_name, config.model)
  s = config.model.vision.image_size
  params = nn.unbox(model.init(jax.random.PRNGKey(0), jnp.zeros((1, 1, s, s, 3)),
                               jnp.zeros((1, 8), jnp.int32))["params"])
  params = unflatten({k: jnp.full_like(v, 0.7) if k.endswith("_gate") else v
                      for k, v in flatten(params).items()})
  mesh = sharding.config_mesh(config)
  rules = sharding.logical_rules(None)
  runner = fewshot.runner_from_config(config, model, mesh, rules,
                                      overrides={"tasks": TASKS, "query_set_size": 16})
  return dict(config=config, model=model, params=params, runner=runner)


# ---------------------------------------------------------------------------------------------------
# Demonstration sampling


def test_demos_are_deterministic_per_seed_and_from_the_query_set(tiny):
  runner = tiny["runner"]
  task = runner.tasks["cap"]
  q1, d1 = runner.sample(task, 4, seed=3)
  q2, d2 = runner.sample(task, 4, seed=3)
  q3, d3 = runner.sample(task, 4, seed=4)
  np.testing.assert_array_equal(q1, q2)
  assert d1 == d2 and d1 != d3
  assert sorted(q1.tolist()) == list(range(6))  # num_samples=-1: the whole test split, permuted
  # OpenFlamingo: np.random.seed(seed); test subset; query set = next choice of query_set_size.
  rs = np.random.RandomState(3)
  rs.choice(6, 6, replace=False)
  query_set = set(rs.choice(40, 16, replace=False).tolist())
  for demos in d1:
    assert len(demos) == 4 and len(set(demos)) == 4 and set(demos) <= query_set
  _, zero = runner.sample(task, 0, seed=3)
  assert all(len(d) == 2 for d in zero)  # zero-shot: two (text-only) demonstrations


def test_sampling_equals_openflamingo_utils(tiny):
  """Same query set and per-query demonstrations as OpenFlamingo's own functions with the same seed."""
  of_utils = pytest.importorskip("open_flamingo.eval.utils")
  runner = tiny["runner"]
  task = runner.tasks["cap"]
  queries, demos = runner.sample(task, 4, seed=42)
  np.random.seed(42)
  of_queries = np.random.choice(len(task.test), len(task.test), replace=False)
  of_query_set = of_utils.get_query_set(list(range(len(task.train))), 16)
  random.seed(42)
  of_demos = of_utils.sample_batch_demos_from_query_set([int(i) for i in of_query_set], 4,
                                                        len(task.test))
  np.testing.assert_array_equal(queries, of_queries)
  assert demos == of_demos


# ---------------------------------------------------------------------------------------------------
# RICES


def _solid(colours):
  return np.stack([np.full((8, 8, 3), c, np.uint8) for c in colours])


def test_rices_puts_the_most_similar_demo_last(tmp_path):
  # Candidates are solid colours; the "encoder" is the mean colour, so similarity is known exactly.
  cand = _solid([(255, 0, 0), (0, 255, 0), (0, 0, 255), (200, 60, 0), (230, 20, 0)])

  def encode(images):
    return images.reshape(len(images), -1, 3).mean(1).astype(np.float32)

  r = rices.Rices(encode, lambda idx: cand[idx], len(cand), batch_size=2)
  # Cosine similarity: the query's hue angle is 3.7 deg; (230,20,0) [4] is at 5.0, (255,0,0) [0] at
  # 0, (200,60,0) [3] at 16.7: ranked 4, 0, 3, and returned most similar last.
  assert r.find(_solid([(235, 15, 0)]), 3) == [[3, 0, 4]]
  assert r.find(_solid([(0, 10, 250), (10, 250, 0)]), 1) == [[2], [1]]


def test_rices_with_our_clip_vit_and_its_cache(tmp_path):
  kwargs = dict(image_size=32, patch_size=8, width=32, depth=1, heads=2)
  params = nn.unbox(vit.Model(**kwargs).init(jax.random.PRNGKey(1),
                                             jnp.zeros((1, 32, 32, 3)))["params"])
  cand = np.random.default_rng(0).integers(0, 256, (7, 32, 32, 3), dtype=np.uint8)
  encode = rices.make_encoder(kwargs, params)
  cache = rices.cache_file(str(tmp_path), "t", [{"id": i} for i in range(7)], 32,
                           rices.params_digest(params))
  r = rices.Rices(encode, lambda idx: cand[idx], 7, batch_size=4, cache_path=cache)
  assert os.path.exists(cache) and r.features.shape == (7, 32)
  np.testing.assert_allclose(np.linalg.norm(r.features, axis=-1), 1.0, rtol=1e-5)
  assert r.find(cand[[5, 2]], 3, batch_size=4)[0][-1] == 5  # the identical image comes last
  assert r.find(cand[[5, 2]], 3, batch_size=4)[1][-1] == 2

  def no_images(idx):
    raise AssertionError("features should come from the cache")
  again = rices.Rices(encode, no_images, 7, batch_size=4, cache_path=cache)
  np.testing.assert_allclose(again.features, r.features)


def test_runner_rices_trial_runs(tiny, tmp_path):
  runner = tiny["runner"]
  runner.cfg["rices"] = True
  runner.workdir = str(tmp_path)
  try:
    score = runner.evaluate_trial(tiny["params"], runner.tasks["cls"], 2, seed=0)
  finally:
    runner.cfg["rices"] = False
    runner.workdir = None
  assert 0.0 <= score <= 100.0
  assert len(os.listdir(tmp_path / "rices")) == 1  # the train features, cached


# ---------------------------------------------------------------------------------------------------
# Rank classification


def _direct_scores(model, params, tok, vision_x, prompt_ids, class_names):
  """mean_j log p(c[j] | prompt, c[:j]), one unpadded forward per (example, class)."""
  out = np.zeros((len(prompt_ids), len(class_names)))
  for b, ids in enumerate(prompt_ids):
    for k, name in enumerate(class_names):
      cls = tok.encode(name, add_special_tokens=False).ids
      x = jnp.asarray([ids + cls], jnp.int32)
      logits, _ = model.apply({"params": params}, jnp.asarray(vision_x[b:b + 1]), x,
                              jnp.ones_like(x))
      lp = jax.nn.log_softmax(logits[0].astype(jnp.float32), -1)
      out[b, k] = np.mean([float(lp[len(ids) - 1 + j, t]) for j, t in enumerate(cls)])
  return out


@pytest.mark.parametrize("class_names", [("circle", "square", "triangle"),
                                         ("red circle", "blue", "small green square")])
def test_classification_picks_highest_mean_token_logprob(tiny, class_names):
  runner, model, params = tiny["runner"], tiny["model"], tiny["params"]
  tok = tok_lib.load_tokenizer("synthetic")
  texts = ["<image>Question: What shape is it? Answer:",
           "Answer: red<|endofchunk|><image>Question: What colour is the shape? Answer:"]
  rng = np.random.default_rng(0)
  vision_x = rng.integers(0, 256, (2, 1, 32, 32, 3), dtype=np.uint8)
  ids, mask, vx = runner._batch_inputs(texts, [[vision_x[0, 0]], [vision_x[1, 0]]], 0)
  assert ids.shape[1] == 64 and mask[0, 0] == 0  # left-padded up to the length bucket
  class_ids = scoring.class_token_ids(tok, class_names)
  got = runner.scorer.score(params, vx, ids, mask, class_ids, 0)[:2]
  prompt_ids = [tok.encode(t).ids for t in texts]
  want = _direct_scores(model, params, tok, vision_x, prompt_ids, class_names)
  np.testing.assert_allclose(got, want, atol=2e-4)
  np.testing.assert_array_equal(got.argmax(-1), want.argmax(-1))


# ---------------------------------------------------------------------------------------------------
# End to end on the tiny synthetic config


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """A tiny Flamingo trained by the real trainer with a `fewshot` evaluator in config.evals."""
  from vlm_jax.train.trainer import train_and_evaluate

  workdir = str(tmp_path_factory.mktemp("fewshot_run"))
  config = load_config("eval_flamingo", "tiny")
  config.evals = {"fewshot": dict(config.evals.fewshot, tasks={"v": {
    "dataset": "synthetic_vqa", "num_train": 16, "num_test": 4}}, shots=[0, 2], suffix="_x")}
  results, _ = train_and_evaluate(config, workdir)
  return workdir, results


def test_fewshot_evaluator_runs_inside_training(trained):
  _, results = trained
  assert {k for k in results if k.startswith("eval/")} == {"eval/fewshot_v_0shot_x",
                                                           "eval/fewshot_v_2shot_x"}
  assert all(0.0 <= results[k] <= 100.0 for k in results if k.startswith("eval/"))


@pytest.mark.slow
def test_mode_eval_writes_results_and_generate_cli_prints(trained, tmp_path):
  workdir, _ = trained
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  cmd = [sys.executable, "-m", "vlm_jax.main", "--mode=eval",
         "--config=configs/eval_flamingo.py:tiny", f"--workdir={workdir}"]
  proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  with open(os.path.join(workdir, "results.json")) as f:
    results = json.load(f)
  assert results["step"] == 6 and "train/loss" in results  # the trainer's results are kept
  fs = results["fewshot"]
  assert fs["step"] == 6 and fs["source"].endswith("checkpoints/6")
  assert set(fs["tasks"]) == {"synthetic_caption", "synthetic_vqa", "synthetic_classification"}
  for task in fs["tasks"].values():
    assert set(task["shots"]) == {"0", "4"}
    for r in task["shots"].values():
      assert set(r) == {"mean", "std", "trials", "seeds"} and r["seeds"] == [0, 1]
      assert len(r["trials"]) == 2 and r["mean"] == pytest.approx(np.mean(r["trials"]))
  assert fs["protocol"]["num_beams"] == 3 and fs["protocol"]["query_set_size"] == 2048
  events = os.listdir(os.path.join(workdir, "tensorboard"))
  assert any(name.startswith("events.out.tfevents") for name in events)
  assert "fewshot: 3 tasks in" in proc.stderr  # the summary line

  # The generation CLI loads the same checkpoint (in-process: `run` is what main() calls).
  from vlm_jax.generate import run

  image = tmp_path / "a.png"
  Image.fromarray(np.full((40, 40, 3), (220, 35, 35), np.uint8)).save(image)
  prompt = "<image>Question: What colour is the shape? Answer:"
  text = run(load_config("flamingo", "tiny"), workdir, [str(image)], prompt, max_new_tokens=3)
  # Reference: the checkpoint's params restored by hand, the image preprocessed as the data
  # pipeline does, and greedy argmax of a full (uncached) forward, one token at a time.
  from vlm_jax.data.images import clip_preprocess, decode_image
  from vlm_jax.data.tokenizer import tokenizer_and_special_ids
  from vlm_jax.train import restore
  loaded = restore.load_for_eval(load_config("flamingo", "tiny"), checkpoint=workdir)
  tok, special = tokenizer_and_special_ids("synthetic")
  size = loaded.model.vision["image_size"]
  vx = clip_preprocess(decode_image(str(image)), size, normalize=False)[None, None]
  ids = list(tok.encode(prompt).ids)
  new = []
  for _ in range(3):
    logits, _ = loaded.model.apply({"params": loaded.params}, vx, np.asarray([ids], np.int32))
    nxt = int(np.asarray(logits)[0, -1].argmax())
    ids.append(nxt)
    new.append(nxt)
    if nxt == special["endofchunk"]:
      break
  assert text == tok.decode(new, skip_special_tokens=True), (text, new)
  assert text.strip()  # the trained model answers something
  with pytest.raises(ValueError, match="1 <image> tokens but 0 --image"):
    run(load_config("flamingo", "tiny"), workdir, [], "<image>Output:", max_new_tokens=3)
