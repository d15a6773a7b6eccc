"""LLaVA-1.5 <-> vlm_jax: logit parity with transformers' `LlavaForConditionalGeneration`
(float32, CPU) in every on-disk layout (what transformers 5.23 saves, the 4.x `vision_model.`
variant, the >= 4.52 in-memory names, the original liuhaotian layout with the vision tower embedded
or in a separate CLIP directory), the export back to transformers, and strict errors."""

import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from vlm_jax.convert import load_hf_llava, save_hf_llava  # noqa: E402
from vlm_jax.convert.safetensors_io import CheckpointReader, write_checkpoint  # noqa: E402

ATOL = 1e-4  # float32 on CPU; eager vs SDPA attention alone differ by ~1e-5
IMAGE = 99  # image_token_index, inside the 100-token vocabulary
P = 16  # (32 / 8)^2 patches per image, CLS dropped ("default")
VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
              image_size=32, patch_size=8, hidden_act="quick_gelu", layer_norm_eps=1e-5)
TEXT = dict(vocab_size=100, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5, rope_theta=10000.0,
            initializer_range=0.2)  # default 0.02 gives near-uniform attention that hides mask bugs

# Row 0: BOS, text, one image (16 tokens), text. Row 1: left-padded by 3, same shape.
IDS = np.array([[1, 5, 7] + [IMAGE] * P + [11, 12, 13, 14, 15],
                [0, 0, 0, 1] + [IMAGE] * P + [21, 22, 23, 24]], np.int64)
MASK = np.array([[1] * 24, [0, 0, 0] + [1] * 21], np.int64)
PIXELS = np.random.default_rng(0).normal(size=(2, 3, 32, 32)).astype(np.float32)  # NCHW for torch


@pytest.fixture(scope="module")
def hf_llava(tmp_path_factory):
  """A tiny random LLaVA saved by transformers, its reference logits, and the torch model."""
  torch.manual_seed(0)
  cfg = transformers.LlavaConfig(
    vision_config=transformers.CLIPVisionConfig(**VISION),
    text_config=transformers.LlamaConfig(**TEXT),
    image_token_index=IMAGE, vision_feature_layer=-2, vision_feature_select_strategy="default",
    projector_hidden_act="gelu")
  model = transformers.LlavaForConditionalGeneration(cfg).eval()
  with torch.no_grad():  # every param matters: norms away from 1, biases away from 0
    for name, p in model.named_parameters():
      p.add_(0.2 * torch.randn_like(p))
  path = str(tmp_path_factory.mktemp("llava"))
  model.save_pretrained(path)
  return path, model, _hf_logits(model)


def _hf_logits(model, ids=IDS, pixels=PIXELS):
  with torch.no_grad():
    return model(input_ids=torch.tensor(ids), pixel_values=torch.tensor(pixels),
                 attention_mask=torch.tensor(MASK)).logits.numpy()


def _ours(model, params, ids=IDS, pixels=PIXELS, apply=None):
  apply = apply or model.apply
  logits, aux = apply({"params": params}, jnp.asarray(pixels.transpose(0, 2, 3, 1)),
                      jnp.asarray(ids, jnp.int32), jnp.asarray(MASK))
  return np.asarray(logits), aux


def _assert_close_on_real_tokens(ours, ref):
  real = MASK.astype(bool)
  np.testing.assert_allclose(np.asarray(ours)[real], ref[real], atol=ATOL, rtol=ATOL)


def _write(dst, tensors, config):
  os.makedirs(dst, exist_ok=True)
  write_checkpoint(dst, tensors)
  with open(os.path.join(dst, "config.json"), "w") as f:
    json.dump(config, f)


def _config(path):
  with open(os.path.join(path, "config.json")) as f:
    return json.load(f)


def _renamed(tensors, renames):
  """Rename keys by their first matching (old prefix, new prefix)."""
  out = {}
  for k, v in tensors.items():
    new = next((n + k[len(o):] for o, n in renames if k.startswith(o)), k)
    out[new] = v
  return out


def test_transformers_5_save_layout_logits_match(hf_llava):
  path, _, ref = hf_llava
  keys = set(CheckpointReader(path).keys())
  # What transformers 5.23 writes: the llava-hf names, vision tower without `vision_model.`.
  assert {"language_model.model.embed_tokens.weight", "language_model.lm_head.weight",
          "multi_modal_projector.linear_1.weight", "vision_tower.embeddings.patch_embedding.weight",
          "vision_tower.encoder.layers.2.mlp.fc2.bias",
          "vision_tower.post_layernorm.weight"} <= keys
  assert not any(k.startswith(("model.", "vision_tower.vision_model.")) for k in keys)
  model, params = load_hf_llava(path)
  assert model.image_token_id == IMAGE and model.vision_feature_layer == -2
  assert model.num_image_tokens == P
  assert set(params) == {"vision", "projector", "lm"}
  logits, aux = _ours(model, params)
  assert aux["image_features"].shape == (2, P, 32)
  _assert_close_on_real_tokens(logits, ref)
  jitted, _ = _ours(model, params, apply=jax.jit(model.apply))
  _assert_close_on_real_tokens(jitted, ref)


def test_transformers_4_vision_model_prefix(hf_llava, tmp_path):
  path, _, ref = hf_llava
  tensors = _renamed(dict(CheckpointReader(path).items()),
                     [("vision_tower.", "vision_tower.vision_model.")])
  _write(str(tmp_path / "v4"), tensors, _config(path))
  _assert_close_on_real_tokens(_ours(*load_hf_llava(str(tmp_path / "v4")))[0], ref)


def test_in_memory_names_of_transformers_4_52_and_later(hf_llava, tmp_path):
  path, hf_model, ref = hf_llava
  state = {k: v.numpy() for k, v in hf_model.state_dict().items()}
  assert "model.language_model.embed_tokens.weight" in state and "lm_head.weight" in state
  _write(str(tmp_path / "mem"), state, _config(path))
  _assert_close_on_real_tokens(_ours(*load_hf_llava(str(tmp_path / "mem")))[0], ref)


def _liuhaotian(path, dst, *, embed_vision):
  """Rewrite a llava-hf save as haotian-liu/LLaVA's `LlavaLlamaForCausalLM` + a CLIP directory."""
  cfg = _config(path)
  tensors = dict(CheckpointReader(path).items())
  vision = {k[len("vision_tower."):]: v for k, v in tensors.items()
            if k.startswith("vision_tower.")}
  renames = [("language_model.model.", "model."), ("language_model.lm_head.", "lm_head."),
             ("multi_modal_projector.linear_1.", "model.mm_projector.0."),
             ("multi_modal_projector.linear_2.", "model.mm_projector.2."),
             ("vision_tower.", "model.vision_tower.vision_tower.vision_model.")]
  main = _renamed({k: v for k, v in tensors.items()
                   if embed_vision or not k.startswith("vision_tower.")}, renames)
  config = {**cfg["text_config"], "architectures": ["LlavaLlamaForCausalLM"], "model_type": "llava",
            "mm_projector_type": "mlp2x_gelu", "mm_vision_select_layer": -2,
            "mm_vision_select_feature": "patch", "mm_hidden_size": VISION["hidden_size"],
            "mm_vision_tower": "openai/clip-vit-large-patch14-336", "mm_patch_merge_type": "flat",
            "image_aspect_ratio": "pad", "mm_use_im_start_end": False}
  _write(os.path.join(dst, "llava"), main, config)
  clip_dir = os.path.join(dst, "clip")
  if embed_vision:  # the CLIP directory only describes the tower
    os.makedirs(clip_dir)
    with open(os.path.join(clip_dir, "config.json"), "w") as f:
      json.dump(cfg["vision_config"], f)
  else:
    _write(clip_dir, vision, cfg["vision_config"])
  return os.path.join(dst, "llava"), clip_dir


@pytest.mark.parametrize("embed_vision", [False, True], ids=["separate_clip", "embedded_clip"])
def test_original_liuhaotian_layout(hf_llava, tmp_path, embed_vision):
  path, _, ref = hf_llava
  llava_dir, clip_dir = _liuhaotian(path, str(tmp_path), embed_vision=embed_vision)
  model, params = load_hf_llava(llava_dir, vision=clip_dir)
  assert model.image_token_id == -200  # the original IMAGE_TOKEN_INDEX, outside the vocabulary
  ids = np.where(IDS == IMAGE, -200, IDS)
  _assert_close_on_real_tokens(_ours(model, params, ids)[0], ref)


def test_round_trip_to_transformers(hf_llava, tmp_path):
  path, _, ref = hf_llava
  model, params = load_hf_llava(path)
  out = str(tmp_path / "export")
  save_hf_llava(model, params, out)
  reloaded, info = transformers.LlavaForConditionalGeneration.from_pretrained(
    out, output_loading_info=True)
  assert not any(info.values()), info  # nothing missing, unexpected or mismatched
  _assert_close_on_real_tokens(_hf_logits(reloaded.eval()), ref)
  model2, params2 = load_hf_llava(out)
  assert model2 == model
  jax.tree_util.tree_map(np.testing.assert_array_equal, params2, params)


def test_full_select_strategy_keeps_cls(hf_llava, tmp_path):
  path, _, _ = hf_llava
  dst = str(tmp_path / "full")
  shutil.copytree(path, dst)
  cfg = _config(dst)
  with open(os.path.join(dst, "config.json"), "w") as f:
    json.dump({**cfg, "vision_feature_select_strategy": "full"}, f)
  ids = np.array([[1, 5, 7] + [IMAGE] * (P + 1) + [11, 12, 13, 14],
                  [0, 0, 0, 1] + [IMAGE] * (P + 1) + [21, 22, 23]], np.int64)
  hf_model = transformers.LlavaForConditionalGeneration.from_pretrained(dst).eval()
  model, params = load_hf_llava(dst)
  assert model.num_image_tokens == P + 1
  _assert_close_on_real_tokens(_ours(model, params, ids)[0], _hf_logits(hf_model, ids))


def test_image_token_count_mismatch_names_both_counts(hf_llava):
  model, params = load_hf_llava(hf_llava[0])
  ids = IDS.copy()
  ids[0, 3] = 5  # row 0 now has 15 image tokens
  with pytest.raises(ValueError,
                     match=r"31 image tokens \(id 99\) but 2 image\(s\) give 32 features"):
    _ours(model, params, ids)


def _edited(path, tmp_path, edit, config_edit=None):
  dst = str(tmp_path / "bad")
  tensors = dict(CheckpointReader(path).items())
  edit(tensors)
  cfg = _config(path)
  _write(dst, tensors, config_edit(cfg) if config_edit else cfg)
  return dst


def test_unexpected_key_is_named(hf_llava, tmp_path):
  dst = _edited(hf_llava[0], tmp_path, lambda t: t.update(
    {"multi_modal_projector.linear_3.weight": np.zeros((32, 32), np.float32)}))
  with pytest.raises(ValueError,
                     match=r"unexpected tensors.*multi_modal_projector.linear_3.weight"):
    load_hf_llava(dst)


def test_missing_key_is_named(hf_llava, tmp_path):
  dst = _edited(hf_llava[0], tmp_path,
                lambda t: t.pop("vision_tower.encoder.layers.1.self_attn.k_proj.bias"))
  with pytest.raises(KeyError, match=r"missing tensor 'vision_tower.encoder.layers.1.self_attn."
                                     r"k_proj.bias'.*vision/layers_1/attn/k/bias"):
    load_hf_llava(dst)


def test_shape_mismatch_is_named(hf_llava, tmp_path):
  def grow(cfg):
    return {**cfg, "text_config": {**cfg["text_config"], "intermediate_size": 64}}
  dst = _edited(hf_llava[0], tmp_path, lambda t: None, grow)
  with pytest.raises(ValueError, match=r"'language_model.model.layers.0.mlp.gate_proj.weight' has "
                                       r"shape \(48, 32\).*expected \(32, 64\)"):
    load_hf_llava(dst)


def test_unsupported_projector_and_missing_vision_dir(hf_llava, tmp_path):
  llava_dir, clip_dir = _liuhaotian(hf_llava[0], str(tmp_path), embed_vision=False)
  with pytest.raises(ValueError, match=r"mm_vision_tower='openai/clip-vit-large-patch14-336'.*"
                                       r"pass vision="):
    load_hf_llava(llava_dir)
  cfg = _config(llava_dir)
  with open(os.path.join(llava_dir, "config.json"), "w") as f:
    json.dump({**cfg, "mm_projector_type": "linear"}, f)
  with pytest.raises(NotImplementedError, match="mm_projector_type 'linear' is not supported"):
    load_hf_llava(llava_dir, vision=clip_dir)


def test_flexattn_checkpoint_with_hd_projections(hf_llava, tmp_path):
  """senfu/llava-v1.5-7b-flexattn's layout: the liuhaotian LLaVA plus
  `model.layers.{i}.self_attn.{k,v}_proj_hd.weight` and config.extra (strings). It loads as
  llava_flex; k/v_hd hold those tensors; with nothing selected its logits on a 3x image are
  transformers' LLaVA logits on torch's antialiased downsampling of it."""
  path, model_hf, _ = hf_llava
  llava_dir, clip_dir = _liuhaotian(path, str(tmp_path), embed_vision=True)
  tensors = dict(CheckpointReader(llava_dir).items())
  rng = np.random.default_rng(7)
  for i in range(TEXT["num_hidden_layers"]):
    for p in ("k", "v"):
      w = tensors[f"model.layers.{i}.self_attn.{p}_proj.weight"]
      tensors[f"model.layers.{i}.self_attn.{p}_proj_hd.weight"] = (
        w + rng.normal(0, 0.1, w.shape)).astype(w.dtype)
  cfg = _config(llava_dir)
  cfg["extra"] = {"zoom_ratio": "3", "lowres_size": "32", "highres_size": "96", "threshold": "255",
                  "warmup": "10", "flex_start": "1", "flex_blocks": "3"}
  flex_dir = str(tmp_path / "flex")
  _write(flex_dir, tensors, cfg)
  model, params = load_hf_llava(flex_dir, vision=clip_dir)
  assert type(model).__module__ == "vlm_jax.models.llava_flex" and model.zoom == 3
  assert model.lm["flex_start"] == 1 and model.lm["flex_threshold"] == 255.0
  assert model.lm["hr_grid"] == 12 and model.lm["num_image_tokens"] == P
  k_hd = np.asarray(params["lm"]["layers_1"]["attn"]["k_hd"]["kernel"])  # [E, KV, Dh]
  np.testing.assert_array_equal(
    k_hd.reshape(k_hd.shape[0], -1).T, tensors["model.layers.1.self_attn.k_proj_hd.weight"])
  big = np.random.default_rng(1).normal(size=(2, 3, 96, 96)).astype(np.float32)
  small = torch.nn.functional.interpolate(torch.tensor(big), size=32, mode="bilinear",
                                          align_corners=False, antialias=True).numpy()
  ids = np.where(IDS == IMAGE, -200, IDS)
  logits, _ = model.apply({"params": params}, jnp.asarray(big.transpose(0, 2, 3, 1)),
                          jnp.asarray(ids, jnp.int32), jnp.asarray(MASK))
  _assert_close_on_real_tokens(logits, _hf_logits(model_hf, pixels=small))
  with pytest.raises(ValueError, match="highres_size"):
    cfg["extra"]["highres_size"] = "64"
    _write(str(tmp_path / "bad"), tensors, cfg)
    load_hf_llava(str(tmp_path / "bad"), vision=clip_dir)
