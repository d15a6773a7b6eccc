"""Flamingo model: gates at 0 reproduce the bare LM exactly; xattn placement; vision_tokens option."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vlm_jax.models import flamingo, llama
from vlm_jax.param_paths import flatten, unflatten

LM = dict(vocab_size=40, hidden_size=32, num_layers=4, num_heads=4, num_kv_heads=2, mlp_dim=48)
CFG = dict(vision=dict(image_size=16, patch_size=8, width=16, depth=1, heads=2),
           lm=LM, resampler=dict(depth=1, heads=2, dim_head=8, num_latents=3),
           xattn=dict(heads=2, dim_head=8), cross_attn_every_n_layers=2, media_token_id=3)


@pytest.fixture(scope="module")
def setup():
  rng = np.random.default_rng(0)
  model = flamingo.Model(**CFG)
  vx = jnp.asarray(rng.normal(size=(2, 2, 16, 16, 3)), jnp.float32)
  ids = jnp.array([[5, 6, 3, 7, 8, 4, 3, 9, 10, 0], [3, 11, 12, 4, 3, 13, 14, 4, 1, 0]])
  am = (ids != 0).astype(jnp.int32)
  params = jax.tree.map(lambda x: x, flamingo_params(model, vx, ids, am))
  return model, params, vx, ids, am


def flamingo_params(model, vx, ids, am):
  from flax import linen as nn
  return nn.unbox(model.init(jax.random.PRNGKey(0), vx, ids, am)["params"])


def test_xattn_blocks_before_layers_with_every_n():
  assert flamingo.xattn_layer_ids(4, 2) == [1, 3]
  assert flamingo.xattn_layer_ids(24, 1) == list(range(24))
  assert flamingo.xattn_layer_ids(32, 4) == [3, 7, 11, 15, 19, 23, 27, 31]
  with pytest.raises(ValueError, match="cross_attn_every_n_layers"):
    flamingo.xattn_layer_ids(4, 0)


def test_gates_zero_gives_bare_lm_logits(setup):
  model, params, vx, ids, am = setup
  assert sorted(k for k in params if k.startswith("xattn_")) == ["xattn_1", "xattn_3"]
  logits, _ = model.apply({"params": params}, vx, ids, am)
  lm_logits, _ = llama.Model(**LM).apply({"params": params["lm"]}, ids, am)
  np.testing.assert_array_equal(np.asarray(logits), np.asarray(lm_logits))


def test_open_gates_use_the_images_and_respect_the_mask(setup):
  model, params, vx, ids, am = setup
  flat = flatten(params)
  for k in flat:
    if k.endswith("_gate"):
      flat[k] = jnp.full((1,), 0.7)
  p = unflatten(flat)
  base, _ = model.apply({"params": p}, vx, ids, am)
  changed, _ = model.apply({"params": p}, vx.at[0, 1].add(1.0), ids, am)
  d = np.abs(np.asarray(changed - base))
  # Row 0: image 2 is first seen at position 6; earlier tokens are causally unaffected.
  assert d[0, :6].max() == 0.0
  assert d[0, 6:].max() > 1e-4
  assert d[1].max() == 0.0  # other batch row untouched


def test_vision_tokens_option_changes_resampler_input(setup):
  model, params, vx, ids, am = setup
  post = flamingo.Model(**{**CFG, "vision_tokens": "post_ln_post"})
  # LN_post with identity scale/bias is erased by the resampler's own LayerNorm: give it real params.
  flat = flatten(params)
  flat["vision/post_norm/scale"] = jnp.linspace(0.5, 2.0, 16)
  flat["vision/post_norm/bias"] = jnp.linspace(-1.0, 1.0, 16)
  p = unflatten(flat)
  _, a = model.apply({"params": p}, vx, ids, am)
  _, b = post.apply({"params": p}, vx, ids, am)
  assert np.abs(np.asarray(a["media"] - b["media"])).max() > 1e-4
  with pytest.raises(ValueError, match="vision_tokens"):
    flamingo.Model(**{**CFG, "vision_tokens": "cls"})


def test_gpt_neox_backbone_gates_zero_gives_bare_lm_logits():
  from flax import linen as nn
  from vlm_jax.models import gpt_neox
  lm = dict(vocab_size=40, hidden_size=32, num_layers=2, num_heads=4, mlp_dim=48, rotary_pct=0.5)
  model = flamingo.Model(**{**CFG, "lm": lm, "lm_family": "gpt_neox"})
  rng = np.random.default_rng(1)
  vx = jnp.asarray(rng.normal(size=(1, 2, 16, 16, 3)), jnp.float32)
  ids = jnp.array([[5, 3, 7, 8, 4, 3, 9, 10]])
  params = nn.unbox(model.init(jax.random.PRNGKey(0), vx, ids)["params"])
  assert "xattn_1" in params and "norm" in params["lm"] and "bias" in params["lm"]["norm"]
  logits, _ = model.apply({"params": params}, vx, ids)
  ref, _ = gpt_neox.Model(**lm).apply({"params": params["lm"]}, ids)
  np.testing.assert_array_equal(np.asarray(logits), np.asarray(ref))


def test_last_logits_only_is_the_last_row_without_the_full_vocab_matmul(setup):
  """A generation prefill's `last_logits_only=True`: the same last row, and XLA's FLOP count drops by
  the [B, T-1, D] x [D, V] head matmul it no longer computes."""
  model, params, vx, ids, am = setup
  full, _ = model.apply({"params": params}, vx, ids, am)
  last, aux = model.apply({"params": params}, vx, ids, am, last_logits_only=True)
  assert last.shape == (2, 1, LM["vocab_size"])
  np.testing.assert_allclose(np.asarray(last[:, 0]), np.asarray(full[:, -1]), atol=1e-6, rtol=1e-6)

  def flops(last_only):
    f = jax.jit(lambda p: model.apply({"params": p}, vx, ids, am, last_logits_only=last_only)[0])
    cost = f.lower(params).compile().cost_analysis()
    return (cost[0] if isinstance(cost, (list, tuple)) else cost)["flops"]
  b, t = ids.shape
  head = 2 * b * (t - 1) * LM["hidden_size"] * LM["vocab_size"]
  assert flops(False) - flops(True) >= head


def test_vit_normalises_uint8_with_the_data_pipelines_clip_statistics():
  """The ViT keeps its own copy of CLIP's mean/std (models do not import data code): they must
  stay the ones the float pipeline normalises with."""
  from vlm_jax.data import images
  from vlm_jax.models import vit
  assert vit.CLIP_MEAN == images.CLIP_MEAN and vit.CLIP_STD == images.CLIP_STD
