"""Trainer: frozen params untouched and without optimizer state, embedding row mask, checkpoint round
trip with the data iterator, resume after an interruption, NaN guard, and fast failures on bad configs."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vlm_jax import sharding
from vlm_jax.data import tokenizer as tok
from vlm_jax.data.pipeline import make_dataset
from vlm_jax.models import build_model
from vlm_jax.train import trainer
from vlm_jax.train.checkpointing import Checkpointer
from vlm_jax.train.losses import get_loss
from vlm_jax.param_paths import flatten
from vlm_jax.train.step import make_train_step

from tests.train.configs_loader import load_config


@pytest.fixture(scope="module")
def tiny():
  """The tiny Flamingo config with a compiled train step and a fresh state."""
  config = load_config("flamingo", "tiny")
  config.init.stage = None  # a random frozen LM is enough for step-level invariants
  mesh = sharding.make_mesh(config.mesh)
  rules = sharding.logical_rules(None)
  model = build_model(config.model_name, config.model)
  ds = make_dataset(config.data, split="train", batch_size=config.batch_size)
  it = iter(ds)
  batches = [next(it) for _ in range(3)]
  example = jax.tree.map(lambda x: jnp.asarray(x[:1]), batches[0]["inputs"])
  tx, init_fn, abstract = trainer.build_state(config, model, example, mesh, rules)
  step = jax.jit(make_train_step(model, tx, get_loss(config.loss)))
  return dict(config=config, init_fn=init_fn, abstract=abstract, step=step, batches=batches, ds=ds)


def test_frozen_params_bit_identical_and_without_optimizer_state(tiny):
  state = tiny["init_fn"](jax.random.PRNGKey(0))
  frozen0 = jax.device_get(state.frozen)
  trainable0 = jax.device_get(state.trainable)
  for b in tiny["batches"]:
    state, metrics = tiny["step"](state, jax.tree.map(jnp.asarray, b), jax.random.PRNGKey(1))
    assert bool(metrics["finite"])
  frozen_paths = set(flatten(frozen0))
  assert any(p.startswith("vision/") for p in frozen_paths)
  assert any(p.startswith("lm/layers_") for p in frozen_paths)
  assert not any(p.startswith(("xattn_", "resampler/")) for p in frozen_paths)
  for path, before in flatten(frozen0).items():
    np.testing.assert_array_equal(np.asarray(flatten(jax.device_get(state.frozen))[path]), before,
                                  err_msg=path)
  # Optimizer state mirrors the trainable subtree only: Adam's mu and nu have exactly its structure.
  adam = [x for x in jax.tree.leaves(state.opt_state, is_leaf=lambda x: hasattr(x, "mu"))
          if hasattr(x, "mu")]
  assert len(adam) == 1
  assert jax.tree.structure(adam[0].mu) == jax.tree.structure(state.trainable)
  assert jax.tree.structure(adam[0].nu) == jax.tree.structure(state.trainable)
  # Trainable params moved, gates included.
  after = flatten(jax.device_get(state.trainable))
  assert np.abs(after["xattn_0/attn_gate"] - flatten(trainable0)["xattn_0/attn_gate"]).max() > 0


def test_frozen_towers_in_bfloat16(tiny):
  config = load_config("flamingo", "tiny")
  config.init.stage = None
  config.frozen_param_dtype = "bfloat16"
  mesh = sharding.make_mesh(config.mesh)
  model = build_model(config.model_name, config.model)
  batch = jax.tree.map(jnp.asarray, tiny["batches"][0])
  example = jax.tree.map(lambda x: x[:1], batch["inputs"])
  tx, init_fn, abstract = trainer.build_state(config, model, example, mesh, sharding.logical_rules(None))
  state = init_fn(jax.random.PRNGKey(0))
  assert {x.dtype for x in jax.tree.leaves(state.frozen)} == {jnp.dtype(jnp.bfloat16)}
  assert {x.dtype for x in jax.tree.leaves(state.trainable)} == {jnp.dtype(jnp.float32)}
  assert abstract.frozen["vision"]["pos_embed"].dtype == jnp.bfloat16  # restores keep bf16 too
  step = jax.jit(make_train_step(model, tx, get_loss(config.loss)))
  state, m = step(state, batch, jax.random.PRNGKey(1))
  assert bool(m["finite"]) and float(m["loss"]) > 0


def test_only_special_embedding_rows_train(tiny):
  state = tiny["init_fn"](jax.random.PRNGKey(0))
  e0 = np.asarray(state.trainable["lm"]["embed"]["embedding"])
  for b in tiny["batches"]:
    state, _ = tiny["step"](state, jax.tree.map(jnp.asarray, b), jax.random.PRNGKey(1))
  e1 = np.asarray(state.trainable["lm"]["embed"]["embedding"])
  changed = np.nonzero(np.abs(e1 - e0).max(-1) > 0)[0].tolist()
  assert changed == [tok.MEDIA_ID, tok.EOC_ID]


def test_checkpoint_round_trip_with_data_iterator(tiny, tmp_path):
  state = tiny["init_fn"](jax.random.PRNGKey(0))
  state, _ = tiny["step"](state, jax.tree.map(jnp.asarray, tiny["batches"][0]), jax.random.PRNGKey(1))
  it = iter(tiny["ds"])
  next(it), next(it)
  ckpt = Checkpointer(str(tmp_path / "ckpt"), max_to_keep=2, save_every=1)
  ckpt.save(1, state, it, force=True)
  ckpt.wait()
  expected_next = next(it)
  it2 = iter(tiny["ds"])
  restored = ckpt.restore(1, tiny["abstract"], it2)
  ckpt.close()
  for a, b in zip(jax.tree.leaves(jax.device_get(state)), jax.tree.leaves(jax.device_get(restored))):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  got_next = next(it2)
  np.testing.assert_array_equal(got_next["inputs"]["input_ids"], expected_next["inputs"]["input_ids"])
  np.testing.assert_array_equal(got_next["inputs"]["vision_x"], expected_next["inputs"]["vision_x"])


class _Crash(Exception):
  pass


def _wrapped_make_dataset(on_batch):
  """make_dataset whose train iterators pass each batch through `on_batch(n, batch)` (n from 1).

  The wrapper is not a grain iterator, so grain's checkpoint handler stores its state as bytes.
  """

  class Iter:
    def __init__(self, inner):
      self.inner, self.n = inner, 0

    def __next__(self):
      self.n += 1
      return on_batch(self.n, next(self.inner))

    def get_state(self):
      return json.dumps(self.inner.get_state()).encode()

    def set_state(self, s):
      self.inner.set_state(json.loads(s))

    def start_prefetch(self):  # grain's restore handler calls it after set_state
      self.inner.start_prefetch()

  class DS:
    def __init__(self, inner):
      self.inner = inner

    def __iter__(self):
      return Iter(iter(self.inner))

  def factory(*args, **kwargs):
    ds = make_dataset(*args, **kwargs)
    return DS(ds) if kwargs.get("split") == "train" else ds

  return factory


def _small(config):
  config.total_steps = 8
  config.checkpoint.every_steps = 2
  config.log_every = 2
  config.init.stage.total_steps = 4
  return config


def test_resume_after_interruption_equals_uninterrupted(tmp_path, monkeypatch):
  config = _small(load_config("flamingo", "tiny"))
  results_a, params_a = trainer.train_and_evaluate(config, str(tmp_path / "a"))
  # Run B shares run A's finished LM stage (the resumed stage is skipped) and crashes in the Flamingo
  # stage while fetching the 6th batch, i.e. after step 5; its last checkpoint is step 4.
  workdir_b = tmp_path / "b"
  os.makedirs(workdir_b)
  os.symlink(tmp_path / "a" / "lm_pretrain", workdir_b / "lm_pretrain")

  def crash_at_6(n, batch):
    if n == 6:
      raise _Crash()
    return batch

  monkeypatch.setattr(trainer, "make_dataset", _wrapped_make_dataset(crash_at_6))
  with pytest.raises(_Crash):
    trainer.train_and_evaluate(config, str(workdir_b))
  assert Checkpointer(str(workdir_b / "checkpoints"), max_to_keep=3, save_every=2).latest_step() == 4
  monkeypatch.setattr(trainer, "make_dataset", make_dataset)
  results_b, params_b = trainer.train_and_evaluate(config, str(workdir_b))
  assert results_b == results_a
  for a, b in zip(jax.tree.leaves(params_a), jax.tree.leaves(params_b)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert json.load(open(workdir_b / "results.json")) == results_a


def test_nan_guard_stops_and_keeps_last_good_checkpoint(tmp_path, monkeypatch):
  config = _small(load_config("flamingo", "tiny"))
  config.init.stage = None

  def poison_5th(n, batch):
    if n == 5:
      batch["inputs"]["vision_x"] = np.full_like(batch["inputs"]["vision_x"], np.nan)
    return batch

  monkeypatch.setattr(trainer, "make_dataset", _wrapped_make_dataset(poison_5th))
  with pytest.raises(FloatingPointError, match="non-finite loss or gradient at step 5.*last good "
                     "checkpoint is step 4"):
    trainer.train_and_evaluate(config, str(tmp_path))
  assert Checkpointer(str(tmp_path / "checkpoints"), max_to_keep=3, save_every=2).all_steps() == [2, 4]


@pytest.mark.parametrize("edit, match", [
  (lambda c: c.model.lm.update(num_heads=5), "lm.hidden_size .* must be divisible by lm.num_heads"),
  (lambda c: c.model.vision.update(heads=3), "vision.width .* must be divisible by vision.heads"),
  (lambda c: c.mesh.update(data=64), r"config.mesh .* needs 64 devices"),
  (lambda c: c.update(trainable="^nothing$"), "config.trainable"),
  (lambda c: c.optimizer.update(schedule="linear"), "config.optimizer.schedule"),
])
def test_bad_config_fails_fast_naming_the_field(tmp_path, edit, match):
  config = load_config("flamingo", "tiny")
  config.init.stage = None
  edit(config)
  with pytest.raises(ValueError, match=match):
    trainer.train_and_evaluate(config, str(tmp_path))
  assert not os.path.exists(tmp_path / "checkpoints" / "0")


def test_unknown_preset_fails_naming_the_presets():
  with pytest.raises(ValueError, match="unknown preset 'huge'.*default.*tiny"):
    load_config("flamingo", "huge")
