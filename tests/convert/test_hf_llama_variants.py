"""LLaMA-family variants <-> transformers (PyTorch, float32, CPU): Qwen2 (q/k/v biases, windowed upper
layers) and Mistral sliding-window attention, with left padding and through the KV cache."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from vlm_jax.convert import load_hf_lm, save_hf_lm  # noqa: E402
from vlm_jax.convert import llama as llama_conv  # noqa: E402
from vlm_jax.layers.attention import causal_padding_mask  # noqa: E402

ATOL = 1e-4  # float32 on CPU
WINDOW = 3  # well below the sequence length, so a wrong or ignored window changes the logits

# 10 tokens, row 1 left-padded by 2: real queries sit both near the padding and far past the window.
INPUTS = np.array([[5, 17, 33, 2, 90, 41, 8, 60, 11, 4], [0, 0, 12, 7, 77, 3, 9, 50, 21, 6]], np.int64)
MASK = np.array([[1] * 10, [0, 0] + [1] * 8], np.int64)
REAL = MASK.astype(bool)

TINY = dict(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5,
            initializer_range=0.2)  # default 0.02 gives near-uniform attention that hides mask bugs
# The HF references run eager attention, the mask applied as written (sdpa agrees to ~1e-6 on CPU).


def _save_tiny(model_cls, config, path):
  torch.manual_seed(0)
  model = model_cls(config).eval()
  with torch.no_grad():  # non-trivial norms and biases so a wrong mapping of either shows
    for name, p in model.named_parameters():
      if "norm" in name:
        p.copy_(1.0 + 0.3 * torch.randn_like(p))
      elif name.endswith(".bias"):
        p.copy_(0.5 * torch.randn_like(p))
  model.save_pretrained(path)
  return model


def _hf_logits(model):
  with torch.no_grad():
    return model(input_ids=torch.tensor(INPUTS), attention_mask=torch.tensor(MASK)).logits.numpy()


def _ours(model, params, **kw):
  logits, _ = model.apply({"params": params}, jnp.asarray(INPUTS, jnp.int32), jnp.asarray(MASK), **kw)
  return np.asarray(logits)


def _assert_close_on_real_tokens(ours, ref):
  np.testing.assert_allclose(np.asarray(ours)[REAL], ref[REAL], atol=ATOL, rtol=ATOL)


# Qwen2 as shipped (no window) and with Qwen2's partial window: layer 0 full, layer 1 windowed.
QWEN2 = {"full": dict(use_sliding_window=False),
         "window_upper": dict(use_sliding_window=True, sliding_window=WINDOW, max_window_layers=1)}


@pytest.fixture(scope="module", params=sorted(QWEN2))
def qwen2(request, tmp_path_factory):
  path = str(tmp_path_factory.mktemp(f"qwen2_{request.param}"))
  config = transformers.Qwen2Config(**TINY, **QWEN2[request.param], attn_implementation="eager")
  hf_model = _save_tiny(transformers.Qwen2ForCausalLM, config, path)
  model, params = load_hf_lm(path)
  return request.param, hf_model, model, params


@pytest.fixture(scope="module")
def mistral(tmp_path_factory):
  path = str(tmp_path_factory.mktemp("mistral"))
  config = transformers.MistralConfig(**TINY, sliding_window=WINDOW, attn_implementation="eager")
  hf_model = _save_tiny(transformers.MistralForCausalLM, config, path)
  model, params = load_hf_lm(path)
  return hf_model, model, params


def test_window_mask_is_transformers_convention():
  """Our banded mask equals transformers' `sliding_window_causal_mask_function` (key j visible from
  query i iff i - W < j <= i), also for queries offset into a KV cache."""
  from transformers.masking_utils import sliding_window_causal_mask_function

  hf_fn = sliding_window_causal_mask_function(WINDOW)
  for offset, t in ((0, 8), (5, 3)):
    ours = np.asarray(causal_padding_mask(jnp.ones((1, 8)), q_offset=offset, num_queries=t,
                                          sliding_window=WINDOW))[0, 0]
    ref = np.array([[bool(hf_fn(0, 0, torch.tensor(q + offset), torch.tensor(k))) for k in range(8)]
                    for q in range(t)])
    np.testing.assert_array_equal(ours, ref)
  assert ours[-1].sum() == WINDOW  # the query itself counts towards the window


def test_qwen2_logits_match_transformers_with_left_padding(qwen2):
  variant, hf_model, model, params = qwen2
  assert model.qkv_bias and "bias" in params["layers_0"]["attn"]["q"]
  assert "bias" not in params["layers_0"]["attn"]["o"]
  if variant == "window_upper":
    assert (model.sliding_window, model.full_attention_layers) == (WINDOW, 1)
  else:
    assert model.sliding_window is None
  _assert_close_on_real_tokens(_ours(model, params), _hf_logits(hf_model))


def test_qwen2_round_trip_through_transformers(qwen2, tmp_path):
  variant, hf_model, model, params = qwen2
  save_hf_lm(model, params, str(tmp_path))
  reloaded = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path),
                                                               attn_implementation="eager").eval()
  assert type(reloaded).__name__ == "Qwen2ForCausalLM"
  assert reloaded.config.layer_types == hf_model.config.layer_types
  _assert_close_on_real_tokens(_hf_logits(reloaded), _hf_logits(hf_model))


def test_mistral_sliding_window_matches_transformers(mistral, tmp_path):
  hf_model, model, params = mistral
  assert model.sliding_window == WINDOW and not model.qkv_bias
  ours = _ours(model, params)
  _assert_close_on_real_tokens(ours, _hf_logits(hf_model))
  # The window matters here: without it the late tokens' logits are far off.
  unwindowed = _ours(model.clone(sliding_window=None), params)
  assert np.abs(unwindowed - ours)[REAL].max() > 100 * ATOL
  save_hf_lm(model, params, str(tmp_path))
  reloaded = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path),
                                                               attn_implementation="eager").eval()
  assert type(reloaded).__name__ == "MistralForCausalLM" and reloaded.config.sliding_window == WINDOW
  _assert_close_on_real_tokens(_hf_logits(reloaded), _hf_logits(hf_model))


def test_mistral_cached_decode_with_window_equals_full_forward(mistral):
  hf_model, model, params = mistral
  ids, mask = jnp.asarray(INPUTS, jnp.int32), jnp.asarray(MASK)
  full = _ours(model, params)
  apply = jax.jit(lambda x, caches: model.apply({"params": params}, x, mask, caches=caches))
  prefill = 5  # longer than the window, so the cache already holds keys outside it
  logits, aux = apply(ids[:, :prefill], model.init_caches(2, ids.shape[1]))
  steps = [logits]
  for t in range(prefill, ids.shape[1]):
    logits, aux = apply(ids[:, t:t + 1], aux["caches"])
    steps.append(logits)
  cached = np.asarray(jnp.concatenate(steps, axis=1))
  np.testing.assert_allclose(cached[REAL], full[REAL], atol=2e-5, rtol=2e-5)
  _assert_close_on_real_tokens(cached, _hf_logits(hf_model))


def test_config_defaults_and_refusals():
  base = dict(TINY, model_type="mistral")
  del base["initializer_range"]
  # MistralConfig defaults sliding_window to 4096 when the key is absent; null turns it off.
  assert llama_conv.model_kwargs_from_hf(base)["sliding_window"] == 4096
  assert llama_conv.model_kwargs_from_hf({**base, "sliding_window": None})["sliding_window"] is None
  qwen = dict(base, model_type="qwen2", use_sliding_window=True, sliding_window=WINDOW)
  # Qwen2's default max_window_layers (28) covers both layers: nothing is windowed.
  kw = llama_conv.model_kwargs_from_hf(qwen)
  assert kw["qkv_bias"] and kw["sliding_window"] is None and kw["full_attention_layers"] == 0
  with pytest.raises(NotImplementedError, match="layer_types.*full-attention layers only before"):
    llama_conv.model_kwargs_from_hf({**qwen, "layer_types": ["sliding_attention", "full_attention"]})
  kw = llama_conv.model_kwargs_from_hf({**base, "sliding_window": WINDOW})
  with pytest.raises(NotImplementedError, match="full_attention_layers=1 without qkv_bias"):
    llama_conv.hf_config({**kw, "full_attention_layers": 1})
