"""HF GPT-NeoX <-> vlm_jax: logit parity with transformers (partial rotary, parallel and sequential
residual, left padding) and the JAX -> HF round trip through the fused query_key_value tensor."""

import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from vlm_jax.convert import load_hf_lm, save_hf_lm  # noqa: E402
from vlm_jax.models import gpt_neox  # noqa: E402

ATOL = 1e-4
INPUTS = np.array([[5, 17, 33, 2, 90, 41, 8, 60], [0, 0, 0, 12, 7, 77, 3, 9]], np.int64)
MASK = np.array([[1] * 8, [0, 0, 0, 1, 1, 1, 1, 1]], np.int64)


def _tiny_neox(path, parallel: bool):
  torch.manual_seed(0)
  cfg = transformers.GPTNeoXConfig(
    vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
    rotary_pct=0.5, rope_theta=10000.0, use_parallel_residual=parallel, initializer_range=0.2)
  model = transformers.GPTNeoXForCausalLM(cfg).eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      if "norm" in name or name.endswith("bias"):
        p.add_(0.3 * torch.randn_like(p))
  model.save_pretrained(path)
  return model


def _hf_logits(model):
  with torch.no_grad():
    return model(input_ids=torch.tensor(INPUTS), attention_mask=torch.tensor(MASK)).logits.numpy()


@pytest.mark.parametrize("parallel", [True, False])
def test_gpt_neox_logits_match_transformers(tmp_path, parallel):
  hf_model = _tiny_neox(str(tmp_path / "neox"), parallel)
  model, params = load_hf_lm(str(tmp_path / "neox"))
  assert isinstance(model, gpt_neox.Model) and model.use_parallel_residual == parallel
  assert model.rotary_pct == 0.5
  logits, _ = model.apply({"params": params}, jnp.asarray(INPUTS, jnp.int32), jnp.asarray(MASK))
  real = MASK.astype(bool)
  np.testing.assert_allclose(np.asarray(logits)[real], _hf_logits(hf_model)[real], atol=ATOL, rtol=ATOL)
  save_hf_lm(model, params, str(tmp_path / "export"))
  reloaded = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "export")).eval()
  np.testing.assert_allclose(_hf_logits(reloaded)[real], _hf_logits(hf_model)[real], atol=ATOL,
                             rtol=ATOL)
