"""LaViT at toy size (32 px, patch 2 -> 16, 8, 4, 2 token grids; LA layers in stages 2-4, two in a
row in stage 2): shapes per stage, forward/backward finite, identity Theta/Psi at init re-use the
previous layer's probabilities, the model equals a hand composition of the tested layers (all-VA
and full LaViT, patch merges written as reshapes + matmuls), the fixed-resolution error and the
fallback path, and the DP loss in aux against a numpy formula."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from vlm_jax.layers.less_attention import AttentionResidual, LABlock, VABlock
from vlm_jax.models import lavit, model_class

KW = dict(image_size=32, patch_size=2, dims=(8, 16, 16, 24), heads=(1, 2, 2, 4),
          depths=(1, 3, 2, 2), num_va=(1, 1, 1, 1), mlp_ratios=(2, 2, 2, 2), num_classes=5)
B = 2
GRIDS = ((16, 16), (8, 8), (4, 4), (2, 2))


def _images(size=32, seed=0):
  return np.random.default_rng(seed).normal(size=(B, size, size, 3)).astype(np.float32)


def _random_params(model, size=32, seed=1):
  """Params of `model`'s layout with random values (LN scales near 1, Theta/Psi near I)."""
  shapes = nn.unbox(jax.eval_shape(model.init, jax.random.PRNGKey(0), _images(size)))["params"]
  rng = np.random.default_rng(seed)

  def fill(path, s):
    names = [getattr(k, "key", "") for k in path]
    x = 0.3 * rng.normal(size=s.shape).astype(np.float32)
    if names[-1] == "scale":
      return 1.0 + x
    if names[-1] == "kernel" and {"theta", "psi"} & set(names):
      return np.eye(s.shape[-1], dtype=np.float32) + x
    return x

  return jax.tree_util.tree_map_with_path(fill, shapes)


@pytest.fixture(scope="module")
def model():
  return lavit.Model(**KW)


@pytest.fixture(scope="module")
def init_params(model):
  # an rbg key: the same init, compiled a few times faster than threefry on CPU
  return nn.unbox(jax.jit(model.init)(jax.random.key(0, impl="rbg"), _images())["params"])


@pytest.fixture(scope="module")
def apply_fn(model):
  return jax.jit(lambda p, x: model.apply({"params": p}, x, output_attentions=True))


def _ln(x, p, eps=1e-6):
  mu = x.mean(-1, keepdims=True)
  return (x - mu) / np.sqrt(((x - mu) ** 2).mean(-1, keepdims=True) + eps) * p["scale"] + p["bias"]


def _reference(kw, params, images, fallback=False):
  """The model written out: each merge as patches @ kernel, LN, position table, then the layers'
  own VABlock / LABlock / AttentionResidual in the configured order, mean + LN + Dense head."""
  x = np.asarray(images)
  scores = None
  probs = []
  for m, (d, h, depth, va) in enumerate(zip(kw["dims"], kw["heads"], kw["depths"], kw["num_va"])):
    p = params[f"stages_{m}"]
    s = kw["patch_size"] if m == 0 else 2
    b, hh, ww, c = x.shape
    gh, gw = hh // s, ww // s
    patches = x.reshape(b, gh, s, gw, s, c).transpose(0, 1, 3, 2, 4, 5).reshape(b, gh * gw, -1)
    t = patches @ np.asarray(p["merge"]["kernel"]).reshape(s * s * c, d) + p["merge"]["bias"]
    t = _ln(t, p["merge_norm"])
    if "pos_embed" in p:
      pos = np.asarray(p["pos_embed"])
      if (gh, gw) != GRIDS[0]:
        pos = np.asarray(jax.image.resize(pos.reshape(*GRIDS[0], d), (gh, gw, d), "cubic"))
      t = t + pos.reshape(gh * gw, d)
    res = None
    if kw.get("attention_residual", True) and m > 0:
      res = AttentionResidual(h, prev_grid=(hh, ww)).apply({"params": p["attn_residual"]}, scores)
    mlp = int(kw["mlp_ratios"][m] * d)
    for i in range(depth):
      bp = {"params": p[f"blocks_{i}"]}
      if i < va:
        t, a = VABlock(h, mlp).apply(bp, t, res if i == 0 else None)
      else:
        t, a = LABlock(h, mlp, reuse_scores=fallback).apply(bp, t, scores)
      scores = a["scores"]
      probs.append(np.asarray(a["probs"]))
    x = np.asarray(t).reshape(b, gh, gw, d)
  pooled = _ln(x.reshape(B, -1, x.shape[-1]).mean(1), params["head_norm"])
  return pooled @ params["head"]["kernel"] + params["head"]["bias"], probs


def _np_dp_hinge(p):
  """mean |P - P^T| + mean_i relu(mean_{j != i} P_ij - P_ii), written out in numpy."""
  n = p.shape[-1]
  diag = np.diagonal(p, axis1=-2, axis2=-1)
  off_mean = (p.sum(-1) - diag) / (n - 1)
  return np.abs(p - p.swapaxes(-1, -2)).mean() + np.maximum(off_mean - diag, 0).mean()


def test_registered_and_shapes_per_stage(model, init_params, apply_fn):
  assert model_class("lavit") is lavit.Model
  logits, aux = apply_fn(init_params, _images())
  assert logits.shape == (B, 5) and logits.dtype == jnp.float32
  assert model.stage_grids() == GRIDS
  assert model.layer_types() == (("va",), ("va", "la", "la"), ("va", "la"), ("va", "la"))
  for m, ((gh, gw), d, h) in enumerate(zip(GRIDS, KW["dims"], KW["heads"])):
    assert aux["hidden_states"][m].shape == (B, gh * gw, d)
    np.testing.assert_array_equal(np.asarray(aux["feature_maps"][m]).reshape(B, -1, d),
                                  np.asarray(aux["hidden_states"][m]))
    assert [a.shape for a in aux["attentions"][m]] == [(B, h, gh * gw, gh * gw)] * KW["depths"][m]
    sp = init_params[f"stages_{m}"]
    assert ("attn_residual" in sp) == (m > 0) and ("pos_embed" in sp) == (m == 0)
    for i, kind in enumerate(model.layer_types()[m]):
      attn = sp[f"blocks_{i}"]["attn"]
      assert set(attn) == ({"q", "k", "v", "o"} if kind == "va" else {"theta", "psi", "v", "o"})
      if kind == "la":  # N_m x N_m, identity at init
        np.testing.assert_array_equal(attn["theta"]["kernel"], np.eye(gh * gw, dtype=np.float32))
  assert aux["pooled"].shape == (B, 24) and aux["dp_losses"].shape == (4,)


def test_forward_backward_finite(model):
  params = _random_params(model)
  labels = jnp.arange(B) % 5

  @jax.jit
  def loss_fn(p):
    logits, aux = model.apply({"params": p}, _images())
    ce = -jnp.take_along_axis(jax.nn.log_softmax(logits), labels[:, None], 1).mean()
    return ce + 0.1 * aux["dp_loss"]

  loss, grads = jax.value_and_grad(loss_fn)(params)
  assert np.isfinite(float(loss))
  assert all(np.isfinite(np.asarray(g)).all() for g in jax.tree.leaves(grads))
  s2 = grads["stages_2"]
  assert np.abs(s2["blocks_1"]["attn"]["theta"]["kernel"]).max() > 0
  assert np.abs(s2["attn_residual"]["layerscale"]).max() > 0


def test_la_at_init_reuses_previous_probabilities(init_params, apply_fn):
  _, aux = apply_fn(init_params, _images())
  for m, types in enumerate(lavit.Model(**KW).layer_types()):
    probs = [np.asarray(p) for p in aux["attentions"][m]]
    for i, kind in enumerate(types):
      if kind == "la":
        np.testing.assert_allclose(probs[i], probs[i - 1], atol=1e-6)


def test_model_equals_hand_composed_layers(model, apply_fn):
  params = _random_params(model, seed=2)
  logits, aux = apply_fn(params, _images())
  ref, ref_probs = _reference(KW, params, _images())
  np.testing.assert_allclose(np.asarray(logits), ref, rtol=1e-4, atol=1e-4)
  flat = [np.asarray(p) for stage in aux["attentions"] for p in stage]
  for got, want in zip(flat, ref_probs, strict=True):
    np.testing.assert_allclose(got, want, atol=1e-4)


def test_all_va_baseline_equals_a_stack_of_va_blocks():
  kw = lavit.vit_baseline(KW)
  assert kw["num_va"] == KW["depths"] and not kw["attention_residual"]
  base = lavit.Model(**kw)
  params = _random_params(base, seed=3)
  logits, aux = jax.jit(base.apply)({"params": params}, _images())
  ref, _ = _reference(kw, params, _images())
  np.testing.assert_allclose(np.asarray(logits), ref, rtol=1e-4, atol=1e-4)
  assert float(aux["dp_loss"]) == 0.0 and aux["dp_losses"].shape == (0,)
  assert "attn_residual" not in params["stages_1"]
  # no LA layer: any resolution divisible by 16 runs without the fallback flag
  assert jax.eval_shape(base.apply, {"params": params}, _images(48))[0].shape == (B, 5)


def test_fixed_resolution_error_and_fallback(model, apply_fn):
  params = _random_params(model, seed=4)
  with pytest.raises(ValueError, match=r"lavit input is 64x64 but lavit.image_size is 32.*"
                                       r"resolution_fallback=True"):
    model.apply({"params": params}, _images(64))
  with pytest.raises(ValueError, match="divisible by patch_size"):
    model.apply({"params": params}, _images(40))
  fb = lavit.Model(**KW, resolution_fallback=True)
  with pytest.raises(ValueError, match="initialise at lavit.image_size"):
    jax.eval_shape(fb.init, jax.random.PRNGKey(0), _images(64))
  # at image_size the flag changes nothing
  np.testing.assert_allclose(np.asarray(fb.apply({"params": params}, _images())[0]),
                             np.asarray(apply_fn(params, _images())[0]), atol=2e-5)
  logits, aux = jax.jit(lambda p, x: fb.apply({"params": p}, x, output_attentions=True))(
    params, _images(64))
  assert [h.shape[1] for h in aux["hidden_states"]] == [1024, 256, 64, 16]
  ref, _ = _reference(KW, params, _images(64), fallback=True)
  np.testing.assert_allclose(np.asarray(logits), ref, rtol=1e-4, atol=1e-4)
  for stage in aux["attentions"][1:]:  # every LA layer attends with its stage's VA attention
    for p in stage[1:]:
      np.testing.assert_allclose(np.asarray(p), np.asarray(stage[0]), atol=1e-6)


def test_dp_loss_in_aux(model, apply_fn):
  params = _random_params(model, seed=5)
  _, aux = apply_fn(params, _images())
  la = [np.asarray(p) for stage, types in zip(aux["attentions"], model.layer_types())
        for p, kind in zip(stage, types) if kind == "la"]
  want = [_np_dp_hinge(p) for p in la]
  np.testing.assert_allclose(np.asarray(aux["dp_losses"]), want, rtol=1e-5, atol=1e-7)
  assert float(aux["dp_loss"]) == pytest.approx(np.mean(want), rel=1e-5) and min(want) > 0
  # Theta = Psi = 0: every LA row is uniform (symmetric, diagonal = off-diagonal mean): zero
  zero = jax.tree_util.tree_map_with_path(
    lambda path, x: np.zeros_like(x) if {"theta", "psi"} & {getattr(k, "key", "") for k in path}
    else x, params)
  _, aux0 = apply_fn(zero, _images())
  np.testing.assert_allclose(np.asarray(aux0["dp_losses"]), 0.0, atol=1e-7)
  literal = lavit.Model(**KW, dp_mode="paper_literal")
  _, auxl = literal.apply({"params": params}, _images())
  b = sum(float((np.abs(p - p.swapaxes(-1, -2))).sum()) for p in la)
  d = sum(float(((p.shape[-1] - 1) * np.diagonal(p, axis1=-2, axis2=-1)
                 - (p.sum(-1) - np.diagonal(p, axis1=-2, axis2=-1))).sum()) for p in la)
  assert float(auxl["dp_loss"]) == pytest.approx(b + d, rel=1e-4, abs=1e-3)
