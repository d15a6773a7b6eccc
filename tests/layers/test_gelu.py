"""The exact GELU with its hand-written VJP (`vlm_jax.layers.mlp.gelu`) against torch's `nn.GELU()`
and against autodiff of `jax.nn.gelu(approximate=False)`: values and gradients, float32."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vlm_jax.layers.mlp import ACTIVATIONS, gelu

torch = pytest.importorskip("torch")

X = np.linspace(-8.0, 8.0, 4001, dtype=np.float32)


def test_gelu_matches_torch_values_and_gradient():
  xt = torch.tensor(X, requires_grad=True)
  yt = torch.nn.GELU()(xt)
  yt.sum().backward()
  y, g = jax.vmap(jax.value_and_grad(gelu))(jnp.asarray(X))
  np.testing.assert_allclose(np.asarray(y), yt.detach().numpy(), atol=1e-6)
  np.testing.assert_allclose(np.asarray(g), xt.grad.numpy(), atol=2e-6)
  assert ACTIVATIONS["gelu"] is gelu


def test_gelu_gradient_equals_autodiff_of_jax_nn_gelu_through_a_dense_chain():
  k = jax.random.split(jax.random.PRNGKey(0), 3)
  x = jax.random.normal(k[0], (64, 32))
  w1, w2 = jax.random.normal(k[1], (32, 96)) * 0.3, jax.random.normal(k[2], (96, 8)) * 0.3

  def loss(act):
    return lambda w1, w2: jnp.sum(jnp.tanh(act(x @ w1) @ w2))
  ours = jax.grad(loss(gelu), argnums=(0, 1))(w1, w2)
  ref = jax.grad(loss(lambda h: jax.nn.gelu(h, approximate=False)), argnums=(0, 1))(w1, w2)
  for a, b in zip(ours, ref):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5)
  # the gradient is not identically zero (the test can fail)
  assert float(jnp.abs(ours[0]).max()) > 1e-2
