"""Sequence packing (vlm_jax.data.packing + vlm_jax.layers.segments): the packed layout by hand, the
image invariants, the block-diagonal mask, checkpoint continuation, and the real proof that nothing
crosses segments: every packed example gets the logits it gets alone."""

import itertools
import json

import grain
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from vlm_jax.data import packing, pipeline, streams
from vlm_jax.data.counting import CountingBatch
from vlm_jax.data.tokenizer import synthetic_vocab_size
from vlm_jax.layers.attention import causal_padding_mask
from vlm_jax.layers.segments import segment_mask, segment_positions
from vlm_jax.models import build_model, flamingo, gpt_neox, llama, mpt
from vlm_jax.param_paths import flatten, unflatten

from tests.train.configs_loader import load_config

PAD, MEDIA = 0, 3


def _example(ids, labels, images=None, length=8, max_images=2):
  """A padded flat example, as InterleavedTransform makes them."""
  n = len(ids)
  ex = {"input_ids": np.array(ids + [PAD] * (length - n), np.int32),
        "attention_mask": np.array([1] * n + [0] * (length - n), np.int32),
        "labels": np.array(labels + [-100] * (length - n), np.int32)}
  if images is not None:
    vx = np.zeros((max_images, 2, 2, 3), np.float32)
    for i, value in enumerate(images):
      vx[i] = value
    ex["vision_x"] = vx
  return ex


def _packed(examples, *, max_text_len=12, max_images=2, num_bins=2, batch_size=2):
  stream = CountingBatch(grain.MapDataset.source(examples).to_iter_dataset(), 1, streams.collate)
  return packing.Packed(stream, batch_size=batch_size, max_text_len=max_text_len,
                        max_images=max_images, num_bins=num_bins, pad_id=PAD, media_id=MEDIA)


def test_pair_layout_by_hand():
  examples = [_example([3, 10, 11, 4, 1], [-100, 10, 11, 4, 1], images=[1.0]),
              _example([3, 12, 4, 1], [-100, 12, 4, 1], images=[2.0]),
              _example([3, 13, 14, 15, 4, 1], [-100, 13, 14, 15, 4, 1], images=[3.0])]
  it = iter(_packed(examples))
  (batch,) = list(it)
  inputs = batch["inputs"]
  # First fit: examples 1 and 2 share row 0 (9 tokens, 2 images); 3 no longer fits there.
  np.testing.assert_array_equal(inputs["input_ids"], [[3, 10, 11, 4, 1, 3, 12, 4, 1, 0, 0, 0],
                                                      [3, 13, 14, 15, 4, 1, 0, 0, 0, 0, 0, 0]])
  np.testing.assert_array_equal(inputs["segment_ids"], [[1, 1, 1, 1, 1, 2, 2, 2, 2, 0, 0, 0],
                                                        [1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0]])
  np.testing.assert_array_equal(inputs["attention_mask"], inputs["segment_ids"] > 0)
  np.testing.assert_array_equal(batch["labels"], [
    [-100, 10, 11, 4, 1, -100, 12, 4, 1, -100, -100, -100],
    [-100, 13, 14, 15, 4, 1, -100, -100, -100, -100, -100, -100]])
  # Images in packing order, zero after.
  np.testing.assert_array_equal(inputs["vision_x"][:, :, 0, 0, 0], [[1.0, 2.0], [3.0, 0.0]])
  assert {k: v.dtype for k, v in inputs.items()} == {
    "input_ids": np.int32, "attention_mask": np.int32, "segment_ids": np.int32,
    "vision_x": np.float32}
  assert it.counters() == {"seen": 3}


def test_text_boundary_label_is_never_trained():
  # Text-only rows: the first token of an example is a trained label when it stands alone, but as
  # the target of the previous example's last token it must not be.
  examples = [_example([10, 11, 1], [10, 11, 1]), _example([12, 13, 14, 1], [12, 13, 14, 1])]
  (batch,) = list(_packed(examples, max_images=None, num_bins=1, batch_size=1))
  np.testing.assert_array_equal(batch["inputs"]["input_ids"][0, :7], [10, 11, 1, 12, 13, 14, 1])
  np.testing.assert_array_equal(batch["labels"][0, :8], [-100, 11, 1, -100, 13, 14, 1, -100])
  assert "vision_x" not in batch["inputs"]


def test_examples_must_start_with_their_image():
  text_first = _example([10, 3, 11, 1], [-100, -100, 11, 1], images=[1.0])
  with pytest.raises(ValueError, match="must start with its <image>"):
    list(_packed([text_first]))


def test_misaligned_images_are_refused():
  row = {"input_ids": np.array([3, 10, 3, 11, 0]), "labels": np.zeros(5, np.int32),
         "input_ids_segment_ids": np.array([1, 1, 2, 2, 0], np.int32),
         "vision_x": np.zeros((3, 2, 2, 3), np.float32),
         "vision_x_segment_ids": np.array([1, 2, 2], np.int32)}  # a third image with no <image>
  with pytest.raises(ValueError, match="misaligned"):
    packing.finish_row(row, media_id=MEDIA)
  row["vision_x_segment_ids"] = np.array([1, 2, 0], np.int32)
  assert packing.finish_row(row, media_id=MEDIA)["segment_ids"].tolist() == [1, 1, 2, 2, 0]


def test_mask_is_block_diagonal_causal_and_positions_restart():
  seg = jnp.array([[1, 1, 1, 2, 2, 3, 0, 0]])
  mask = np.asarray(causal_padding_mask(seg > 0) & segment_mask(seg))[0, 0]
  real = np.asarray(seg[0]) > 0
  expected = np.zeros((8, 8), bool)
  for lo, hi in [(0, 3), (3, 5), (5, 6)]:
    expected[lo:hi, lo:hi] = np.tril(np.ones((hi - lo, hi - lo), bool))
  np.testing.assert_array_equal(mask[real], expected[real])
  assert mask[~real].any(-1).all()  # padding queries keep a non-empty row (finite on every backend)
  np.testing.assert_array_equal(segment_positions(seg)[0], [0, 1, 2, 0, 1, 0, 0, 1])


def _data_config(**overrides):
  cfg = {"source": "synthetic", "kind": "pairs", "tokenizer": "synthetic", "image_size": 32,
         "max_images": 4, "max_text_len": 48, "num_records": 64, "seed": 0, "num_threads": 2,
         "prefetch_buffer_size": 4, "packing_bins": 2}
  cfg.update(overrides)
  return cfg


def _make(cfg, batch_size=2):
  return pipeline.make_dataset(cfg, split="train", batch_size=batch_size, process_index=0,
                               process_count=1)


def test_restore_mid_stream_continues_identically():
  it = iter(_make(_data_config()))
  next(it), next(it), next(it)
  state = json.loads(json.dumps(it.get_state()))
  expected = list(itertools.islice(it, 3))
  counters = it.counters()
  again = iter(_make(_data_config()))
  again.set_state(state)
  for x, y in zip(expected, itertools.islice(again, 3)):
    for a, b in zip(jax.tree.leaves(x), jax.tree.leaves(y)):
      np.testing.assert_array_equal(a, b)
  assert again.counters() == counters


def _segments(batch):
  """(row, positions, ids, images) of every packed example in a batch."""
  out = []
  seg, ids = batch["inputs"]["segment_ids"], batch["inputs"]["input_ids"]
  vx = batch["inputs"].get("vision_x")
  for r in range(len(seg)):
    image = 0
    for s in range(1, seg[r].max() + 1):
      pos = np.flatnonzero(seg[r] == s)
      k = int((ids[r, pos] == MEDIA).sum())
      out.append((r, pos, ids[r, pos], None if vx is None else vx[r, image:image + k]))
      image += k
  return out


def _alone_batch(segments, text_len, max_images):
  """Each packed example on its own row, right-padded, its images from slot 0."""
  n = len(segments)
  ids = np.zeros((n, text_len), np.int32)
  mask = np.zeros((n, text_len), np.int32)
  vx = None if segments[0][3] is None else np.zeros((n, max_images) + segments[0][3].shape[1:],
                                                    np.float32)
  for i, (_, pos, seg_ids, images) in enumerate(segments):
    ids[i, :len(pos)], mask[i, :len(pos)] = seg_ids, 1
    if vx is not None:
      vx[i, :len(images)] = images
  return ids, mask, vx


def _init_and_apply(model, inputs, jit):
  """Compiling pays for the Flamingo model; the tiny LMs run faster op by op."""
  init = lambda x: nn.unbox(model.init(jax.random.PRNGKey(0), **x)["params"])  # noqa: E731
  if not jit:
    return init(inputs), model.apply
  return jax.jit(init)(inputs), jax.jit(model.apply)


def _assert_each_segment_alone(packed, alone, segments):
  for i, (row, pos, _, _) in enumerate(segments):
    np.testing.assert_allclose(np.asarray(packed[row, pos]), np.asarray(alone[i, :len(pos)]),
                               atol=1e-5, rtol=0, err_msg=f"segment {i}")


def test_flamingo_packed_row_equals_each_example_alone():
  config = load_config("flamingo", "tiny")
  batch = next(iter(_make(_data_config(image_size=config.model.vision.image_size))))
  segments = _segments(batch)
  assert max(s[0] for s in segments) == 1 and len(segments) >= 4  # rows really hold several
  model = build_model(config.model_name, config.model)
  inputs = jax.tree.map(jnp.asarray, batch["inputs"])
  params, apply = _init_and_apply(model, inputs, jit=True)
  # Open the gates so the images matter (at 0 the xattn blocks are the identity).
  params = unflatten({k: jnp.ones_like(v) if k.endswith("_gate") else v
                      for k, v in flatten(params).items()})
  packed, _ = apply({"params": params}, **inputs)
  ids, mask, vx = _alone_batch(segments, 48, 4)
  alone, _ = apply({"params": params}, jnp.asarray(vx), jnp.asarray(ids), jnp.asarray(mask))
  _assert_each_segment_alone(packed, alone, segments)
  with pytest.raises(ValueError, match="only_attend_immediate_media"):
    flamingo.Model(**{**config.model.to_dict(), "only_attend_immediate_media": False}).apply(
      {"params": params}, **inputs)


# The synthetic tokenizer's full vocabulary: an id past the table reads NaN from jnp.take.
V = synthetic_vocab_size()
LMS = {
  "llama": llama.Model(vocab_size=V, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                       mlp_dim=48),
  "gpt_neox": gpt_neox.Model(vocab_size=V, hidden_size=32, num_layers=2, num_heads=4, mlp_dim=48,
                             rotary_pct=0.5),
  "mpt": mpt.Model(vocab_size=V, hidden_size=32, num_layers=2, num_heads=4, mlp_dim=48),
}


@pytest.mark.parametrize("name", sorted(LMS))
def test_lm_packed_row_equals_each_example_alone(name):
  model = LMS[name]
  batch = next(iter(_make(_data_config(kind="text", max_images=1, packing_bins=1), batch_size=1)))
  segments = _segments(batch)
  assert len(segments) >= 2
  inputs = jax.tree.map(jnp.asarray, batch["inputs"])
  params, apply = _init_and_apply(model, inputs, jit=False)
  packed, _ = apply({"params": params}, **inputs)
  ids, mask, _ = _alone_batch(segments, 48, 0)
  alone, _ = apply({"params": params}, jnp.asarray(ids), jnp.asarray(mask))
  _assert_each_segment_alone(packed, alone, segments)
  # The check has teeth: without segment_ids the second example sees the first.
  leaky, _ = apply({"params": params}, inputs["input_ids"], inputs["attention_mask"])
  _, pos, _, _ = segments[1]
  assert np.abs(np.asarray(leaky[0, pos] - packed[0, pos])).max() > 1e-3
  with pytest.raises(ValueError, match="KV caches"):
    model.apply({"params": params}, inputs["input_ids"], caches=model.init_caches(1, 48),
                segment_ids=inputs["segment_ids"])
