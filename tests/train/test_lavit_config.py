"""configs/lavit.py: the classification loss equals a hand computation (label smoothing and the DP
term, which reaches the loss through the model's aux); the embedded default trains LaViT and the
same-width ViT for a few steps and writes both held-out accuracies and param counts to
results.json; the DeiT presets carry DeiT's recipe, scaled with the batch size."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.train.configs_loader import load_config
from vlm_jax.models import build_model
from vlm_jax.param_paths import flatten
from vlm_jax.train import trainer
from vlm_jax.train.losses import batch_loss, get_loss, next_token_ce
from vlm_jax.train.state import path_mask


def _hand_loss(logits, labels, eps, dp, weight):
  logits = np.asarray(logits, np.float64)
  logp = logits - logits.max(-1, keepdims=True)
  logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
  c = logits.shape[-1]
  target = np.full(logits.shape, eps / c)
  target[np.arange(len(labels)), labels] += 1 - eps
  return -(target * logp).sum(-1).mean() + weight * dp


def test_classification_loss_is_smoothed_ce_plus_weighted_dp_from_aux():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(6, 5)).astype(np.float32) * 3
  labels = np.array([0, 4, 2, 2, 1, 3], np.int32)
  loss_fn = get_loss("classification_ce", {"label_smoothing": 0.1, "dp_weight": 0.25})
  dp = np.float32(0.37)

  def apply_fn(images):  # stands in for model.apply: (logits, aux)
    return jnp.asarray(logits) + 0 * images.sum(), {"dp_loss": jnp.asarray(dp)}

  batch = {"inputs": {"images": jnp.zeros((6, 2, 2, 3))}, "labels": jnp.asarray(labels)}
  loss, aux = batch_loss(loss_fn)(apply_fn, batch)
  np.testing.assert_allclose(float(loss), _hand_loss(logits, labels, 0.1, dp, 0.25), rtol=1e-6)
  assert float(loss) - float(aux["loss/ce"]) == pytest.approx(0.25 * 0.37, rel=1e-5)
  assert int(aux["num_tokens"]) == 6
  assert int(aux["correct"]) == int((logits.argmax(-1) == labels).sum())
  # Without aux (an evaluator's call) the DP term is left out; without smoothing it is plain CE.
  plain, _ = get_loss("classification_ce")(jnp.asarray(logits), jnp.asarray(labels))
  np.testing.assert_allclose(float(plain), _hand_loss(logits, labels, 0.0, 0.0, 0.0), rtol=1e-6)
  # The LM loss still gets (logits, labels) only.
  assert get_loss("next_token_ce") is next_token_ce
  with pytest.raises(ValueError, match="label_smothing"):
    get_loss("classification_ce", {"label_smothing": 0.1})
  with pytest.raises(ValueError, match="takes no config.loss_options"):
    get_loss("next_token_ce", {"label_smoothing": 0.1})


def _few_steps(config, steps=3):
  """A few steps of a two-stage cut of the tiny model (stage 2: a VA layer with the attention
  residual, then an LA layer for LaViT), so the two compiles fit the test budget; the full
  default is the README's run."""
  config.model.update(dims=(32, 48), heads=(1, 2), depths=(1, 2), num_va=(1, 1),
                      mlp_ratios=(4, 4))
  config.total_steps = steps
  config.batch_size = 8
  config.log_every = steps
  config.checkpoint.every_steps = steps
  config.optimizer.warmup_steps = 1
  config.evals.heldout.update(num_examples=32, batch_size=16)


@pytest.fixture(scope="module")
def default_run(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("lavit"))
  config = load_config("lavit")
  _few_steps(config)
  _few_steps(config.baselines.vit)
  config.baselines.vit.model.num_va = config.baselines.vit.model.depths
  results, params = trainer.train_and_evaluate(config, workdir)
  return workdir, config, results, params


def test_default_writes_both_accuracies_and_param_counts(default_run):
  workdir, config, results, params = default_run
  with open(os.path.join(workdir, "results.json")) as f:
    stored = json.load(f)
  assert stored == pytest.approx(results)
  for prefix in ("", "vit/"):
    assert stored[f"{prefix}step"] == 3
    assert 0.0 <= stored[f"{prefix}eval/accuracy"] <= stored[f"{prefix}eval/top5_accuracy"] <= 1
    assert stored[f"{prefix}eval/num_examples"] == 32
    assert np.isfinite(stored[f"{prefix}train/loss"])
  # The counts are the two models' own: LaViT has Theta / Psi and the attention residual, the ViT
  # the Q / K projections of the layers LaViT makes LA.
  assert stored["eval/num_params"] == sum(x.size for x in jax.tree.leaves(params))
  vit = build_model("lavit", config.baselines.vit.model)
  vit_params = jax.eval_shape(vit.init, jax.random.PRNGKey(0), jnp.zeros((1, 64, 64, 3)))
  assert stored["vit/eval/num_params"] == sum(x.size for x in jax.tree.leaves(vit_params))
  assert stored["eval/num_params"] != stored["vit/eval/num_params"]
  assert any("/theta/" in p for p in flatten(params))
  assert config.baselines.vit.model.num_va == config.baselines.vit.model.depths
  with open(os.path.join(workdir, "vit", "results.json")) as f:
    assert json.load(f)["eval/accuracy"] == stored["vit/eval/accuracy"]


def test_default_rerun_returns_the_finished_results(default_run):
  workdir, config, results, _ = default_run
  again, _ = trainer.train_and_evaluate(config, workdir)
  assert again == pytest.approx(results)


@pytest.mark.parametrize("preset", ["deit_imagenet", "deit_imagenet_vit"])
def test_deit_presets_follow_the_recipe_and_scale_with_the_batch(preset):
  c = load_config("lavit", preset)
  assert c.batch_size == 1024 and c.optimizer.learning_rate == pytest.approx(1e-3)
  epoch = 1_281_167 // 1024
  assert c.total_steps == 300 * 1_281_167 // 1024 and c.optimizer.warmup_steps == 5 * epoch
  assert c.optimizer.schedule == "cosine" and c.optimizer.weight_decay == 0.05
  assert c.loss_options.label_smoothing == 0.1 and c.model.image_size == 224
  assert c.data.source == "tfds_classification" and c.data.tfds_name == "imagenet2012"
  assert c.data.random_resized_crop == 0.08 and c.data.crop_pct == 0.875
  c.batch_size = 512
  assert c.optimizer.learning_rate == pytest.approx(5e-4)
  assert c.optimizer.total_steps == 300 * 1_281_167 // 512
  assert c.optimizer.end_lr_fraction == pytest.approx(1e-5 / 5e-4)
  # Weight decay on matrices only, not on biases, norms, the position table or Theta / Psi.
  model = build_model("lavit", c.model)
  shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, 224, 224, 3)))
  decayed = flatten(path_mask(shapes["params"], c.optimizer.weight_decay_regex))
  assert decayed["head/kernel"] and decayed["stages_0/blocks_0/attn/q/kernel"]
  assert not any(v for k, v in decayed.items() if k.endswith(("bias", "scale", "pos_embed")))
  assert not any(v for k, v in decayed.items() if "/theta/" in k or "/psi/" in k)
  assert any("/theta/" in k for k in decayed) == (preset == "deit_imagenet")
