"""INF-LLaVA at toy size (16 px tower in 4 x 4 patches, n = 3 -> 48 px images, 16 image tokens):
the views it encodes (one CLIP call, 10 of the authors' 19 at n = 3), and that skipping the dead
ones changes nothing: equal to the authors' path (all 2n^2 + 1 views through CLIP, the DEM, the
mean, the projector) built here from the layers, for the default and the paper's variants, odd and
even n; gradients, errors, and KV-cached greedy decoding equal to a loop of uncached forwards.
(Parity with a PyTorch reference of the authors' code is in tests/convert/test_inf_llava.py.)"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from vlm_jax.layers import dual_perspective as dp
from vlm_jax.layers.mlp import Mlp
from vlm_jax.models import build_model, inf_llava, vit

VISION = dict(image_size=16, patch_size=4, width=32, depth=2, heads=4)
LM = dict(vocab_size=64, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, mlp_dim=48)
DEM = dict(num_heads=8, bottleneck_div=4)
IMG, P, B, T = -200, 16, 2, 24  # the original code's image id, outside the vocabulary


def _model(**kw):
  return inf_llava.Model(**{"vision": VISION, "lm": LM, "image_token_id": IMG, "dem": DEM, **kw})


def _batch(n=3, seed=0):
  rng = np.random.default_rng(seed)
  images = rng.normal(size=(B, 16 * n, 16 * n, 3)).astype(np.float32)
  ids = rng.integers(1, 60, (B, T)).astype(np.int32)
  ids[0, 2:2 + P] = IMG
  ids[1, 6:6 + P] = IMG
  mask = np.ones((B, T), np.int32)
  mask[1, :2] = 0
  return images, ids, mask


def _random(shape, rng, path):
  """LN scales 1 + noise, biases noise, kernels / embeddings N(0, 1 / first dim): every param
  matters, no compile (an init would cost seconds)."""
  if path[-1] == "scale":
    return 1 + 0.1 * rng.normal(size=shape)
  if len(shape) == 1:
    return 0.1 * rng.normal(size=shape)
  return rng.normal(size=shape) / np.sqrt(shape[0])


@pytest.fixture(scope="module")
def params():
  images, ids, mask = _batch()
  shapes = nn.unbox(jax.eval_shape(_model().init, jax.random.PRNGKey(0), images, ids, mask))
  rng = np.random.default_rng(1)
  return jax.tree_util.tree_map_with_path(
    lambda path, x: jnp.asarray(_random(x.shape, rng, [k.key for k in path]), jnp.float32),
    shapes["params"])


@pytest.fixture(scope="module")
def forward(params):
  """The default model's jitted forward: (images, ids, mask) -> (logits, aux)."""
  return jax.jit(lambda x, i, m: _model().apply({"params": params}, x, i, m))


def test_view_plan_and_views():
  enc, src = inf_llava.view_plan(3)
  assert enc == tuple(range(9)) + (13,)  # 9 local crops + strided crop (1, 1)
  assert src == tuple(range(9)) + (9,) * 10  # every strided view and the resized one read row 9
  assert len(inf_llava.view_plan(3, "paper")[0]) == 18  # resized = strided (1, 1) still
  assert len(inf_llava.view_plan(3, "code", "average")[0]) == 18
  assert inf_llava.view_plan(2)[0] == tuple(range(9))  # even n: 4 live phases, inexact resize
  assert inf_llava.view_plan(4)[0] == tuple(range(16)) + (21, 22, 25, 26, 32)
  assert inf_llava.view_plan(3, skip_dead_views=False)[0] == tuple(range(19))
  for n in (2, 3, 5):
    x = jnp.asarray(np.random.default_rng(n).normal(size=(2, 8 * n, 8 * n, 3)), jnp.float32)
    full = np.asarray(dp.dual_perspective_crops(x, n, 8)).reshape(2, dp.num_views(n), 8, 8, 3)
    every = tuple(range(dp.num_views(n)))
    np.testing.assert_array_equal(np.asarray(inf_llava.dcm_views(x, n, 8, every)),
                                  full.reshape(-1, 8, 8, 3))
    enc, src = inf_llava.view_plan(n)
    ours = np.asarray(inf_llava.dcm_views(x, n, 8, enc)).reshape(2, len(enc), 8, 8, 3)
    np.testing.assert_array_equal(ours, full[:, list(enc)])
    c = (n - 1) // 2
    same = np.array_equal(full[:, -1], full[:, n * n + c * n + c])  # resized vs strided (c, c)
    assert same == (n % 2 == 1)


def _vision_batches(model, images, ids):
  """Batch sizes of every vision-tower call while tracing one forward."""
  sizes = []

  def spy(next_fun, args, kwargs, context):
    if isinstance(context.module, vit.Model) and context.method_name == "__call__":
      sizes.append(args[0].shape[0])
    return next_fun(*args, **kwargs)
  with nn.intercept_methods(spy):
    jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), images, ids))
  return sizes


def test_one_clip_call_on_the_views_it_needs():
  images, ids, _ = _batch()
  assert _vision_batches(_model(), images, ids) == [B * 10]
  assert _model().clip_forwards_per_image == 10
  assert _vision_batches(_model(dem={**DEM, "window_pairing": "paper"}), images, ids) == [B * 18]
  assert _vision_batches(_model(skip_dead_views=False), images, ids) == [B * 19]
  assert _vision_batches(_model(num_crops=2), *_batch(2)[:2]) == [B * 9]


def _authors_path(params, images, n, dem):
  """The authors' encode_images from the layers: 2n^2 + 1 views, CLIP layer -2 patch tokens, DEM
  (incl. the mean with the resized view), projector."""
  views = dp.dual_perspective_crops(jnp.asarray(images), n, 16)
  _, vaux = vit.Model(**VISION).apply({"params": params["vision"]}, views)
  tokens, daux = dp.DualPerspectiveEnhancement(num_crops=n, **dem).apply(
    {"params": params["spatial_embed"]}, vaux["hidden_states"][-2][:, 1:])
  feats = Mlp(32, "gelu", True, out_dim=32).apply({"params": params["projector"]}, tokens)
  return feats, daux["dem"]


@pytest.mark.parametrize("n,dem", [(3, {}), (3, {"window_pairing": "paper"}),
                                   (3, {"pooling": "average", "combine": "add"}), (2, {})],
                         ids=["code_n3", "paper_pairing", "average_add", "code_n2"])
def test_skipping_dead_views_equals_the_authors_path(params, forward, n, dem):
  images, ids, mask = _batch(n)
  model = _model(num_crops=n, dem={**DEM, **dem})
  if n == 3 and not dem:
    logits, aux = forward(images, ids, mask)
  else:
    logits, aux = jax.jit(lambda x: model.apply({"params": params}, x, ids, mask))(images)
  want_feats, want_dem = jax.jit(lambda x: _authors_path(params, x, n, {**DEM, **dem}))(images)
  np.testing.assert_allclose(np.asarray(aux["image_features"]), want_feats, atol=2e-5, rtol=1e-5)
  np.testing.assert_allclose(np.asarray(aux["dem"]), want_dem, atol=2e-5, rtol=1e-5)
  if n == 3 and not dem:  # the model's own all-views path gives the same logits
    full = _model(num_crops=n, dem=DEM, skip_dead_views=False)
    full_logits = jax.jit(lambda x: full.apply({"params": params}, x, ids, mask)[0])(images)
    np.testing.assert_allclose(np.asarray(logits), np.asarray(full_logits), atol=2e-5, rtol=1e-5)
  assert logits.shape == (B, T, 64) and aux["image_features"].shape == (B, P, 32)
  assert np.abs(want_dem).max() > 0.1  # the DEM contributes


def test_images_matter(forward):
  images, ids, mask = _batch()
  # A pixel of a dead strided phase still moves the output (it lies in a live local crop).
  other = images.copy()
  other[:, 0, 0] += 1.0
  assert np.abs(np.asarray(forward(other, ids, mask)[0] - forward(images, ids, mask)[0])).max() > 1e-3


def test_gradients_reach_the_dem_the_projector_and_the_tower(params):
  images, ids, mask = _batch()

  def loss(p):
    logits, _ = _model().apply({"params": p}, images, ids, mask)
    return jnp.mean(jax.nn.log_softmax(logits)[..., 3])
  g = jax.jit(jax.grad(loss))(params)
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(g))
  for path in (("spatial_embed", "attention", "q", "kernel"), ("spatial_embed", "ffn_crop", "fc1",
               "kernel"), ("spatial_embed", "ln_fuse", "scale"), ("projector", "fc1", "kernel"),
               ("vision", "layers_0", "attn", "q", "kernel")):
    leaf = g
    for k in path:
      leaf = leaf[k]
    assert np.abs(np.asarray(leaf)).max() > 0, path


def test_bad_inputs_fail_naming_the_field(params):
  images, ids, mask = _batch()
  with pytest.raises(ValueError, match=r"32 image tokens \(id -200\) but 1 image\(s\) give 16"):
    _model().apply({"params": params}, images[:1], ids, mask)
  with pytest.raises(ValueError, match="no images were given"):
    _model().apply({"params": params}, None, ids, mask)
  with pytest.raises(ValueError, match="vision_feature_select_strategy"):
    _model(vision_feature_select_strategy="full")
  with pytest.raises(ValueError, match=r"model.dem has unknown fields \['heads'\]"):
    _model(dem={"heads": 8})
  assert isinstance(build_model("inf_llava", dict(vision=VISION, lm=LM)), inf_llava.Model)


def test_cached_greedy_generation_equals_uncached_forwards(params):
  """`eval.generate` (images at the prefill only, then images=None decode steps on the KV cache)
  equals greedy argmax over full forwards (vision tower, DEM and every token again each step) on
  left-padded prompts; the uncached loop runs on one fixed-length buffer, future slots masked."""
  from vlm_jax.eval import generate
  images, ids, mask = _batch(seed=5)
  steps = 6
  model = _model()
  got = np.asarray(generate(model, params, ids, mask, max_new_tokens=steps, pad_token_id=0,
                            images=images))
  fwd = jax.jit(lambda s, m: model.apply({"params": params}, images, s, m,
                                         positions=jnp.maximum(jnp.cumsum(m, 1) - 1, 0))[0])
  seq = np.concatenate([ids, np.zeros((B, steps), np.int32)], 1)
  m = np.concatenate([mask, np.zeros((B, steps), np.int32)], 1)
  for i in range(steps):
    seq[:, T + i] = np.asarray(jnp.argmax(fwd(seq, m)[:, T + i - 1], -1))
    m[:, T + i] = 1
  np.testing.assert_array_equal(got, seq[:, T:])
  # The image reaches the generated text.
  other = np.asarray(generate(model, params, ids, mask, max_new_tokens=steps, pad_token_id=0,
                              images=images[::-1]))
  assert (other != got).any()
