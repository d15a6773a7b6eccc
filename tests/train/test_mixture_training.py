"""The trainer runs on an OpenFlamingo-style concat mixture (pairs 0.2 + interleaved 1.0) and on packed
pairs, through `config.data.mixture` / `config.data.packing_bins`, and resumes."""

import json
import os

import pytest

from tests.train.configs_loader import load_config
from vlm_jax.train.trainer import train_and_evaluate


def _tiny_flamingo_stage():
  config = load_config("flamingo", "tiny")
  config.init.stage = None  # a random LM is enough here
  config.evals = {}
  config.total_steps = 3
  config.checkpoint.every_steps = 2
  return config


@pytest.mark.slow
def test_concat_mixture_trains_and_logs_per_component_losses(tmp_path):
  config = _tiny_flamingo_stage()
  base = config.data.to_dict()
  config.data = {"mixture": {
    "laion": {**base, "kind": "pairs", "max_images": 1, "max_text_len": 24, "batch_size": 4,
              "weight": 0.2},
    "mmc4": {**base, "kind": "interleaved", "batch_size": 4, "weight": 1.0}},
    "mixture_mode": "concat"}
  results, _ = train_and_evaluate(config, str(tmp_path))
  assert results["step"] == 3 and results["train/loss"] > 0
  # Resume: a longer run picks up at the last checkpoint.
  config.total_steps = 4
  results, _ = train_and_evaluate(config, str(tmp_path))
  with open(os.path.join(tmp_path, "results.json")) as f:
    assert json.load(f)["step"] == 4


@pytest.mark.slow
def test_packed_pairs_train(tmp_path):
  config = _tiny_flamingo_stage()
  config.data.update(kind="pairs", max_images=3, max_text_len=48, packing_bins=4)
  results, _ = train_and_evaluate(config, str(tmp_path))
  assert results["step"] == 3 and results["train/loss"] > 0
