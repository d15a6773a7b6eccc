"""Decoder LMs at model level: prefill + token-by-token decode through `init_caches` equals the full
forward (LLaMA with GQA and GPT-NeoX with partial rotary), including a left-padded row."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from vlm_jax.models import gpt_neox, llama

MODELS = {
  "llama": llama.Model(vocab_size=50, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                       mlp_dim=48),
  "gpt_neox": gpt_neox.Model(vocab_size=50, hidden_size=32, num_layers=2, num_heads=4, mlp_dim=48,
                             rotary_pct=0.5),
}


@pytest.mark.parametrize("name", sorted(MODELS))
def test_cached_decode_equals_full_forward(name):
  model = MODELS[name]
  ids = jnp.array([[5, 9, 14, 3, 22, 7, 31, 8], [0, 0, 11, 4, 19, 6, 27, 2]])
  mask = jnp.array([[1] * 8, [0, 0, 1, 1, 1, 1, 1, 1]])
  params = nn.unbox(model.init(jax.random.PRNGKey(0), ids, mask)["params"])
  # Scale the weights up so attention is far from uniform and a cache bug would show.
  params = jax.tree.map(lambda p: p * 3.0 if p.ndim > 1 else p, params)
  full, _ = model.apply({"params": params}, ids, mask)
  caches = model.init_caches(2, 8)
  logits, aux = model.apply({"params": params}, ids[:, :5], mask, caches=caches)
  steps = [logits]
  for t in range(5, 8):
    logits, aux = model.apply({"params": params}, ids[:, t:t + 1], mask, caches=aux["caches"])
    steps.append(logits)
  cached = jnp.concatenate(steps, axis=1)
  real = np.asarray(mask, bool)
  np.testing.assert_allclose(np.asarray(cached)[real], np.asarray(full)[real], atol=2e-5, rtol=2e-5)
  assert int(aux["caches"][0].index) == 8
