"""Self-attention: explicit-probs path equals the fused path; GQA; RoPE; KV cache."""

import jax
import jax.numpy as jnp
import numpy as np

from vlm_jax.layers.attention import KVCache, SelfAttention, causal_padding_mask, dot_product_attention
from vlm_jax.layers.rope import apply_rope, apply_rope_table, rope_tables


def test_explicit_probs_path_equals_fused_path_with_gqa():
  rng = np.random.default_rng(0)
  q = jnp.asarray(rng.normal(size=(2, 5, 4, 8)), jnp.float32)
  k = jnp.asarray(rng.normal(size=(2, 5, 2, 8)), jnp.float32)
  v = jnp.asarray(rng.normal(size=(2, 5, 2, 8)), jnp.float32)
  mask = causal_padding_mask(jnp.array([[1, 1, 1, 1, 1], [0, 0, 1, 1, 1]]))
  fused, _ = dot_product_attention(q, k, v, mask)
  explicit, probs = dot_product_attention(q, k, v, mask, return_probs=True)
  np.testing.assert_allclose(np.asarray(fused)[:, 2:], np.asarray(explicit)[:, 2:], atol=1e-5)
  np.testing.assert_allclose(np.asarray(probs).sum(-1), 1.0, atol=1e-5)
  assert float(probs[0, 0, 1, 2]) == 0.0  # causal
  assert float(probs[1, 3, 4, 1]) == 0.0  # padding
  # GQA: query heads 0,1 share kv head 0 -> equal to repeating kv heads explicitly.
  rep, _ = dot_product_attention(q, jnp.repeat(k, 2, 2), jnp.repeat(v, 2, 2), mask, return_probs=True)
  np.testing.assert_allclose(np.asarray(rep), np.asarray(explicit), atol=1e-5)


def test_rope_relative_property_and_reference():
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(1, 1, 1, 8)), jnp.float32)
  y = jnp.asarray(rng.normal(size=(1, 1, 1, 8)), jnp.float32)

  def dot(p, q):
    return float(jnp.sum(apply_rope(x, jnp.array([[p]])) * apply_rope(y, jnp.array([[q]]))))

  assert abs(dot(3, 1) - dot(10, 8)) < 1e-4  # depends only on the offset
  # HF rotate_half reference for position 2, theta 10000.
  inv = 1.0 / (10000 ** (np.arange(0, 8, 2) / 8))
  ang = np.concatenate([2 * inv, 2 * inv])
  xn = np.asarray(x)[0, 0, 0]
  ref = xn * np.cos(ang) + np.concatenate([-xn[4:], xn[:4]]) * np.sin(ang)
  np.testing.assert_allclose(np.asarray(apply_rope(x, jnp.array([[2]])))[0, 0, 0], ref, atol=1e-6)


def test_rope_tables_and_table_rotation_equal_apply_rope():
  """cos/sin tables of angle = pos * theta^(-2i/d), duplicated over both halves, and the rotation
  with given tables equal apply_rope for integer positions (the path decode and FlexAttention use)."""
  rng = np.random.default_rng(5)
  x = rng.normal(size=(2, 6, 3, 8)).astype(np.float32)
  pos = np.array([[0, 3, 5, 7, 9, 11], [1, 2, 3, 4, 5, 6]])
  inv = 1.0 / (10000.0 ** (np.arange(0, 8, 2) / 8))
  ang = pos[..., None] * inv
  cos, sin = np.concatenate([np.cos(ang)] * 2, -1), np.concatenate([np.sin(ang)] * 2, -1)
  got_cos, got_sin = rope_tables(jnp.asarray(pos), 8, 10000.0)
  np.testing.assert_allclose(np.asarray(got_cos), cos, atol=1e-5)
  np.testing.assert_allclose(np.asarray(got_sin), sin, atol=1e-5)
  np.testing.assert_allclose(np.asarray(apply_rope_table(jnp.asarray(x), cos, sin)),
                             np.asarray(apply_rope(jnp.asarray(x), jnp.asarray(pos))), atol=1e-5)


def test_kv_cache_decode_equals_full_forward():
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(2, 6, 16)), jnp.float32)
  attn = SelfAttention(num_heads=4, head_dim=4, num_kv_heads=2)
  am = jnp.ones((2, 6), jnp.int32)
  params = attn.init(jax.random.PRNGKey(0), x, causal_padding_mask(am))
  full, _ = attn.apply(params, x, causal_padding_mask(am))
  cache = KVCache.zeros(2, 6, 2, 4)
  # Prefill 4 tokens, then decode 2 one at a time.
  out, aux = attn.apply(params, x[:, :4], causal_padding_mask(am, num_queries=4), cache=cache)
  outs = [out]
  cache = aux["cache"]
  for t in (4, 5):
    o, aux = attn.apply(params, x[:, t:t + 1], causal_padding_mask(am, q_offset=t, num_queries=1),
                        cache=cache)
    cache = aux["cache"]
    outs.append(o)
  np.testing.assert_allclose(np.asarray(jnp.concatenate(outs, 1)), np.asarray(full), atol=1e-5)
  assert int(cache.index) == 6


