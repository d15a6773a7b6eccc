"""Gated xattn-dense: OpenFlamingo's media masking (reference/flamingo.md 1.5) and gate semantics."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from vlm_jax.layers.gated_xattn import (GatedCrossAttentionBlock, MaskedCrossAttention,
                                        media_attention_mask, media_text_time)

IMG = 9  # <image> id in these tests
# [a][b][<image>1][c][d][<eoc>][<image>2][e]
IDS = np.array([[5, 6, IMG, 7, 8, 4, IMG, 10]])


def test_worked_example_text_time_and_mask():
  text_time = media_text_time(IDS == IMG)
  np.testing.assert_array_equal(text_time, [[0, 0, 1, 1, 1, 1, 2, 2]])
  # Three image slots: the third is zero padding and must never be attended.
  mask = np.asarray(media_attention_mask(text_time, 3))
  expected = np.array([[0, 0, 0], [0, 0, 0], [1, 0, 0], [1, 0, 0], [1, 0, 0], [1, 0, 0],
                       [0, 1, 0], [0, 1, 0]], bool)
  np.testing.assert_array_equal(mask[0], expected)
  # "Attend to all previous images" option.
  mask_all = np.asarray(media_attention_mask(text_time, 3, only_attend_immediate_media=False))
  np.testing.assert_array_equal(mask_all[0, 6], [1, 1, 0])
  np.testing.assert_array_equal(mask_all[0, 1], [0, 0, 0])


@pytest.fixture(scope="module")
def xattn_setup():
  rng = np.random.default_rng(0)
  d, dv, r = 16, 12, 4
  x = jnp.asarray(rng.normal(size=(1, 8, d)), jnp.float32)
  media = jnp.asarray(rng.normal(size=(1, 3, r, dv)), jnp.float32)
  module = MaskedCrossAttention(heads=2, dim_head=8)
  text_time = media_text_time(jnp.asarray(IDS) == IMG)
  params = module.init(jax.random.PRNGKey(0), x, media, text_time)
  return module, params, x, media, text_time


def test_text_before_first_image_gets_exactly_zero(xattn_setup):
  module, params, x, media, text_time = xattn_setup
  out, _ = module.apply(params, x, media, text_time)
  np.testing.assert_array_equal(np.asarray(out[0, :2]), 0.0)
  assert np.abs(np.asarray(out[0, 2:])).min() > 0


def test_each_token_sees_only_its_image(xattn_setup):
  """Changing image 2 changes only tokens from <image>2 on; changing the padded slot changes nothing."""
  module, params, x, media, text_time = xattn_setup
  base, _ = module.apply(params, x, media, text_time)
  media2 = media.at[0, 1].add(1.0)
  out2, _ = module.apply(params, x, media2, text_time)
  np.testing.assert_array_equal(np.asarray(out2[0, :6]), np.asarray(base[0, :6]))
  assert np.abs(np.asarray(out2[0, 6:] - base[0, 6:])).max() > 1e-3
  media3 = media.at[0, 2].set(123.0)  # the zero-padded slot
  out3, _ = module.apply(params, x, media3, text_time)
  np.testing.assert_array_equal(np.asarray(out3), np.asarray(base))
  media1 = media.at[0, 0].add(1.0)
  out1, _ = module.apply(params, x, media1, text_time)
  np.testing.assert_array_equal(np.asarray(out1[0, 6:]), np.asarray(base[0, 6:]))
  assert np.abs(np.asarray(out1[0, 2:6] - base[0, 2:6])).max() > 1e-3


def test_matches_explicit_reference(xattn_setup):
  """Attention computed by hand (numpy) with OpenFlamingo's mask-then-zero-rows semantics."""
  module, params, x, media, text_time = xattn_setup
  out, _ = module.apply(params, x, media, text_time)
  p = jax.tree.map(np.asarray, nn.unbox(params["params"]))
  xn = np.asarray(x[0])
  mu, var = xn.mean(-1, keepdims=True), xn.var(-1, keepdims=True)
  xn = (xn - mu) / np.sqrt(var + 1e-5) * p["norm"]["scale"] + p["norm"]["bias"]
  q = np.einsum("td,dhk->thk", xn, p["q"]["kernel"])
  m = np.asarray(media[0]).reshape(-1, media.shape[-1])
  k = np.einsum("sd,dhk->shk", m, p["k"]["kernel"])
  v = np.einsum("sd,dhk->shk", m, p["v"]["kernel"])
  logits = np.einsum("thk,shk->hts", q, k) / np.sqrt(8)
  allowed = np.repeat(np.asarray(media_attention_mask(text_time, 3))[0], 4, axis=-1)
  logits = np.where(allowed[None], logits, -np.inf)
  with np.errstate(invalid="ignore"):
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs = probs / probs.sum(-1, keepdims=True)
  probs = np.nan_to_num(probs)  # rows with no image -> zero
  att = np.einsum("hts,shk->thk", probs, v)
  ref = np.einsum("thk,hkd->td", att, p["o"]["kernel"])
  np.testing.assert_allclose(np.asarray(out[0]), ref, atol=1e-5, rtol=1e-5)


def test_gates_zero_is_identity_and_ffw_applies_to_all_tokens():
  rng = np.random.default_rng(1)
  y = jnp.asarray(rng.normal(size=(1, 8, 16)), jnp.float32)
  media = jnp.asarray(rng.normal(size=(1, 3, 4, 12)), jnp.float32)
  tt = media_text_time(jnp.asarray(IDS) == IMG)
  block = GatedCrossAttentionBlock(heads=2, dim_head=8)
  params = block.init(jax.random.PRNGKey(0), y, media, tt)
  out, _ = block.apply(params, y, media, tt)
  np.testing.assert_array_equal(np.asarray(out), np.asarray(y))  # gates init to 0
  p = jax.tree.map(lambda a: a, params)
  p["params"]["ff_gate"] = jnp.ones((1,))
  out_ff, _ = block.apply(p, y, media, tt)
  # With only the FFW gate open, tokens before the first image change too (the FFW sees every token).
  assert np.abs(np.asarray(out_ff[0, :2] - y[0, :2])).max() > 1e-3
  p["params"]["ff_gate"] = jnp.zeros((1,))
  p["params"]["attn_gate"] = jnp.ones((1,))
  out_attn, _ = block.apply(p, y, media, tt)
  np.testing.assert_array_equal(np.asarray(out_attn[0, :2]), np.asarray(y[0, :2]))
  assert np.abs(np.asarray(out_attn[0, 2:] - y[0, 2:])).max() > 1e-3
