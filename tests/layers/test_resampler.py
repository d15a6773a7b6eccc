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
