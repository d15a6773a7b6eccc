"""LLaVA-FlexAttn at toy size (16 px tower, zoom 3 -> 48 px images, 4 x 4 LR tokens, a 12 x 12 HR
grid in 3 x 3 blocks): the crops and the stitching equal the reference index arithmetic, the HR grid
holds each crop's own tokens, nothing selected equals plain LLaVA-1.5 on the LR view, and the
padding margins come from the original sizes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from vlm_jax.layers.mlp import Mlp
from vlm_jax.layers.resize import resize
from vlm_jax.models import llama_flex, llava, llava_flex, vit

VISION = dict(image_size=16, patch_size=4, width=16, depth=2, heads=2)
LM = dict(vocab_size=64, hidden_size=32, num_layers=4, num_heads=4, num_kv_heads=2, mlp_dim=48)
FLEX = dict(flex_start=2, flex_blocks=3, hr_grid=12, num_image_tokens=16, flex_threshold=48.0)
IMG = 63
B, T = 2, 28


def _batch(seed=0):
  rng = np.random.default_rng(seed)
  images = rng.normal(size=(B, 48, 48, 3)).astype(np.float32)
  ids = rng.integers(1, 60, (B, T)).astype(np.int32)
  ids[0, 2:18] = IMG
  ids[1, 5:21] = IMG
  mask = np.ones((B, T), np.int32)
  mask[1, -3:] = 0
  return images, ids, mask


@pytest.fixture(scope="module")
def model_and_params():
  model = llava_flex.Model(vision=VISION, lm={**LM, **FLEX}, image_token_id=IMG, zoom=3)
  images, ids, mask = _batch()
  params = nn.unbox(model.init(jax.random.PRNGKey(0), images, ids, mask)["params"])
  params = {**params, "lm": llama_flex.hd_from_kv(params["lm"])}
  return model, params


def test_crops_and_stitching_follow_the_reference_loops():
  x = np.arange(2 * 12 * 12 * 1, dtype=np.float32).reshape(2, 12, 12, 1)
  crops = np.asarray(llava_flex.split_crops(jnp.asarray(x), 3))
  for b in range(2):
    for i in range(3):
      for j in range(3):
        np.testing.assert_array_equal(crops[b * 9 + i * 3 + j], x[b, 4 * i:4 * i + 4, 4 * j:4 * j + 4])
  tokens = crops.reshape(18, 16, 1)  # each crop's 4 x 4 "tokens" row-major
  np.testing.assert_array_equal(np.asarray(llava_flex.stitch_crops(jnp.asarray(tokens), 3)),
                                x.reshape(2, 144, 1))


def test_hr_grid_holds_each_crops_own_tokens(model_and_params):
  model, params = model_and_params
  images, ids, mask = _batch()
  _, aux = model.apply({"params": params}, images, ids, mask)
  hr = np.asarray(aux["hr_features"]).reshape(B, 12, 12, -1)
  # Crop (1, 2) of image 1 through the tower alone (layer -2, patch tokens, projector): its 4 x 4
  # tokens land at rows 4..7, cols 8..11 of the HR grid.
  crop = images[1:2, 16:32, 32:48]
  _, vaux = vit.Model(**VISION).apply({"params": params["vision"]}, crop)
  feats = Mlp(32, "gelu", True, out_dim=32).apply({"params": params["projector"]},
                                                  vaux["hidden_states"][-2][:, 1:])
  np.testing.assert_allclose(hr[1, 4:8, 8:12].reshape(16, -1), np.asarray(feats[0]), atol=1e-5)


def test_nothing_selected_equals_llava_on_the_lr_view(model_and_params):
  model, params = model_and_params
  images, ids, mask = _batch()
  blind = llava_flex.Model(vision=VISION, lm={**LM, **FLEX, "flex_threshold": 255.0},
                           image_token_id=IMG, zoom=3)
  got, aux = blind.apply({"params": params}, images, ids, mask)
  base = llava.Model(vision=VISION, lm=LM, image_token_id=IMG)
  strip = {k: v for k, v in params.items()}
  strip["lm"] = {k: ({**v, "attn": {n: p for n, p in v["attn"].items() if not n.endswith("_hd")}}
                     if k.startswith("layers_") else v) for k, v in params["lm"].items()}
  lr = resize(jnp.asarray(images), (16, 16), "bilinear_aa")
  want, _ = base.apply({"params": strip}, lr, ids, mask)
  real = mask > 0
  np.testing.assert_allclose(np.asarray(got)[real], np.asarray(want)[real], atol=2e-5, rtol=1e-5)
  # With selection on, only rows from each sample's last real token on can change.
  flex, aux = model.apply({"params": params}, images, ids, mask)
  assert any(np.asarray(v).any() for _, v in aux["lm"]["selections"])
  last = mask.sum(1) - 1
  diff = np.abs(np.asarray(flex) - np.asarray(got)).max(-1)
  for b in range(B):
    assert diff[b, :last[b]].max() < 1e-5 and diff[b, last[b]] > 1e-5


def test_margins_and_grads(model_and_params):
  m = np.asarray(llava_flex.margins_from_sizes(jnp.array([[1200, 900], [600, 1000], [50, 50]]), 24))
  assert (m[0, :3] == 0).all() and (m[0, 3:21] == 1).all() and (m[0, 21:] == 0).all()
  assert (m[1, :, :4] == 0).all() and (m[1, :, 4:20] == 1).all() and m[2].all()
  model, params = model_and_params
  images, ids, mask = _batch()

  def loss(p):
    logits, _ = model.apply({"params": p}, images, ids, mask, ori_sizes=jnp.array([[48, 30], [48, 48]]))
    return logits[:, -1].sum()
  g = jax.grad(loss)(params)
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(g))
  assert np.abs(np.asarray(g["lm"]["layers_3"]["attn"]["k_hd"]["kernel"])).max() > 0


def test_wrong_sizes_fail_naming_the_field(model_and_params):
  model, params = model_and_params
  images, ids, mask = _batch()
  with pytest.raises(ValueError, match="48 px"):
    model.apply({"params": params}, images[:, :32, :32], ids, mask)
  bad = llava_flex.Model(vision=VISION, lm={**LM, **FLEX, "hr_grid": 9}, image_token_id=IMG)
  with pytest.raises(ValueError, match="hr_grid"):
    bad.init(jax.random.PRNGKey(0), images, ids, mask)


def test_cached_generation_equals_the_uncached_forward(model_and_params):
  """`eval.generate` (prefill selects from the last prompt token and caches the HR keys/values;
  decode steps run no vision tower) equals a greedy loop over full forwards that keep the prompt's
  selection for every later row (hr_rows='from_select_row'), on left-padded prompts."""
  from vlm_jax.eval import generate
  model, params = model_and_params
  images, ids, _ = _batch(5)  # a prompt whose continuations hold no image-token id (the uncached
  ids[1] = np.roll(ids[1], 4)  # forward would read one as an image slot); row 1 left-padded by 4
  mask = np.ones_like(ids)
  mask[1, :4] = 0
  ids[1, :4] = 0
  steps = 5
  got = np.asarray(generate(model, params, ids, mask, max_new_tokens=steps, pad_token_id=0,
                            images=images))
  ref_model = llava_flex.Model(vision=VISION, lm={**LM, **FLEX, "hr_rows": "from_select_row"},
                               image_token_id=IMG, zoom=3)
  fwd = jax.jit(lambda i, m, pos: ref_model.apply(
    {"params": params}, images, i, m, positions=pos, select_row=jnp.full((B,), T - 1, jnp.int32))[0])
  seq, m, want = ids, mask, []
  for _ in range(steps):
    pos = np.maximum(np.cumsum(m, axis=1) - 1, 0)
    nxt = np.asarray(jnp.argmax(fwd(seq, m, pos)[:, -1], -1)).astype(np.int32)
    want.append(nxt)
    seq = np.concatenate([seq, nxt[:, None]], 1)
    m = np.concatenate([m, np.ones((B, 1), m.dtype)], 1)
  np.testing.assert_array_equal(got, np.stack(want, 1))
  assert IMG not in got
  # The HR keys matter: the same prompts with nothing selectable decode differently.
  blind = llava_flex.Model(vision=VISION, lm={**LM, **FLEX, "flex_threshold": 255.0},
                           image_token_id=IMG, zoom=3)
  other = np.asarray(generate(blind, params, ids, mask, max_new_tokens=steps, pad_token_id=0,
                              images=images))
  assert (other != got).any()


def test_training_path_per_answer_row_selection_and_ramp(model_and_params):
  """The authors' training path (all HR keys, each answer row its own selection): with one answer
  row per sample it equals the inference path selecting from that row; rows before the first
  answer row are plain LLaVA; alpha = 0 (the ramp's start) is plain everywhere; at mid-ramp the
  answer rows blend."""
  model, params = model_and_params
  images, ids, mask = _batch()
  rows = np.array([20, 22])
  one = np.zeros((B, T), bool)
  one[np.arange(B), rows] = True
  train, _ = model.apply({"params": params}, images, ids, mask, answer_rows=one)
  infer, _ = model.apply({"params": params}, images, ids, mask, select_row=jnp.asarray(rows))
  np.testing.assert_allclose(np.asarray(train), np.asarray(infer), atol=2e-5, rtol=1e-5)
  plain, _ = model.apply({"params": params}, images, ids, mask, answer_rows=np.zeros((B, T), bool))
  assert np.abs(np.asarray(train) - np.asarray(plain))[np.arange(B), rows].max() > 1e-4
  two = one.copy()
  two[np.arange(B), rows + 2] = True
  both, aux = model.apply({"params": params}, images, ids, mask, answer_rows=two)
  for b in range(B):
    np.testing.assert_allclose(np.asarray(both)[b, :rows[b]], np.asarray(plain)[b, :rows[b]],
                               atol=2e-5, rtol=1e-5)
  sel, seen_rows = aux["lm"]["selections"][0]
  assert sel.shape == (B, T, 9) and np.asarray(seen_rows).sum() == 4
  ramp = llava_flex.Model(vision=VISION, lm={**LM, **FLEX}, image_token_id=IMG, zoom=3,
                          alpha_ramp_steps=10)
  start, _ = ramp.apply({"params": params}, images, ids, mask, answer_rows=one, step=0)
  np.testing.assert_allclose(np.asarray(start), np.asarray(plain), atol=2e-5, rtol=1e-5)
  half, _ = ramp.apply({"params": params}, images, ids, mask, answer_rows=one, step=5)
  gap = np.abs(np.asarray(half) - np.asarray(plain))[np.arange(B), rows].max()
  assert 0 < gap < np.abs(np.asarray(train) - np.asarray(plain))[np.arange(B), rows].max()


def test_complete_loaded_copies_k_and_v_into_missing_hd():
  loaded = {"lm/layers_1/attn/k/kernel": jnp.ones(2), "lm/layers_1/attn/v/kernel": 2 * jnp.ones(2),
            "lm/layers_2/attn/k_hd/kernel": 7, "lm/layers_2/attn/k/kernel": 3}
  targets = dict.fromkeys(["lm/layers_1/attn/k_hd/kernel", "lm/layers_1/attn/v_hd/kernel",
                           "lm/layers_2/attn/k_hd/kernel", *loaded])
  got = llava_flex.Model.complete_loaded(loaded, targets)
  assert (got["lm/layers_1/attn/k_hd/kernel"] == 1).all()
  assert (got["lm/layers_1/attn/v_hd/kernel"] == 2).all()
  # Copies, not the same buffer (the train step donates every param).
  assert got["lm/layers_1/attn/k_hd/kernel"] is not loaded["lm/layers_1/attn/k/kernel"]
  assert got["lm/layers_2/attn/k_hd/kernel"] == 7  # loaded ones are kept
