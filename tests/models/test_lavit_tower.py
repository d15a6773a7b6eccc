"""LaViT as the vision tower of LLaVA and Flamingo (`model.vision_family="lavit"`), at toy size
(32 px, patch 4 -> 8x8, 4x4, 2x2, 1x1 stage grids): the LM receives projector(the selected stage of
LaViT run alone), no CLS dropped; Flamingo's resampler reads the last stage at its width and
closed gates give the bare LM; a jitted step that trains only the projector / resampler gets
finite nonzero grads; bad families and options fail naming the field."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import linen as nn
from scipy.special import erf

from vlm_jax.layers.resampler import PerceiverResampler
from vlm_jax.models import flamingo, lavit, llama, llava, vision_tower
from vlm_jax.models.vit import CLIP_MEAN, CLIP_STD
from vlm_jax.param_paths import flatten, unflatten
from vlm_jax.train.state import merge_params, split_params

V = dict(image_size=32, patch_size=4, dims=(16, 32, 48, 64), heads=(1, 2, 2, 4),
         depths=(1, 1, 2, 2), num_va=(1, 1, 1, 1), mlp_ratios=(2, 2, 2, 2))
LM = dict(vocab_size=40, hidden_size=32, num_layers=4, num_heads=4, num_kv_heads=2, mlp_dim=48)
IMG = 39          # LLaVA image-token id
P = 4             # stage -2 (the default vision_feature_layer): a 2x2 grid
LLAVA = dict(vision=V, vision_family="lavit", lm=LM, image_token_id=IMG)
FLAMINGO = dict(vision=V, vision_family="lavit", lm=LM,
                resampler=dict(depth=1, heads=2, dim_head=8, num_latents=3),
                xattn=dict(heads=2, dim_head=8), cross_attn_every_n_layers=2, media_token_id=3)


def _images(shape, seed=0):
  return jnp.asarray(np.random.default_rng(seed).normal(size=shape), jnp.float32)


def _random_params(model, *inputs, seed=0):
  """Params of `model`'s layout, random (init's compile would dominate this file's run time):
  kernels/biases N(0, 0.2), LN scales near 1, LA Theta/Psi near I, xattn gates 0 (as at init)."""
  shapes = nn.unbox(jax.eval_shape(model.init, jax.random.PRNGKey(0), *inputs))["params"]
  rng = np.random.default_rng(seed)

  def fill(path, s):
    names = [getattr(k, "key", "") for k in path]
    x = 0.2 * rng.normal(size=s.shape).astype(np.float32)
    if names[-1].endswith("_gate"):
      return np.zeros(s.shape, np.float32)
    if names[-1] == "scale":
      return 1.0 + x
    if names[-1] == "kernel" and {"theta", "psi"} & set(names):
      return np.eye(s.shape[-1], dtype=np.float32) + x
    return x

  return jax.tree.map(jnp.asarray, jax.tree_util.tree_map_with_path(fill, shapes))


def _ce(logits, ids):
  """Next-token CE over every position (a stand-in for the trainer's loss)."""
  return optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], ids[:, 1:]).mean()


@pytest.fixture(scope="module")
def llava_setup():
  model = llava.Model(**LLAVA)
  images = _images((2, 32, 32, 3))
  run = [IMG] * P
  ids = jnp.array([[1, 5, *run, 6, 7, 8, 0], [1, *run, 9, 10, 11, 12, 13]], jnp.int32)
  am = (ids != 0).astype(jnp.int32)
  params = _random_params(model, images, ids, am)
  fwd = jax.jit(lambda p, x: model.apply({"params": p}, x, ids, am))
  return model, params, images, ids, am, fwd


@pytest.fixture(scope="module")
def flamingo_setup():
  model = flamingo.Model(**FLAMINGO)
  vx = _images((2, 2, 32, 32, 3), seed=1)
  ids = jnp.array([[5, 6, 3, 7, 8, 4, 3, 9, 10, 0], [3, 11, 12, 4, 3, 13, 14, 4, 1, 0]])
  am = (ids != 0).astype(jnp.int32)
  params = _random_params(model, vx, ids, am, seed=1)
  assert {k for k in flatten(params) if k.endswith("_gate")} == {
    "xattn_1/attn_gate", "xattn_1/ff_gate", "xattn_3/attn_gate", "xattn_3/ff_gate"}
  fwd = jax.jit(lambda p, x: model.apply({"params": p}, x, ids, am))
  return model, params, vx, ids, am, fwd


def _lavit_alone(params, images):
  """The selected tower outputs of LaViT run on its own with the composed model's vision params."""
  return _LAVIT_ALONE(params, images)


_LAVIT_ALONE = jax.jit(
  lambda p, x: lavit.Model(**V, num_classes=0).apply({"params": p}, x)[1]["hidden_states"])
_LM_ALONE = jax.jit(lambda p, ids, am, **kw: llama.Model(**LM).apply({"params": p}, ids, am, **kw),
                    static_argnames="embed_hook")


def test_llava_lm_receives_projected_lavit_stage(llava_setup):
  model, params, images, ids, am, fwd = llava_setup
  assert model.num_image_tokens == P
  assert "head" not in params["vision"] and "stages_3" in params["vision"]
  # projector input width = the selected stage's width dims[-2] (48), not the ViT's `width`
  assert params["projector"]["fc1"]["kernel"].shape == (48, LM["hidden_size"])
  logits, aux = fwd(params, images)
  assert logits.shape == (2, ids.shape[1], LM["vocab_size"]) and np.isfinite(logits).all()

  # reference: projector (exact-erf GELU MLP, numpy) of stage -2 of LaViT alone, all 2x2 tokens
  z = np.asarray(_lavit_alone(params["vision"], images)[-2])
  assert z.shape == (2, P, 48)
  pj = jax.tree.map(np.asarray, params["projector"])
  h = z @ pj["fc1"]["kernel"] + pj["fc1"]["bias"]
  ref = (0.5 * h * (1 + erf(h / np.sqrt(2)))) @ pj["fc2"]["kernel"] + pj["fc2"]["bias"]
  np.testing.assert_allclose(np.asarray(aux["image_features"]), ref, atol=1e-5, rtol=1e-5)

  # what the LM gets: its embeddings with the image span replaced by `ref`, in reading order
  is_image = np.asarray(ids == IMG)
  assert is_image.sum() == 2 * P

  def hook(x):  # numpy mask: row-major integer indices, the k-th image token gets row k
    return x.at[is_image].set(ref.reshape(-1, ref.shape[-1]))
  text_ids = jnp.where(ids == IMG, 0, ids)
  lm_logits, _ = _LM_ALONE(params["lm"], text_ids, am, embed_hook=hook)
  np.testing.assert_allclose(np.asarray(logits), np.asarray(lm_logits), atol=1e-5, rtol=1e-5)


def test_llava_lavit_feature_layer_picks_the_stage():
  m = llava.Model(**{**LLAVA, "vision_feature_layer": 1})
  assert m.num_image_tokens == 16 and m.layer_stacks() == ()
  assert llava.Model(**{**LLAVA, "vision_feature_layer": -1}).num_image_tokens == 1


def test_flamingo_resampler_reads_last_stage_and_closed_gates_give_bare_lm(flamingo_setup):
  model, params, vx, ids, am, fwd = flamingo_setup
  assert model.layer_stacks() == ()
  assert params["resampler"]["latents"].shape == (3, 64)  # resampler width = D_last = dims[-1]
  logits, aux = fwd(params, vx)
  assert np.isfinite(logits).all() and aux["media"].shape == (2, 2, 3, 64)
  # gates at 0 (the init): the images cannot move the logits, which are the LM's own
  np.testing.assert_array_equal(np.asarray(logits), np.asarray(fwd(params, vx + 1.0)[0]))
  lm_logits, _ = _LM_ALONE(params["lm"], ids, am)
  np.testing.assert_allclose(np.asarray(logits), np.asarray(lm_logits), atol=1e-5, rtol=1e-5)

  last = _lavit_alone(params["vision"], vx.reshape(4, 32, 32, 3))[-1]  # [B * T_img, 1, 64]
  resampler = PerceiverResampler(**FLAMINGO["resampler"])
  ref, _ = jax.jit(resampler.apply)({"params": params["resampler"]}, last.reshape(2, 2, 1, 1, 64))
  np.testing.assert_allclose(np.asarray(aux["media"]), np.asarray(ref), atol=1e-5, rtol=1e-5)


def test_lavit_tower_normalises_uint8_like_the_vit(flamingo_setup):
  model, params, _, _, _, fwd = flamingo_setup
  raw = np.random.default_rng(2).integers(0, 256, size=(2, 2, 32, 32, 3)).astype(np.uint8)
  norm = (raw.astype(np.float32) / 255.0 - np.array(CLIP_MEAN)) / np.array(CLIP_STD)
  _, a = fwd(params, jnp.asarray(raw))
  _, b = fwd(params, jnp.asarray(norm, jnp.float32))
  np.testing.assert_allclose(np.asarray(a["media"]), np.asarray(b["media"]), atol=1e-5)
  assert np.abs(np.asarray(a["media"] - fwd(params, jnp.asarray(raw, jnp.float32))[1]["media"])
                ).max() > 1e-3  # raw floats are not normalised: the uint8 path did the work


def _grads(model, params, regex, inputs, ids, am):
  trainable, frozen = split_params(params, regex)

  @jax.jit
  def step(t, f):
    def loss(t):
      logits, _ = model.apply({"params": merge_params(t, f)}, inputs, ids, am)
      return _ce(logits, ids)
    return jax.value_and_grad(loss)(t)
  value, grads = step(trainable, frozen)
  assert set(flatten(grads)) == set(flatten(trainable))
  assert not any(k.startswith("vision/") for k in flatten(grads))
  return value, flatten(grads)


def test_step_training_only_projector_or_resampler_has_finite_nonzero_grads(
    llava_setup, flamingo_setup):
  model, params, images, ids, am, _ = llava_setup
  value, grads = _grads(model, params, r"^projector/", images, ids, am)
  assert np.isfinite(value) and all(k.startswith("projector/") for k in grads)
  for k, g in grads.items():
    assert np.isfinite(g).all() and np.abs(g).max() > 0, k

  model, params, vx, ids, am, _ = flamingo_setup
  flat = flatten(params)  # open the gates: at tanh(0) = 0 no gradient reaches the resampler
  flat = {k: jnp.full_like(v, 0.5) if k.endswith("_gate") else v for k, v in flat.items()}
  value, grads = _grads(model, unflatten(flat), r"^resampler/", vx, ids, am)
  assert np.isfinite(value) and all(k.startswith("resampler/") for k in grads)
  assert all(np.isfinite(g).all() for g in grads.values())
  assert np.abs(grads["resampler/latents"]).max() > 0


def test_bad_family_and_options_name_the_field():
  for cls, cfg in ((llava.Model, LLAVA), (flamingo.Model, FLAMINGO)):
    with pytest.raises(ValueError, match=r"model\.vision_family 'clip'.*\('vit', 'lavit'\)"):
      cls(**{**cfg, "vision_family": "clip"})
  with pytest.raises(ValueError, match="model.vision_family"):
    vision_tower("resnet", {}, parent=None)
  with pytest.raises(ValueError, match="model.vision_tokens"):
    flamingo.Model(**{**FLAMINGO, "vision_tokens": "post_ln_post"})
  with pytest.raises(ValueError, match="model.vision_feature_layer"):
    llava.Model(**{**LLAVA, "vision_feature_layer": 4})
  with pytest.raises(ValueError, match="model.vision_feature_layer"):
    llava.Model(**{**LLAVA, "vision_feature_layer": (-2, -1)})
  with pytest.raises(ValueError, match="model.vision_feature_select_strategy"):
    llava.Model(**{**LLAVA, "vision_feature_select_strategy": "full"})
  from vlm_jax.models import inf_llava
  with pytest.raises(ValueError, match="supports only 'vit'"):
    inf_llava.Model(**LLAVA)
