"""INF-LLaVA DCM/DEM: crops and re-stitching equal loop references exactly, torch-exact bicubic,
the DEM equals a PyTorch reference of the authors' SpatialEmbed (and of the paper's variants)."""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from vlm_jax.layers.dual_perspective import (DualPerspectiveEnhancement, center_subsample,
                                             crop_local, crop_strided, dual_perspective_crops,
                                             num_views, split_views, stitch_local, stitch_strided)
from vlm_jax.layers.resize import bicubic_matrix, resize_bicubic

B, S, D, HEADS = 2, 4, 32, 4  # a 4 x 4 token grid per view, width 32


def _np(tree):
  return jax.tree.map(np.asarray, nn.unbox(tree))


def _torch_resize(x, size, antialias=False):
  t = torch.from_numpy(np.ascontiguousarray(x)).permute(0, 3, 1, 2)
  y = F.interpolate(t, size=size, mode="bicubic", align_corners=False, antialias=antialias)
  return y.permute(0, 2, 3, 1).numpy()


# ------------------------------------------------------------------------------------------ DCM


def _loop_local(x, n):
  """crop_pixels_N: block (i, j), row-major, each x[:, iH:(i+1)H, jW:(j+1)W]."""
  b, hh, ww, c = x.shape
  h, w = hh // n, ww // n
  out = np.zeros((b, n * n, h, w, c), x.dtype)
  for i in range(n):
    for j in range(n):
      for u in range(h):
        for v in range(w):
          out[:, i * n + j, u, v] = x[:, i * h + u, j * w + v]
  return out


def _loop_strided(x, n):
  """extract_pixels_N: sub-image (p, q), p outer, each x[:, p::n, q::n]."""
  b, hh, ww, c = x.shape
  h, w = hh // n, ww // n
  out = np.zeros((b, n * n, h, w, c), x.dtype)
  for p in range(n):
    for q in range(n):
      for u in range(h):
        for v in range(w):
          out[:, p * n + q, u, v] = x[:, n * u + p, n * v + q]
  return out


def _loop_stitch_local(crops, n):
  b, _, h, w, c = crops.shape
  out = np.zeros((b, n * h, n * w, c), crops.dtype)
  for k in range(n * n):
    i, j = divmod(k, n)
    for u in range(h):
      for v in range(w):
        out[:, i * h + u, j * w + v] = crops[:, k, u, v]
  return out


def _loop_stitch_strided(crops, n):
  b, _, h, w, c = crops.shape
  out = np.zeros((b, n * h, n * w, c), crops.dtype)
  for k in range(n * n):
    p, q = divmod(k, n)
    for u in range(h):
      for v in range(w):
        out[:, n * u + p, n * v + q] = crops[:, k, u, v]
  return out


@pytest.mark.parametrize("n,hw", [(3, (12, 12)), (3, (6, 9)), (2, (8, 6))])
def test_crops_and_stitches_equal_loop_reference(n, hw):
  rng = np.random.default_rng(n)
  x = rng.normal(size=(2, *hw, 3)).astype(np.float32)
  loc, strd = np.asarray(crop_local(jnp.asarray(x), n)), np.asarray(crop_strided(jnp.asarray(x), n))
  np.testing.assert_array_equal(loc, _loop_local(x, n))
  np.testing.assert_array_equal(strd, _loop_strided(x, n))
  assert not np.array_equal(loc, strd)  # the two crop kinds really differ
  crops = rng.normal(size=(2, n * n, 3, 2, 5)).astype(np.float32)
  np.testing.assert_array_equal(np.asarray(stitch_local(jnp.asarray(crops), n)),
                                _loop_stitch_local(crops, n))
  np.testing.assert_array_equal(np.asarray(stitch_strided(jnp.asarray(crops), n)),
                                _loop_stitch_strided(crops, n))
  # Exact inverses, both ways round.
  np.testing.assert_array_equal(np.asarray(stitch_local(crop_local(jnp.asarray(x), n), n)), x)
  np.testing.assert_array_equal(np.asarray(stitch_strided(crop_strided(jnp.asarray(x), n), n)), x)
  np.testing.assert_array_equal(np.asarray(crop_strided(stitch_strided(jnp.asarray(crops), n), n)),
                                crops)


def test_crop_rejects_indivisible_sizes():
  with pytest.raises(ValueError, match="multiples of n=3"):
    crop_local(jnp.zeros((1, 10, 12, 3)), 3)
  with pytest.raises(ValueError, match="n\\*n=9"):
    stitch_strided(jnp.zeros((1, 4, 2, 2, 3)), 3)


@pytest.mark.parametrize("in_hw", [(12, 12), (5, 7)])
def test_dual_perspective_crops_layout(in_hw):
  """Batch-major [9 local, 9 strided, resized] per image, from the image resized to n * crop."""
  n, s = 3, 4
  rng = np.random.default_rng(1)
  x = rng.uniform(size=(2, *in_hw, 3)).astype(np.float32)
  views = np.asarray(dual_perspective_crops(jnp.asarray(x), n, s))
  assert views.shape == (2 * num_views(n), s, s, 3) and num_views(n) == 19
  hr = x if in_hw == (12, 12) else _torch_resize(x, (12, 12))
  v = views.reshape(2, 19, s, s, 3)
  atol = 0 if in_hw == (12, 12) else 1e-5
  np.testing.assert_allclose(v[:, :9], _loop_local(hr, n), atol=atol, rtol=0)
  np.testing.assert_allclose(v[:, 9:18], _loop_strided(hr, n), atol=atol, rtol=0)
  np.testing.assert_allclose(v[:, 18], _torch_resize(hr, (s, s)), atol=1e-5, rtol=0)
  if in_hw == (12, 12):  # exact 3x bicubic without antialias = pixel 3o + 1 = strided crop (1, 1)
    np.testing.assert_array_equal(v[:, 18], v[:, 13])
  loc, strd, res = split_views(jnp.asarray(views), n)
  np.testing.assert_array_equal(np.asarray(res), v[:, 18])
  np.testing.assert_array_equal(np.asarray(strd), v[:, 9:18])
  with pytest.raises(ValueError, match="multiple of 2n\\^2\\+1 = 19"):
    split_views(jnp.zeros((20, 16, 8)), 3)


# ------------------------------------------------------------------------------------- bicubic


@pytest.mark.parametrize("antialias", [False, True])
@pytest.mark.parametrize("in_hw,out_hw", [((12, 12), (4, 4)), ((5, 7), (12, 9)), ((9, 6), (4, 13)),
                                          ((7, 7), (3, 5)), ((3, 2), (8, 1))])
def test_bicubic_equals_torch(in_hw, out_hw, antialias):
  rng = np.random.default_rng(sum(in_hw) + sum(out_hw))
  x = rng.normal(size=(2, *in_hw, 3)).astype(np.float32)
  ours = np.asarray(resize_bicubic(jnp.asarray(x), out_hw, antialias=antialias))
  ref = _torch_resize(x, out_hw, antialias)
  assert ours.shape == ref.shape
  np.testing.assert_allclose(ours, ref, atol=1e-5, rtol=0)


def test_bicubic_at_the_model_sizes():
  """1008 -> 336 (the resized view) and 336 -> 1008 (a 336 processor output, the inference path)."""
  rng = np.random.default_rng(7)
  x = rng.uniform(size=(1, 1008, 1008, 1)).astype(np.float32)
  np.testing.assert_allclose(np.asarray(resize_bicubic(jnp.asarray(x), (336, 336))),
                             _torch_resize(x, (336, 336)), atol=1e-5, rtol=0)
  y = rng.uniform(size=(1, 336, 336, 1)).astype(np.float32)
  np.testing.assert_allclose(np.asarray(resize_bicubic(jnp.asarray(y), (1008, 1008))),
                             _torch_resize(y, (1008, 1008)), atol=1e-5, rtol=0)
  # The weights themselves: torch applied to the identity gives its [out, in] matrix.
  for n_in, n_out in ((336, 1008), (1008, 336)):
    eye = torch.eye(n_in).reshape(1, 1, n_in, n_in)
    t = F.interpolate(eye, size=(n_in, n_out), mode="bicubic", align_corners=False)[0, 0].T
    np.testing.assert_allclose(bicubic_matrix(n_in, n_out), t.numpy(), atol=2e-6, rtol=0)
  # Exact factor 3, no antialias: the 4 taps around 3o + 1 weigh (a = -0.75) 0, 1, 0, 0.
  m = bicubic_matrix(1008, 336)
  np.testing.assert_array_equal(m[5, 15:17], [0.0, 1.0])
  assert np.count_nonzero(m) == 336
  np.testing.assert_array_equal(np.asarray(resize_bicubic(jnp.asarray(x), (1008, 1008))), x)


def test_bicubic_differs_from_jax_image_resize():
  """Why the module has its own resize: jax's cubic (a = -0.5, antialiased) gives other pixels."""
  rng = np.random.default_rng(3)
  x = rng.uniform(size=(1, 12, 12, 3)).astype(np.float32)
  ours = np.asarray(resize_bicubic(jnp.asarray(x), (4, 4)))
  theirs = np.asarray(jax.image.resize(jnp.asarray(x), (1, 4, 4, 3), "bicubic"))
  assert np.abs(ours - theirs).max() > 1e-2


@pytest.mark.parametrize("n", [3, 2])
def test_center_subsample_is_torch_bilinear(n):
  rng = np.random.default_rng(n)
  x = rng.normal(size=(2, 3 * n, 3 * n, 5)).astype(np.float32)
  t = F.interpolate(torch.from_numpy(x).permute(0, 3, 1, 2), size=(3, 3), mode="bilinear",
                    align_corners=False).permute(0, 2, 3, 1).numpy()
  np.testing.assert_allclose(np.asarray(center_subsample(jnp.asarray(x), n)), t, atol=1e-6, rtol=0)


# ----------------------------------------------------------------------------------------- DEM


def _torch_crop_pixels(img, n):  # img [b, c, H, W] -> list, row-major blocks
  h, w = img.shape[2] // n, img.shape[3] // n
  return [img[:, :, i * h:(i + 1) * h, j * w:(j + 1) * w] for i in range(n) for j in range(n)]


def _torch_extract_pixels(img, n):
  return [img[:, :, p::n, q::n] for p in range(n) for q in range(n)]


def _torch_combine_crop(feats, n):  # list of [b, c, h, w] -> [b, c, nh, nw]
  return torch.cat([torch.cat(feats[i * n:(i + 1) * n], dim=3) for i in range(n)], dim=2)


def _torch_combine_stride(feats, n):
  b, c, h, w = feats[0].shape
  out = torch.zeros(b, c, n * h, n * w, dtype=feats[0].dtype)
  for k, f in enumerate(feats):
    p, q = divmod(k, n)
    for u in range(h):
      for v in range(w):
        out[:, :, n * u + p, n * v + q] = f[:, :, u, v]
  return out


def _torch_linear(x, p):
  return x @ p["kernel"].reshape(p["kernel"].shape[0], -1) + p["bias"].reshape(-1)


def _torch_ln(x, p):
  return F.layer_norm(x, x.shape[-1:], p["scale"], p["bias"], 1e-5)


def _torch_mha(q_in, kv_in, p, heads):
  """x = LN(W_o softmax(Q K^T / sqrt(d_k)) V + q_in)."""
  b, t, d = q_in.shape
  dk = d // heads
  split = lambda x: x.view(b, -1, heads, dk).transpose(1, 2)  # noqa: E731
  q, k, v = (split(_torch_linear(x, p[name]))
             for x, name in ((q_in, "q"), (kv_in, "k"), (kv_in, "v")))
  att = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(dk), dim=-1)
  x = (att @ v).transpose(1, 2).reshape(b, t, d)
  o = x @ p["o"]["kernel"].reshape(d, d) + p["o"]["bias"]
  return _torch_ln(o + q_in, p["ln"])


def _torch_mlp(x, p):
  return _torch_linear(F.gelu(_torch_linear(x, p["fc1"])), p["fc2"])


def _torch_dem(features, p, n, pairing, fusion, pooling, combine):
  """The authors' encode_images + SpatialEmbed, written from the equations with lists and loops."""
  v = num_views(n)
  feats = torch.from_numpy(features)
  b, t, d = feats.shape[0] // v, feats.shape[1], feats.shape[2]
  s = int(math.isqrt(t))
  per_view = [feats[k::v] for k in range(v)]  # batch-major stacking: view k of image i at i*v + k
  grid = lambda f: f.reshape(b, s, s, d).permute(0, 3, 1, 2)  # noqa: E731  [b, d, s, s]
  tokens = lambda g: g.permute(0, 2, 3, 1).reshape(b, -1, d)  # noqa: E731
  f_loc = _torch_combine_crop([grid(f) for f in per_view[:n * n]], n)
  f_glo = _torch_combine_stride([grid(f) for f in per_view[n * n:2 * n * n]], n)
  if pairing == "code":  # "Global as Query" over crops, "Local as Query" over strides
    crop_g, comb_g = _torch_crop_pixels, _torch_combine_crop
    crop_l, comb_l = _torch_extract_pixels, _torch_combine_stride
  else:
    crop_g, comb_g = _torch_extract_pixels, _torch_combine_stride
    crop_l, comb_l = _torch_crop_pixels, _torch_combine_crop
  att = p["attention"]
  win = lambda g: g.permute(0, 2, 3, 1).reshape(b, -1, d)  # noqa: E731
  unwin = lambda x: x.reshape(b, s, s, d).permute(0, 3, 1, 2)  # noqa: E731
  e_g = [unwin(_torch_mha(win(q), win(kv), att, HEADS))
         for q, kv in zip(crop_g(f_glo, n), crop_g(f_loc, n))]
  e_l = [unwin(_torch_mha(win(q), win(kv), att, HEADS))
         for q, kv in zip(crop_l(f_loc, n), crop_l(f_glo, n))]
  scale_stride, scale_crop = tokens(comb_g(e_g, n)), tokens(comb_l(e_l, n))
  if fusion == "mlp_residual":
    cat = torch.cat([_torch_mlp(scale_crop, p["ffn_crop"]),
                     _torch_mlp(scale_stride, p["ffn_stride"])], dim=-1)
    fused = _torch_ln(cat + scale_stride + scale_crop, p["ln_fuse"])
  else:
    fused = torch.cat([_torch_linear(scale_crop, p["proj_crop"]),
                       _torch_linear(scale_stride, p["proj_stride"])], dim=-1)
  fmap = fused.reshape(b, n * s, n * s, d).permute(0, 3, 1, 2).float()
  if pooling == "center":
    pooled = F.interpolate(fmap, size=(s, s), mode="bilinear", align_corners=False)
  else:
    pooled = F.avg_pool2d(fmap, n)
  pooled = tokens(pooled)
  both = torch.stack([per_view[-1], pooled])
  out = both.mean(0) if combine == "mean" else both.sum(0)
  return out.numpy(), pooled.numpy()


CONFIGS = {
  "code_n3": dict(num_crops=3),
  "paper_pairing": dict(num_crops=3, window_pairing="paper"),
  "paper_fusion_pool_add": dict(num_crops=3, fusion="linear_concat", pooling="average",
                                combine="add"),
  "code_n2": dict(num_crops=2),
}


def _randomise(params, seed):
  """Perturb every leaf (LN scales, biases included) so a mis-copied param cannot hide."""
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda a: (a + 0.2 * rng.normal(size=a.shape)).astype(np.float32), params)


@pytest.fixture(scope="module", params=list(CONFIGS))
def dem(request):
  cfg = CONFIGS[request.param]
  n = cfg["num_crops"]
  mdl = DualPerspectiveEnhancement(num_heads=HEADS, bottleneck_div=4, **cfg)
  rng = np.random.default_rng(0)
  feats = rng.normal(size=(B * num_views(n), S * S, D)).astype(np.float32)
  params = _randomise(_np(mdl.init(jax.random.PRNGKey(0), feats)["params"]), 1)
  fn = jax.jit(lambda p, f: mdl.apply({"params": p}, f))
  return cfg, mdl, params, feats, fn


def test_dem_equals_torch_reference(dem):
  cfg, _, params, feats, fn = dem
  out, aux = fn(params, feats)
  ref, ref_pooled = _torch_dem(feats, jax.tree.map(torch.from_numpy, params), cfg["num_crops"],
                               cfg.get("window_pairing", "code"), cfg.get("fusion", "mlp_residual"),
                               cfg.get("pooling", "center"), cfg.get("combine", "mean"))
  assert out.shape == (B, S * S, D) and aux["dem"].shape == (B, S * S, D)
  np.testing.assert_allclose(np.asarray(aux["dem"]), ref_pooled, atol=1e-5, rtol=0)
  np.testing.assert_allclose(np.asarray(out), ref, atol=1e-5, rtol=0)


def test_dem_param_layout(dem):
  cfg, _, params, _, _ = dem
  att = params["attention"]
  assert att["q"]["kernel"].shape == (D, HEADS, D // HEADS)
  assert att["q"]["bias"].shape == (HEADS, D // HEADS)
  assert att["o"]["kernel"].shape == (HEADS, D // HEADS, D) and set(att["ln"]) == {"scale", "bias"}
  if cfg.get("fusion", "mlp_residual") == "mlp_residual":
    assert set(params) == {"attention", "ffn_crop", "ffn_stride", "ln_fuse"}  # ONE attention module
    assert params["ffn_crop"]["fc1"]["kernel"].shape == (D, D // 4)
    assert params["ffn_stride"]["fc2"]["kernel"].shape == (D // 4, D // 2)
  else:
    assert set(params) == {"attention", "proj_crop", "proj_stride"}
    assert params["proj_crop"]["kernel"].shape == (D, D // 2)


def test_pairings_and_variants_give_different_outputs():
  """The fields change the computation (else the paper-variant tests above would prove nothing)."""
  n = 3
  feats = np.random.default_rng(5).normal(size=(B * num_views(n), S * S, D)).astype(np.float32)
  base = DualPerspectiveEnhancement(num_heads=HEADS, bottleneck_div=4)
  params = _randomise(_np(base.init(jax.random.PRNGKey(0), feats)["params"]), 2)
  ref = np.asarray(base.apply({"params": params}, feats)[0])
  for field in (dict(window_pairing="paper"), dict(pooling="average"), dict(combine="add")):
    other = np.asarray(base.clone(**field).apply({"params": params}, feats)[0])
    assert np.abs(other - ref).max() > 1e-3, field


def test_mean_combination_with_the_resized_view():
  """out = (CLIP(resized) + F_pool) / 2: shifting the resized view's features by delta moves the
  output by exactly delta / 2 and leaves aux["dem"] alone; other views do not enter linearly."""
  n = 3
  mdl = DualPerspectiveEnhancement(num_heads=HEADS, bottleneck_div=4)
  rng = np.random.default_rng(4)
  feats = rng.normal(size=(B * num_views(n), S * S, D)).astype(np.float32)
  params = _randomise(_np(mdl.init(jax.random.PRNGKey(0), feats)["params"]), 3)
  delta = rng.normal(size=(S * S, D)).astype(np.float32)
  shifted = feats.copy()
  shifted[num_views(n) + 2 * n * n] += delta  # image 1's resized view
  out0, aux0 = mdl.apply({"params": params}, feats)
  out1, aux1 = mdl.apply({"params": params}, shifted)
  np.testing.assert_array_equal(np.asarray(aux1["dem"]), np.asarray(aux0["dem"]))
  np.testing.assert_allclose(np.asarray(out1 - out0)[1], 0.5 * delta, atol=1e-5, rtol=0)
  np.testing.assert_array_equal(np.asarray(out1)[0], np.asarray(out0)[0])  # images independent


@pytest.mark.parametrize("variant", [{}, dict(pooling="average")])
def test_dem_grad_finite_and_which_views_reach_the_output(variant):
  n = 3
  mdl = DualPerspectiveEnhancement(num_heads=HEADS, bottleneck_div=4, **variant)
  feats = np.random.default_rng(6).normal(size=(B * num_views(n), S * S, D))
  feats = jnp.asarray(feats, jnp.float32)
  params = _np(mdl.init(jax.random.PRNGKey(0), feats)["params"])

  def loss(p, f):
    return jnp.mean(jnp.square(mdl.apply({"params": p}, f)[0]))

  gp, gf = jax.jit(jax.grad(loss, argnums=(0, 1)))(params, feats)
  leaves = jax.tree.leaves(gp)
  assert all(bool(jnp.all(jnp.isfinite(g))) for g in leaves) and bool(jnp.all(jnp.isfinite(gf)))
  assert all(float(jnp.abs(g).max()) > 0 for g in leaves)  # every param takes part
  reached = np.abs(np.asarray(gf)).reshape(B, num_views(n), -1).max(-1) > 0
  expected = np.ones(num_views(n), bool)
  if not variant:
    # The code's centre pick reads only strided phase (1, 1) = view 9 + 4: the other 8 strided
    # views are dead compute (module docstring). Average pooling uses them all.
    expected[9:18] = False
    expected[13] = True
  np.testing.assert_array_equal(reached, np.broadcast_to(expected, reached.shape))


def test_dem_rejects_bad_inputs():
  mdl = DualPerspectiveEnhancement(num_heads=HEADS, bottleneck_div=4)
  with pytest.raises(ValueError, match="not a square grid"):
    mdl.init(jax.random.PRNGKey(0), jnp.zeros((19, 15, D)))
  with pytest.raises(ValueError, match="19 views"):
    mdl.init(jax.random.PRNGKey(0), jnp.zeros((20, 16, D)))
  with pytest.raises(ValueError, match="window_pairing"):
    mdl.clone(window_pairing="swapped").init(jax.random.PRNGKey(0), jnp.zeros((19, 16, D)))
