"""HF CLIP vision tower -> vlm_jax ViT: hidden-state parity with transformers in both key layouts
(transformers 5.x unprefixed, 4.x / hub `vision_model.`) and from a full CLIPModel."""

import os

import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from vlm_jax.convert import load_hf_clip_vision  # noqa: E402
from vlm_jax.convert.safetensors_io import CheckpointReader, write_checkpoint  # noqa: E402

ATOL = 1e-4
VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
              image_size=32, patch_size=8, hidden_act="quick_gelu", layer_norm_eps=1e-5)


def _perturb(model):
  """HF's CLIP init gives near-identity norms and tiny weights; make every param matter."""
  torch.manual_seed(0)
  with torch.no_grad():
    for name, p in model.named_parameters():
      p.add_(0.2 * torch.randn_like(p))
  return model.eval()


@pytest.fixture(scope="module")
def clip_vision(tmp_path_factory):
  path = str(tmp_path_factory.mktemp("clip_vision"))
  model = _perturb(transformers.CLIPVisionModel(transformers.CLIPVisionConfig(**VISION)))
  model.save_pretrained(path)
  return path, model


PIXELS = np.random.default_rng(0).normal(size=(2, 3, 32, 32)).astype(np.float32)  # NCHW for torch


def _hf_outputs(vision_model):
  with torch.no_grad():
    out = vision_model(pixel_values=torch.tensor(PIXELS), output_hidden_states=True)
  return out.last_hidden_state.numpy(), [h.numpy() for h in out.hidden_states], out.pooler_output.numpy()


def _check(path, hf_vision):
  model, params = load_hf_clip_vision(path)
  last, aux = model.apply({"params": params}, jnp.asarray(PIXELS.transpose(0, 2, 3, 1)))
  ref_last, ref_hidden, ref_pooled = _hf_outputs(hf_vision)
  np.testing.assert_allclose(np.asarray(last), ref_last, atol=ATOL, rtol=ATOL)
  assert len(aux["hidden_states"]) == len(ref_hidden) == 3
  for ours, ref in zip(aux["hidden_states"], ref_hidden):
    np.testing.assert_allclose(np.asarray(ours), ref, atol=ATOL, rtol=ATOL)
  np.testing.assert_allclose(np.asarray(aux["pooled"]), ref_pooled, atol=ATOL, rtol=ATOL)


def test_transformers5_layout_without_prefix(clip_vision):
  path, hf_model = clip_vision
  assert not any(k.startswith("vision_model.") for k in CheckpointReader(path).keys())
  _check(path, hf_model)


def test_transformers4_layout_with_vision_model_prefix(clip_vision, tmp_path):
  path, hf_model = clip_vision
  dst = str(tmp_path / "v4")
  os.makedirs(dst)
  tensors = {f"vision_model.{k}": v for k, v in CheckpointReader(path).items()}
  write_checkpoint(dst, tensors)
  with open(os.path.join(path, "config.json")) as f, open(os.path.join(dst, "config.json"), "w") as g:
    g.write(f.read())
  _check(dst, hf_model)


def test_vision_half_of_clip_model(tmp_path):
  cfg = transformers.CLIPConfig(
    vision_config=VISION,
    text_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                     vocab_size=50),
    projection_dim=8)
  model = _perturb(transformers.CLIPModel(cfg))
  model.save_pretrained(str(tmp_path / "clip"))
  _check(str(tmp_path / "clip"), model.vision_model)


def test_not_a_clip_checkpoint(tmp_path):
  (tmp_path / "config.json").write_text('{"model_type": "llama"}')
  with pytest.raises(ValueError, match="model_type 'llama' is not a CLIP model"):
    load_hf_clip_vision(str(tmp_path))
