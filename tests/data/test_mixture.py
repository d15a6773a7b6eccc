"""Mixtures (vlm_jax.data.mixture): concat sub-batches and their weighted loss, sampled proportions,
determinism, checkpoint continuation and per-component bad-record counters."""

import itertools
import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from vlm_jax.data import mixture, pipeline, synthetic
from vlm_jax.train import losses, trainer
from vlm_jax.train.state import TrainState
from vlm_jax.train.step import make_train_step


def _component(kind, *, text_len, images, batch_size=None, weight=1.0, seed=0):
  return {"source": "synthetic", "kind": kind, "tokenizer": "synthetic", "image_size": 16,
          "max_images": images, "max_text_len": text_len, "num_records": 64, "seed": seed,
          "num_threads": 2, "prefetch_buffer_size": 4, "batch_size": batch_size, "weight": weight}


def _config(mode="concat"):
  """LAION-like pairs (1 image, 16 tokens) and MMC4-like documents (3 images, 48 tokens)."""
  return {"mixture": {
    "laion": _component("pairs", text_len=16, images=1, batch_size=4, weight=0.2),
    "mmc4": _component("interleaved", text_len=48, images=3, batch_size=2, weight=1.0)},
    "mixture_mode": mode}


def _make(cfg, **kwargs):
  kwargs = {"process_index": 0, "process_count": 1, **kwargs}
  return mixture.make_mixture(cfg, split="train", **kwargs)


def _alone(component, batch_size):
  return iter(pipeline.make_dataset(component, split="train", batch_size=batch_size,
                                    process_index=0, process_count=1))


def _assert_trees_equal(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(x, y)


def test_concat_gives_each_component_its_own_sub_batch():
  cfg = _config()
  batches = list(itertools.islice(iter(_make(cfg)), 3))
  laion, mmc4 = _alone(cfg["mixture"]["laion"], 4), _alone(cfg["mixture"]["mmc4"], 2)
  for batch in batches:
    assert set(batch) == {"laion", "mmc4"}
    assert batch["laion"]["inputs"]["vision_x"].shape == (4, 1, 16, 16, 3)
    assert batch["laion"]["labels"].shape == (4, 16)
    assert batch["mmc4"]["inputs"]["vision_x"].shape == (2, 3, 16, 16, 3)
    assert batch["mmc4"]["labels"].shape == (2, 48)
    # Each sub-batch is exactly that component's own stream.
    _assert_trees_equal(batch["laion"], next(laion))
    _assert_trees_equal(batch["mmc4"], next(mmc4))


def test_concat_batch_sizes_are_global_and_split_over_processes():
  batch = next(iter(_make(_config(), process_index=1, process_count=2)))
  assert batch["laion"]["labels"].shape[0] == 2 and batch["mmc4"]["labels"].shape[0] == 1
  with pytest.raises(ValueError, match="mmc4.batch_size .2. must be divisible"):
    _make(_config(), process_index=0, process_count=4)
  assert mixture.batch_sizes(_config()) == {"laion": 4, "mmc4": 2}
  assert mixture.loss_weights(_config()) == {"laion": 0.2, "mmc4": 1.0}
  assert mixture.loss_weights(_config("sample")) == {} and mixture.loss_weights({}) == {}


def test_bad_configs_are_named():
  cfg = _config()
  cfg["mixture"]["inputs"] = cfg["mixture"].pop("laion")
  with pytest.raises(ValueError, match="component name 'inputs'"):
    _make(cfg)
  with pytest.raises(ValueError, match="mixture_mode='bogus'"):
    _make(_config("bogus"))
  cfg = _config("sample")
  cfg["mixture"]["laion"]["image_size"] = 32
  with pytest.raises(ValueError, match="image_size must agree"):
    _make(cfg, batch_size=4)


# A stub model: logits are rows of a fixed random table indexed by the input ids, so every quantity
# of the loss can be recomputed by hand in numpy.
_VOCAB = 64
_TABLE = np.random.default_rng(0).normal(size=(_VOCAB, _VOCAB)).astype(np.float32)


def _stub_apply(input_ids, **unused):
  del unused
  return jnp.asarray(_TABLE)[input_ids], {}


def _mean_ce_by_hand(batch):
  logits = _TABLE[batch["inputs"]["input_ids"]][:, :-1].astype(np.float64)
  targets = batch["labels"][:, 1:]
  logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  valid = targets != losses.IGNORE
  picked = np.take_along_axis(logp, np.where(valid, targets, 0)[..., None], -1)[..., 0]
  return -(picked * valid).sum() / valid.sum(), valid.sum()


def test_concat_loss_is_the_weighted_sum_of_per_component_means():
  batch = next(iter(_make(_config())))
  loss_fn = losses.MixtureLoss(losses.next_token_ce, mixture.loss_weights(_config()))
  loss, aux = loss_fn(_stub_apply, jax.tree.map(jnp.asarray, batch))
  (m_laion, n_laion), (m_mmc4, n_mmc4) = _mean_ce_by_hand(batch["laion"]), _mean_ce_by_hand(
    batch["mmc4"])
  np.testing.assert_allclose(float(loss), 0.2 * m_laion + 1.0 * m_mmc4, rtol=1e-5)
  np.testing.assert_allclose(float(aux["loss/laion"]), m_laion, rtol=1e-5)
  np.testing.assert_allclose(float(aux["loss/mmc4"]), m_mmc4, rtol=1e-5)
  assert int(aux["num_tokens"]) == n_laion + n_mmc4
  # Not a pooled token mean: the components hold different numbers of tokens.
  pooled = (0.2 * m_laion * n_laion + m_mmc4 * n_mmc4) / (n_laion + n_mmc4)
  assert abs(float(loss) - pooled) > 1e-3
  with pytest.raises(ValueError, match="components"):
    loss_fn(_stub_apply, {"laion": batch["laion"]})


class _StubModel:
  """A one-parameter model for make_train_step: logits = scale * table[input_ids]."""

  def apply(self, variables, input_ids, **unused):
    del unused
    return variables["params"]["scale"] * jnp.asarray(_TABLE)[input_ids], {}


def test_train_step_takes_concat_batches_and_plain_batches_unchanged():
  cfg = _config()
  batch = jax.tree.map(jnp.asarray, next(iter(_make(cfg))))
  tx = optax.sgd(0.1)
  trainable = {"scale": jnp.ones(())}
  state = TrainState(jnp.zeros((), jnp.int32), trainable, {}, tx.init(trainable))
  mix_step = make_train_step(_StubModel(), tx,
                             losses.MixtureLoss(losses.next_token_ce, mixture.loss_weights(cfg)))
  _, metrics = jax.jit(mix_step)(state, batch, jax.random.PRNGKey(0))
  plain_step = jax.jit(make_train_step(_StubModel(), tx, losses.next_token_ce))
  _, laion = plain_step(state, batch["laion"], jax.random.PRNGKey(0))
  _, mmc4 = plain_step(state, batch["mmc4"], jax.random.PRNGKey(0))
  np.testing.assert_allclose(float(metrics["loss/laion"]), float(laion["loss"]), rtol=1e-6)
  np.testing.assert_allclose(float(metrics["loss"]), 0.2 * float(laion["loss"]) + float(mmc4["loss"]),
                             rtol=1e-6)
  assert "loss/laion" not in laion and bool(metrics["finite"])


def test_trainer_counts_the_tokens_of_every_component():
  batch = next(iter(_make(_config())))
  expected = sum(int(b["inputs"]["attention_mask"].sum()) for b in batch.values())
  assert trainer._local_tokens(batch) == expected
  assert trainer._local_tokens(batch["mmc4"]) == int(batch["mmc4"]["inputs"]["attention_mask"].sum())


def _sample_config():
  """Two pair streams told apart by seed, weights 1 : 3."""
  return {"mixture": {
    "a": _component("pairs", text_len=16, images=1, weight=1.0, seed=1),
    "b": _component("pairs", text_len=24, images=2, weight=3.0, seed=2)},
    "mixture_mode": "sample"}


def _row_keys(batch, n_tokens=16):
  ids = batch["inputs"]["input_ids"][:, :n_tokens]
  return [ids[i].tobytes() + batch["inputs"]["vision_x"][i, 0].tobytes() for i in range(len(ids))]


def test_sample_mode_draws_by_weight_from_each_components_own_stream():
  cfg = _sample_config()
  it = iter(_make(cfg, batch_size=8))
  batches = list(itertools.islice(it, 50))
  assert batches[0]["inputs"]["input_ids"].shape == (8, 24)
  assert batches[0]["inputs"]["vision_x"].shape == (8, 2, 16, 16, 3)
  # Rows, in order, are the two components' own streams interleaved.
  a = [k for b in itertools.islice(_alone(cfg["mixture"]["a"], 8), 50) for k in _row_keys(b)]
  b = [k for b in itertools.islice(_alone(cfg["mixture"]["b"], 8), 50) for k in _row_keys(b)]
  rows = [k for batch in batches for k in _row_keys(batch)]
  from_a = [k for k in rows if k in set(a)]
  from_b = [k for k in rows if k in set(b)]
  assert len(from_a) + len(from_b) == len(rows) == 400
  assert from_a == a[: len(from_a)] and from_b == b[: len(from_b)]
  assert abs(len(from_b) / len(rows) - 0.75) < 0.02
  assert it.counters() == {"a/seen": len(from_a), "b/seen": len(from_b)}
  # Component a's rows are padded to b's shape: pad ids, no attention, ignored labels, zero images.
  first = batches[0]
  short = np.array([k in set(a) for k in _row_keys(first)])
  assert short.any() and (~short).any()
  assert (first["inputs"]["input_ids"][short, 16:] == 0).all()
  assert (first["inputs"]["attention_mask"][short, 16:] == 0).all()
  assert (first["labels"][short, 16:] == -100).all()
  assert (first["inputs"]["vision_x"][short, 1] == 0).all()
  # Deterministic: a second pipeline gives the same batches.
  for x, y in zip(batches, itertools.islice(iter(_make(cfg, batch_size=8)), 5)):
    _assert_trees_equal(x, y)


@pytest.mark.parametrize("mode", ["concat", "sample"])
def test_restore_mid_stream_continues_identically(mode):
  cfg = _config(mode)
  it = iter(_make(cfg, batch_size=6))
  for _ in range(3):
    next(it)
  state = json.loads(json.dumps(it.get_state()))  # what grain's checkpoint handler writes
  expected = list(itertools.islice(it, 3))
  expected_counters = it.counters()
  again = iter(_make(cfg, batch_size=6))
  again.set_state(state)
  for x, y in zip(expected, itertools.islice(again, 3)):
    _assert_trees_equal(x, y)
  assert again.counters() == expected_counters


def test_bad_records_are_counted_per_component(monkeypatch):
  original = synthetic.SyntheticSource.__getitem__

  def corrupt_some_pairs(self, index):
    record = original(self, index)
    if self.kind == "pairs" and index % 4 == 1:  # an image without its <image> token
      record = {**record, "images": record["images"] * 2}
    return record

  monkeypatch.setattr(synthetic.SyntheticSource, "__getitem__", corrupt_some_pairs)
  it = iter(_make(_config()))
  batches = list(itertools.islice(it, 4))
  assert all(b["laion"]["labels"].shape == (4, 16) for b in batches)
  counters = it.counters()
  assert counters["laion/skipped/image_count_mismatch"] > 0
  assert counters["laion/seen"] == 16 + counters["laion/skipped/image_count_mismatch"]
  assert counters["mmc4/seen"] == 8 and not any(k.startswith("mmc4/skipped") for k in counters)
