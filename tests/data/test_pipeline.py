"""Tests for the grain input pipeline (vlm_jax.data.pipeline)."""

import itertools

import ml_collections
import numpy as np
import pytest

from vlm_jax.data import pipeline


def _config(**overrides):
  cfg = {
    "source": "synthetic",
    "kind": "interleaved",
    "tokenizer": "synthetic",
    "image_size": 16,
    "max_images": 3,
    "max_text_len": 48,
    "num_records": 64,
    "seed": 0,
    "num_threads": 2,
    "prefetch_buffer_size": 4,
  }
  cfg.update(overrides)
  return ml_collections.ConfigDict(cfg)


def _take(ds, n):
  return list(itertools.islice(iter(ds), n))


def _make(cfg, batch_size=4, **kwargs):
  kwargs.setdefault("process_index", 0)
  kwargs.setdefault("process_count", 1)
  return pipeline.make_dataset(cfg, split="train", batch_size=batch_size, **kwargs)


def _assert_batches_equal(a, b):
  assert a.keys() == b.keys() and a["inputs"].keys() == b["inputs"].keys()
  np.testing.assert_array_equal(a["labels"], b["labels"])
  for key in a["inputs"]:
    np.testing.assert_array_equal(a["inputs"][key], b["inputs"][key])


def _keys(batches):
  """One hashable key per example: its images and text (images are unique noise)."""
  out = []
  for b in batches:
    for i in range(len(b["labels"])):
      out.append(b["inputs"]["vision_x"][i].tobytes() + b["inputs"]["input_ids"][i].tobytes())
  return out


@pytest.mark.parametrize("kind", ["interleaved", "pairs", "vqa"])
def test_batch_layout(kind):
  (batch,) = _take(_make(_config(kind=kind)), 1)
  assert set(batch) == {"inputs", "labels"}
  inputs = batch["inputs"]
  assert set(inputs) == {"vision_x", "input_ids", "attention_mask"}
  assert inputs["vision_x"].shape == (4, 3, 16, 16, 3) and inputs["vision_x"].dtype == np.float32
  for arr in (inputs["input_ids"], inputs["attention_mask"], batch["labels"]):
    assert arr.shape == (4, 48) and arr.dtype == np.int32
  # Images present exactly where <image> tokens are.
  n_media = (inputs["input_ids"] == 3).sum(1)
  n_real = inputs["vision_x"].reshape(4, 3, -1).any(-1).sum(1)
  np.testing.assert_array_equal(n_media, n_real)


def test_text_kind_has_no_images():
  (batch,) = _take(_make(_config(kind="text")), 1)
  assert set(batch["inputs"]) == {"input_ids", "attention_mask"}
  ids = batch["inputs"]["input_ids"]
  assert not np.isin(ids, [3, 4]).any() and (ids == 1).any()


def test_deterministic_across_runs_and_plain_dict():
  a = _take(_make(_config()), 3)
  b = _take(_make(dict(_config())), 3)
  for x, y in zip(a, b):
    _assert_batches_equal(x, y)


def test_state_restore_reproduces_continuation():
  cfg = _config(num_records=16)
  it = iter(_make(cfg))
  for _ in range(5):  # Crosses an epoch boundary (4 batches per epoch).
    next(it)
  state = it.get_state()
  expected = [next(it) for _ in range(4)]
  restored = iter(_make(cfg))
  restored.set_state(state)
  for want in expected:
    _assert_batches_equal(next(restored), want)


def test_process_shards_are_disjoint_and_cover_one_epoch():
  cfg = _config(num_records=20)
  single = _keys(_take(_make(cfg, batch_size=2, repeat=False), 100))
  shards = [
    _keys(_take(_make(cfg, batch_size=2, repeat=False, process_index=p, process_count=2), 100))
    for p in (0, 1)
  ]
  assert len(single) == 20 and len(set(single)) == 20
  assert [len(s) for s in shards] == [10, 10]
  assert not set(shards[0]) & set(shards[1])
  assert set(shards[0]) | set(shards[1]) == set(single)


def test_uneven_records_give_every_process_the_same_batch_count():
  cfg = _config(num_records=21)
  counts = [
    len(_take(_make(cfg, batch_size=2, repeat=False, process_index=p, process_count=2), 100))
    for p in (0, 1)
  ]
  assert counts == [5, 5]


def test_each_epoch_is_reshuffled():
  (epoch0, epoch1) = _take(_make(_config(num_records=8), batch_size=8), 2)
  k0, k1 = _keys([epoch0]), _keys([epoch1])
  assert set(k0) == set(k1) and len(set(k0)) == 8
  assert k0 != k1


def test_bad_config_errors_name_the_field():
  with pytest.raises(ValueError, match="config.data.source"):
    _make(_config(source="laion5b_http"))
  with pytest.raises(ValueError, match="config.data.kind"):
    _make(_config(kind="video"))
  cfg = dict(_config())
  del cfg["max_text_len"]
  with pytest.raises(ValueError, match="config.data.max_text_len"):
    _make(cfg)
  with pytest.raises(ValueError, match="split"):
    pipeline.make_dataset(_config(), split="test", batch_size=2, process_index=0, process_count=1)
  with pytest.raises(ValueError, match="process_index"):
    _make(_config(), process_index=2, process_count=2)


def test_defaults_to_jax_process():
  (batch,) = _take(pipeline.make_dataset(_config(), split="eval", batch_size=2), 1)
  assert batch["labels"].shape == (2, 48)
