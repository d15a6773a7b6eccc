"""Perceiver Resampler: shapes, per-image independence, latents attending to themselves."""

import jax
import jax.numpy as jnp
import numpy as np

from vlm_jax.layers.resampler import PerceiverResampler


def test_shapes_and_param_layout():
  x = jnp.ones((2, 3, 1, 10, 16))
  m = PerceiverResampler(depth=2, heads=2, dim_head=8, num_latents=5)
  params = m.init(jax.random.PRNGKey(0), x)["params"]
  out, _ = m.apply({"params": params}, x)
  assert out.shape == (2, 3, 5, 16)
  assert params["latents"].value.shape == (5, 16)
  assert set(params) == {"latents", "layers_0", "layers_1", "norm"}
  assert params["layers_0"]["attn"]["q"]["kernel"].value.shape == (16, 2, 8)
  assert "media_time_embs" not in params and "frame_embs" not in params  # OpenFlamingo default


def test_images_are_resampled_independently():
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(1, 3, 1, 6, 8)), jnp.float32)
  m = PerceiverResampler(depth=1, heads=2, dim_head=4, num_latents=3)
  params = m.init(jax.random.PRNGKey(1), x)
  base, _ = m.apply(params, x)
  # A random perturbation (a constant shift would be erased by the media LayerNorm).
  changed, _ = m.apply(params, x.at[0, 1].add(jnp.asarray(rng.normal(size=(1, 6, 8)), jnp.float32)))
  np.testing.assert_array_equal(np.asarray(changed[0, 0]), np.asarray(base[0, 0]))
  np.testing.assert_array_equal(np.asarray(changed[0, 2]), np.asarray(base[0, 2]))
  assert np.abs(np.asarray(changed[0, 1] - base[0, 1])).max() > 1e-4


def test_time_and_frame_embeddings_are_added():
  x = jnp.zeros((1, 2, 2, 3, 8))
  m = PerceiverResampler(depth=1, heads=2, dim_head=4, num_latents=2, max_num_media=4, max_num_frames=2)
  params = m.init(jax.random.PRNGKey(0), x)
  assert params["params"]["media_time_embs"].value.shape == (4, 1, 8)
  out, _ = m.apply(params, x)
  # With zero features, the two media differ only through their time embeddings.
  assert np.abs(np.asarray(out[0, 0] - out[0, 1])).max() > 1e-4


def _ln(x, p):
  mu, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
  return (x - mu) / np.sqrt(var + 1e-5) * p["scale"] + p["bias"]


def test_matches_numpy_reference_of_the_equation():
  """One layer by hand: L += Attn(q=LN_l(L), kv=concat[LN_m(X), LN_l(L)]); L += FFW(L); out = LN(L)."""
  from flax import linen as nn
  import math

  erf = np.vectorize(math.erf)

  rng = np.random.default_rng(3)
  x = jnp.asarray(rng.normal(size=(1, 1, 1, 5, 8)), jnp.float32)
  m = PerceiverResampler(depth=1, heads=2, dim_head=4, num_latents=3)
  params = nn.unbox(m.init(jax.random.PRNGKey(2), x)["params"])
  params = jax.tree.map(lambda p: np.asarray(p) + 0.1 * rng.normal(size=p.shape), params)  # non-trivial LNs
  out, _ = m.apply({"params": params}, x)
  p = params["layers_0"]
  media, lat = np.asarray(x)[0, 0, 0], params["latents"]
  a = p["attn"]
  lm, ll = _ln(media, a["norm_media"]), _ln(lat, a["norm_latents"])
  kv_in = np.concatenate([lm, ll])
  q = np.einsum("nd,dhk->hnk", ll, a["q"]["kernel"])
  k = np.einsum("sd,dhk->hsk", kv_in, a["k"]["kernel"])
  v = np.einsum("sd,dhk->hsk", kv_in, a["v"]["kernel"])
  logits = np.einsum("hnk,hsk->hns", q, k) / 2.0  # dim_head ** -0.5
  probs = np.exp(logits - logits.max(-1, keepdims=True))
  probs /= probs.sum(-1, keepdims=True)
  lat = lat + np.einsum("hnk,hkd->nd", np.einsum("hns,hsk->hnk", probs, v), a["o"]["kernel"])
  f = p["ff"]
  h = _ln(lat, f["norm"]) @ f["up"]["kernel"]
  lat = lat + (0.5 * h * (1 + erf(h / np.sqrt(2)))) @ f["down"]["kernel"]  # exact-erf GELU
  ref = _ln(lat, params["norm"])
  np.testing.assert_allclose(np.asarray(out)[0, 0], ref, atol=1e-5, rtol=1e-5)


def _attention_by_autodiff(p, media, lat):
  """PerceiverAttention as the equation, left to jax's autodiff: LN_m / LN_l, concat, project."""
  def ln(x, q):
    mu, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
    return (x - mu) / jnp.sqrt(var + 1e-5) * q["scale"] + q["bias"]
  lat_n = ln(lat, p["norm_latents"])
  kv = jnp.concatenate([ln(media, p["norm_media"]), lat_n], axis=1)
  q = jnp.einsum("nrd,dhk->nhrk", lat_n, p["q"]["kernel"])
  k = jnp.einsum("nsd,dhk->nhsk", kv, p["k"]["kernel"])
  v = jnp.einsum("nsd,dhk->nhsk", kv, p["v"]["kernel"])
  probs = jax.nn.softmax(jnp.einsum("nhrk,nhsk->nhrs", q, k) / np.sqrt(q.shape[-1]), -1)
  return jnp.einsum("nhrs,nhsk,hke->nre", probs, v, p["o"]["kernel"])


def test_gradients_of_params_media_and_latents_equal_autodiff_of_the_equation():
  """The media keys/values' hand-written VJP (resampler.norm_project) against plain autodiff, with
  non-trivial LayerNorm affines so the scale and bias terms of the reassociated gradient count."""
  from flax import linen as nn

  from vlm_jax.layers.resampler import PerceiverAttention

  rng = np.random.default_rng(5)
  media = jnp.asarray(rng.normal(size=(2, 7, 16)), jnp.float32)
  lat = jnp.asarray(rng.normal(size=(2, 3, 16)), jnp.float32)
  m = PerceiverAttention(heads=2, dim_head=4)
  params = nn.unbox(m.init(jax.random.PRNGKey(0), media, lat)["params"])
  params = jax.tree.map(lambda a: a + 0.3 * jnp.asarray(rng.normal(size=a.shape), a.dtype), params)
  w = jnp.asarray(rng.normal(size=(2, 3, 16)), jnp.float32)

  def loss(fn):
    return lambda p, x, la: jnp.sum(fn(p, x, la) * w)
  ours = jax.grad(loss(lambda p, x, la: m.apply({"params": p}, x, la)), argnums=(0, 1, 2))
  ref = jax.grad(loss(lambda p, x, la: _attention_by_autodiff(p, x, la)), argnums=(0, 1, 2))
  got, want = ours(params, media, lat), ref(params, media, lat)
  np.testing.assert_allclose(np.asarray(m.apply({"params": params}, media, lat)),
                             np.asarray(_attention_by_autodiff(params, media, lat)), atol=1e-5)
  for path, g in jax.tree_util.tree_leaves_with_path(got):
    wnt = jax.tree_util.tree_leaves_with_path(want)
    np.testing.assert_allclose(np.asarray(g), np.asarray(dict(wnt)[path]), rtol=1e-4, atol=1e-5,
                               err_msg=jax.tree_util.keystr(path))
  assert float(jnp.abs(got[0]["norm_media"]["bias"]).max()) > 1e-3  # the terms are exercised


def test_bf16_compute_dtype_runs_every_media_projection_matmul_in_bf16():
  """norm_project follows the module's compute dtype (forward and both backward matmuls in bf16,
  accumulated in float32) and stays within bf16's error of the float32 result."""
  from flax import linen as nn

  from vlm_jax.layers.resampler import PerceiverAttention

  rng = np.random.default_rng(6)
  media = jnp.asarray(rng.normal(size=(2, 7, 16)), jnp.float32)
  lat = jnp.asarray(rng.normal(size=(2, 3, 16)), jnp.float32)
  m32 = PerceiverAttention(heads=2, dim_head=4)
  m16 = PerceiverAttention(heads=2, dim_head=4, dtype=jnp.bfloat16)
  params = nn.unbox(m32.init(jax.random.PRNGKey(0), media, lat)["params"])
  want = np.asarray(m32.apply({"params": params}, media, lat))
  got = m16.apply({"params": params}, media, lat)
  assert got.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(got, np.float32), want, atol=0.05 * np.abs(want).max())
  jaxpr = jax.make_jaxpr(jax.grad(lambda p: jnp.sum(m16.apply({"params": p}, media, lat)
                                                    .astype(jnp.float32))))(params)

  def dots(jx):
    for e in jx.eqns:
      if e.primitive.name == "dot_general":
        yield e
      for sub in jax.core.jaxprs_in_params(e.params):
        yield from dots(sub)
  # The media rows' matmuls: an operand with the 2 * 7 = 14 media rows (xhat, g, or their transposes).
  media_dots = [e for e in dots(jaxpr.jaxpr)
                if any(14 in v.aval.shape and v.aval.ndim == 2 for v in e.invars)]
  assert len(media_dots) == 6, len(media_dots)  # k and v: forward, M = xhat^T g, dxhat
  assert all(v.aval.dtype == jnp.bfloat16 for e in media_dots for v in e.invars)
