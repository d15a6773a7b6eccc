"""configs/llava.py, configs/llava_flex.py and configs/inf_llava.py train end to end at toy size:
the flex run trains LLaVA's three stages first (tiny LM, projector-only stage 1 on captions, stage 2
on questions), starts from stage 2 with k_hd / v_hd copied from k / v, trains on the
high-resolution task with the authors' training path and evaluates with the inference path; the
INF-LLaVA run starts from the same stage 2 with a fresh DEM; the 7B recipes build."""

import json
import os

import jax
import numpy as np
import pytest

from tests.train.configs_loader import load_config
from vlm_jax.train import trainer


@pytest.fixture(scope="module")
def flex_run(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("flex"))
  config = load_config("llava_flex", "tiny")
  results, params = trainer.train_and_evaluate(config, workdir)
  return workdir, config, results, params


def test_flex_tiny_runs_the_stage_chain_and_reports_accuracy(flex_run):
  workdir, config, results, params = flex_run
  assert results["step"] == config.total_steps
  assert 0.0 <= results["eval/accuracy"] <= 1.0 and np.isfinite(results["train/loss"])
  with open(os.path.join(workdir, "results.json")) as f:
    assert json.load(f)["step"] == config.total_steps
  for stage in ("llava_stage2", "llava_stage2/llava_stage1", "llava_stage2/llava_stage1/lm_pretrain"):
    assert os.path.exists(os.path.join(workdir, stage, "results.json")), stage
  # Stage 1 trained only the projector: its LM equals lm_pretrain's.
  attn = params["lm"][f"layers_{config.model.lm.flex_start}"]["attn"]
  assert attn["k_hd"]["kernel"].shape == attn["k"]["kernel"].shape


def test_data_has_the_training_path_inputs():
  config = load_config("llava_flex", "tiny")
  from vlm_jax.data.pipeline import make_dataset
  batch = next(iter(make_dataset(config.data, split="train", batch_size=2)))
  rows = batch["inputs"]["answer_rows"]
  labels = batch["labels"]
  np.testing.assert_array_equal(rows[:, :-1], labels[:, 1:] != -100)
  assert batch["inputs"]["images"].shape[1] == config.model.zoom * config.model.vision.image_size


def test_inf_llava_tiny_starts_from_stage2_and_trains_the_dem(tmp_path):
  config = load_config("inf_llava", "tiny")
  config.init.stage.total_steps = 2   # the stage chain is the flex test's; keep it short here
  config.init.stage.init.stage.total_steps = 2
  config.init.stage.init.stage.init.stage.total_steps = 2
  results, params = trainer.train_and_evaluate(config, str(tmp_path))
  assert results["step"] == config.total_steps and np.isfinite(results["train/loss"])
  assert 0.0 <= results["eval/accuracy"] <= 1.0
  stage = trainer.train_and_evaluate(config.init.stage, str(tmp_path / "llava_stage2"))[1]
  # The LM, projector and DEM trained; the frozen tower is stage 2's.
  for part in ("lm", "projector"):
    moved = [float(np.abs(np.asarray(a) - np.asarray(b)).max()) for a, b in zip(
      jax.tree.leaves(params[part]), jax.tree.leaves(stage[part]))]
    assert max(moved) > 0, part
  for a, b in zip(jax.tree.leaves(params["vision"]), jax.tree.leaves(stage["vision"])):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert "spatial_embed" in params
  assert config.data.image_size == config.model.num_crops * config.model.vision.image_size


@pytest.mark.parametrize("name,preset", [("llava", "stage1"), ("llava", "stage2"),
                                         ("llava_flex", "sft"), ("llava", "hires"),
                                         ("inf_llava", "stage1"), ("inf_llava", "stage2")])
def test_recipe_presets_build(name, preset):
  config = load_config(name, preset)
  assert config.total_steps > 0 and config.trainable
  if preset in ("stage1", "stage2", "sft"):
    assert config.model.vision.image_size == 336 and config.data.source == "llava"
