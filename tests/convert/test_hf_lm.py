"""HF LLaMA <-> vlm_jax: logit parity with transformers (PyTorch, float32, CPU) both ways, and strict
errors on bad checkpoints."""

import json
import os
import shutil

import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from vlm_jax.convert import load_hf_lm, save_hf_lm  # noqa: E402
from vlm_jax.convert.safetensors_io import CheckpointReader, write_checkpoint  # noqa: E402

ATOL = 1e-4  # float32 on CPU; eager vs SDPA attention alone differ by ~1e-5


def _tiny_llama(path, *, tie=False, kv_heads=2, theta=500000.0):
  torch.manual_seed(0)
  cfg = transformers.LlamaConfig(
    vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=kv_heads, rope_theta=theta, tie_word_embeddings=tie,
    initializer_range=0.2,  # default 0.02 gives near-uniform attention that hides RoPE/mask bugs
    rms_norm_eps=1e-5)
  model = transformers.LlamaForCausalLM(cfg).eval()
  with torch.no_grad():  # non-trivial norm weights so a wrong norm mapping shows
    for name, p in model.named_parameters():
      if "norm" in name:
        p.copy_(1.0 + 0.3 * torch.randn_like(p))
  model.save_pretrained(path)
  return model


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
  path = str(tmp_path_factory.mktemp("llama"))
  return path, _tiny_llama(path)


INPUTS = np.array([[5, 17, 33, 2, 90, 41, 8, 60], [0, 0, 0, 12, 7, 77, 3, 9]], np.int64)
MASK = np.array([[1] * 8, [0, 0, 0, 1, 1, 1, 1, 1]], np.int64)  # row 1 is left-padded


def _hf_logits(model, ids=INPUTS, mask=MASK):
  with torch.no_grad():
    return model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)).logits.numpy()


def _assert_close_on_real_tokens(ours, ref):
  real = MASK.astype(bool)
  np.testing.assert_allclose(np.asarray(ours)[real], ref[real], atol=ATOL, rtol=ATOL)


def test_llama_logits_match_transformers_with_gqa_and_left_padding(hf_dir):
  path, hf_model = hf_dir
  model, params = load_hf_lm(path)
  assert model.num_kv_heads == 2 and model.rope_theta == 500000.0
  logits, _ = model.apply({"params": params}, jnp.asarray(INPUTS, jnp.int32), jnp.asarray(MASK))
  _assert_close_on_real_tokens(logits, _hf_logits(hf_model))


def test_tied_embeddings_and_sharded_checkpoint(tmp_path):
  hf_model = _tiny_llama(str(tmp_path / "tied"), tie=True, kv_heads=4, theta=10000.0)
  # Re-shard the weights into two files with an index, as large hub checkpoints are.
  src = CheckpointReader(str(tmp_path / "tied"))
  tensors = dict(src.items())
  os.remove(tmp_path / "tied" / "model.safetensors")
  write_checkpoint(str(tmp_path / "tied"), tensors, max_shard_bytes=sum(v.nbytes for v in tensors.values()) // 2)
  assert os.path.exists(tmp_path / "tied" / "model.safetensors.index.json")
  model, params = load_hf_lm(str(tmp_path / "tied"))
  assert model.tie_embeddings and "lm_head" not in params
  logits, _ = model.apply({"params": params}, jnp.asarray(INPUTS, jnp.int32), jnp.asarray(MASK))
  _assert_close_on_real_tokens(logits, _hf_logits(hf_model))


def test_round_trip_jax_to_hf_gives_same_logits(hf_dir, tmp_path):
  path, hf_model = hf_dir
  model, params = load_hf_lm(path)
  save_hf_lm(model, params, str(tmp_path / "export"))
  reloaded = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "export")).eval()
  _assert_close_on_real_tokens(_hf_logits(reloaded), _hf_logits(hf_model))


def _copy(path, tmp_path):
  dst = str(tmp_path / "bad")
  shutil.copytree(path, dst)
  return dst


def _rewrite(dst, edit):
  reader = CheckpointReader(dst)
  tensors = dict(reader.items())
  edit(tensors)
  os.remove(os.path.join(dst, "model.safetensors"))
  write_checkpoint(dst, tensors)


def test_missing_key_is_named(hf_dir, tmp_path):
  dst = _copy(hf_dir[0], tmp_path)
  _rewrite(dst, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
  with pytest.raises(KeyError, match=r"missing tensor 'model.layers.1.mlp.up_proj.weight'.*layers_1/mlp/up"):
    load_hf_lm(dst)


def test_unexpected_key_is_named(hf_dir, tmp_path):
  dst = _copy(hf_dir[0], tmp_path)
  _rewrite(dst, lambda t: t.update({"model.layers.2.self_attn.q_proj.weight": np.zeros((32, 32),
                                                                                          np.float32)}))
  with pytest.raises(ValueError, match=r"unexpected tensors.*model.layers.2.self_attn.q_proj.weight"):
    load_hf_lm(dst)


def test_shape_mismatch_is_named(hf_dir, tmp_path):
  dst = _copy(hf_dir[0], tmp_path)
  with open(os.path.join(dst, "config.json")) as f:
    cfg = json.load(f)
  cfg["intermediate_size"] = 64
  with open(os.path.join(dst, "config.json"), "w") as f:
    json.dump(cfg, f)
  with pytest.raises(ValueError, match=r"'model.layers.0.mlp.gate_proj.weight' has shape \(48, 32\).*"
                                       r"expected \(32, 64\)"):
    load_hf_lm(dst)


def test_wrong_family_and_truncated_file(hf_dir, tmp_path):
  dst = _copy(hf_dir[0], tmp_path)
  with open(os.path.join(dst, "config.json")) as f:
    cfg = json.load(f)
  with open(os.path.join(dst, "config.json"), "w") as f:
    json.dump({**cfg, "model_type": "bloom"}, f)
  with pytest.raises(ValueError, match="model_type 'bloom' is not supported"):
    load_hf_lm(dst)
  with open(os.path.join(dst, "config.json"), "w") as f:
    json.dump(cfg, f)
  file = os.path.join(dst, "model.safetensors")
  data = open(file, "rb").read()
  with open(file, "wb") as f:
    f.write(data[: len(data) // 2])
  with pytest.raises(ValueError, match="model.safetensors.*truncated"):
    load_hf_lm(dst)
