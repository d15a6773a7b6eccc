"""DenseGeneral: the logical-axis kernel shape, and 16-bit dots accumulated in float32."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vlm_jax.layers.linear import dense


def test_bf16_dense_rounds_a_float32_accumulated_dot_once():
  """A bf16 projection of width 768 equals round_bf16(float32 dot of its bf16 inputs) to one bf16
  rounding; a bf16-accumulated dot would be off by ~sqrt(768) roundings."""
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(16, 768)), jnp.bfloat16)
  layer = dense((4, 32), ("embed", "heads", "kv"), use_bias=True, dtype=jnp.bfloat16,
                param_dtype=jnp.bfloat16)
  params = nn.unbox(layer.init(jax.random.PRNGKey(0), x))
  kernel = params["params"]["kernel"]
  assert kernel.shape == (768, 4, 32) and kernel.dtype == jnp.bfloat16
  params = jax.tree.map(lambda a: a + 0.01, params)  # a non-zero bias
  y = layer.apply(params, x)
  assert y.dtype == jnp.bfloat16 and y.shape == (16, 4, 32)
  w = np.asarray(params["params"]["kernel"], np.float64).reshape(768, -1)
  exact = (np.asarray(x, np.float64) @ w).reshape(16, 4, 32) + np.asarray(params["params"]["bias"],
                                                                          np.float64)
  # bf16 keeps 8 significant bits: one rounding is within 2^-8 of the value.
  np.testing.assert_allclose(np.asarray(y, np.float64), exact, rtol=2**-8, atol=1e-6)
