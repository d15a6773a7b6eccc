"""OpenFlamingo -> vlm_jax: logit parity with the real `open_flamingo` package (PyTorch, float32, CPU).

Tiny OpenFlamingo models are built inside the test from a random HF LM, a WordLevel tokenizer and a
custom open_clip vision config, with the tanh gates set non-zero (at their init value 0 the visual path
is invisible). Inputs interleave two images with text; one row is left-padded and has a single real
image plus an all-zero padded one.
"""

import json
import os

import numpy as np
import pytest
from flax import linen as nn

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
open_clip = pytest.importorskip("open_clip")
open_flamingo = pytest.importorskip("open_flamingo")

from vlm_jax.convert import load_openflamingo  # noqa: E402
from vlm_jax.convert import clip as clip_conv  # noqa: E402
from vlm_jax.convert import open_clip as open_clip_conv  # noqa: E402
from vlm_jax.convert.loading import abstract_params  # noqa: E402
from vlm_jax.convert.mapping import to_ours, to_theirs  # noqa: E402
from vlm_jax.convert.safetensors_io import write_checkpoint  # noqa: E402
from vlm_jax.data.tokenizer import load_tokenizer  # noqa: E402
from vlm_jax.models import vit  # noqa: E402
from vlm_jax.param_paths import flatten  # noqa: E402

ATOL = 1e-4
WORDS = [f"w{i}" for i in range(60)]
VISION_CFG = {"embed_dim": 16, "quick_gelu": True,
              "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "head_width": 8, "patch_size": 8},
              "text_cfg": {"context_length": 8, "vocab_size": 50, "width": 16, "heads": 2, "layers": 1}}


def _tokenizer(path):
  import tokenizers
  from tokenizers import models, pre_tokenizers
  vocab = {w: i for i, w in enumerate(["<unk>", "<s>", "</s>"] + WORDS)}
  tok = tokenizers.Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
  tok.pre_tokenizer = pre_tokenizers.Whitespace()
  transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>",
                                       eos_token="</s>").save_pretrained(path)


def _lm(path, family):
  torch.manual_seed(0)
  common = dict(vocab_size=63, hidden_size=32, num_hidden_layers=4, num_attention_heads=4,
                initializer_range=0.2)
  if family == "llama":
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
      intermediate_size=48, num_key_value_heads=2, rms_norm_eps=1e-5, **common))
  elif family == "gpt_neox":
    model = transformers.GPTNeoXForCausalLM(transformers.GPTNeoXConfig(
      intermediate_size=64, rotary_pct=0.5, use_parallel_residual=False, **common))
  else:  # MPT: ALiBi, tied wte, no biases (OF-3B / OF-9B)
    model = transformers.MptForCausalLM(transformers.MptConfig(
      d_model=32, n_heads=4, n_layers=4, vocab_size=63, initializer_range=0.2))
  with torch.no_grad():
    for name, p in model.named_parameters():
      if "norm" in name and p.ndim == 1:
        p.add_(0.3 * torch.randn_like(p))
  model.save_pretrained(path)
  _tokenizer(path)


def _openflamingo(root, family, every):
  """-> (OpenFlamingo model with non-zero gates, lm dir, open_clip config json)."""
  cfg_dir = os.path.join(root, "open_clip_cfg")
  os.makedirs(cfg_dir, exist_ok=True)
  cfg_json = os.path.join(cfg_dir, "tiny-vit.json")
  with open(cfg_json, "w") as f:
    json.dump(VISION_CFG, f)
  open_clip.add_model_config(cfg_dir)
  lm_dir = os.path.join(root, f"lm_{family}")
  _lm(lm_dir, family)
  layers = {"llama": "model.layers", "gpt_neox": "gpt_neox.layers", "mpt": "transformer.blocks"}[family]
  torch.manual_seed(1)
  model, _, tok = open_flamingo.create_model_and_transforms(
    "tiny-vit", None, lm_dir, lm_dir, cross_attn_every_n_layers=every,
    decoder_layers_attr_name=layers)
  with torch.no_grad():  # gates at 0 would hide the whole visual path; perturb the new norms too
    for name, p in model.named_parameters():  # (the LM's own weights stay those of its directory)
      if name.endswith(("attn_gate", "ff_gate")):
        p.fill_(float(torch.empty(()).uniform_(0.4, 0.9)))
      elif name.startswith("perceiver.") or "gated_cross_attn" in name:
        if "norm" in name or ".ff.0." in name or ".1.0." in name:
          p.add_(0.2 * torch.randn_like(p))
  model.eval()
  assert tok.encode("<image>")[-1] == 64 and tok.encode("<|endofchunk|>")[-1] == 63
  return model, lm_dir, cfg_json


IMG, EOC, PAD = 64, 63, 65
# Row 0: two images interleaved with text. Row 1: left-padded, one real image (its second is zeros).
LANG = np.array([[3, IMG, 10, 11, 12, EOC, IMG, 20, 21, 22, EOC, 5],
                 [PAD, PAD, PAD, PAD, 7, 8, IMG, 30, 31, 32, 33, EOC]], np.int64)
MASK = (LANG != PAD).astype(np.int64)


def _images():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(2, 2, 32, 32, 3)).astype(np.float32)
  x[1, 1] = 0.0
  return x


def _of_logits(model, images):
  vision_x = torch.tensor(images).permute(0, 1, 4, 2, 3).unsqueeze(2)  # [B, T, 1, C, H, W]
  with torch.no_grad():
    return model(vision_x=vision_x, lang_x=torch.tensor(LANG),
                 attention_mask=torch.tensor(MASK)).logits.numpy()


def _ours(model, params, images):
  logits, _ = model.apply({"params": params}, images, LANG.astype(np.int32), MASK.astype(np.int32))
  return np.asarray(logits)


def _assert_close(ours, ref):
  real = MASK.astype(bool)
  np.testing.assert_allclose(ours[real], ref[real], atol=ATOL, rtol=ATOL)


@pytest.fixture(scope="module")
def llama_of(tmp_path_factory):
  root = str(tmp_path_factory.mktemp("of_llama"))
  model, lm_dir, cfg_json = _openflamingo(root, "llama", every=2)
  full = os.path.join(root, "full.pt")
  torch.save(model.state_dict(), full)
  return model, root, lm_dir, cfg_json, full


@pytest.mark.parametrize("vision_tokens", ["post_ln_post", "pre_ln_post"])
def test_full_state_dict_matches_open_flamingo(llama_of, vision_tokens):
  """A full state dict (.pt) with vision_encoder.* and lang_encoder.*; the LM dir gives only config and
  tokenizer. open_clip 3.x returns post-ln_post tokens; for pre_ln_post the reference runs with ln_post
  replaced by the identity, which is what open_clip <= 2.22 fed the resampler."""
  model, _, lm_dir, cfg_json, full = llama_of
  ours, params = load_openflamingo(full, lm=lm_dir, vision=cfg_json, cross_attn_every_n_layers=2,
                                   vision_tokens=vision_tokens)
  assert ours.media_token_id == IMG and sorted(k for k in params if k.startswith("xattn")) == [
    "xattn_1", "xattn_3"]
  # The data pipeline's tokenizer spec gives the same ids OpenFlamingo's tokenizer has.
  tok = load_tokenizer("openflamingo:" + lm_dir)
  assert tok.get_vocab_size() == 66 and [tok.token_to_id(t) for t in ("<|endofchunk|>", "<image>",
                                                                      "<PAD>")] == [EOC, IMG, PAD]
  images = _images()
  if vision_tokens == "pre_ln_post":
    ln_post = model.vision_encoder.ln_post
    model.vision_encoder.ln_post = torch.nn.Identity()
    try:
      ref = _of_logits(model, images)
    finally:
      model.vision_encoder.ln_post = ln_post
  else:
    ref = _of_logits(model, images)
  _assert_close(_ours(ours, params, images), ref)
  # The images matter: a different second image changes row 0 after it, and nothing before it.
  other = images.copy()
  other[0, 1] += 1.0
  changed = np.abs(_ours(ours, params, other) - _ours(ours, params, images)).max(-1)
  assert changed[0, :6].max() == 0.0 and changed[0, 6:].min() > 1e-4


def test_safetensors_and_training_wrapper(llama_of, tmp_path):
  """The same weights as `.safetensors` and as `checkpoint_N.pt` ({"model_state_dict": ...}, DDP
  `module.` prefixes) load to identical params."""
  model, _, lm_dir, cfg_json, full = llama_of
  sd = model.state_dict()
  st = str(tmp_path / "full.safetensors")
  write_checkpoint(str(tmp_path / "st"), {k: v.numpy() for k, v in sd.items()})
  os.rename(str(tmp_path / "st" / "model.safetensors"), st)
  wrapped = str(tmp_path / "checkpoint_3.pt")
  torch.save({"epoch": 3, "model_state_dict": {f"module.{k}": v for k, v in sd.items()},
              "optimizer_state_dict": {"state": {}, "param_groups": []}}, wrapped)
  _, ref = load_openflamingo(full, lm=lm_dir, vision=cfg_json, cross_attn_every_n_layers=2)
  for path in (st, wrapped):
    _, got = load_openflamingo(path, lm=lm_dir, vision=cfg_json, cross_attn_every_n_layers=2)
    for a, b in zip(jax_leaves(ref), jax_leaves(got)):
      np.testing.assert_array_equal(a, b)


def jax_leaves(tree):
  import jax
  return [np.asarray(x) for x in jax.tree_util.tree_leaves(tree)]


def _trainable_checkpoint(model, path):
  """What OpenFlamingo releases as `checkpoint.pt`: trainable params plus every name containing
  "embed", no vision encoder, no module aliases (train_utils.filter_state_dict_to_trainable). The
  releases were saved with transformers 4.x, where GPT-NeoX's output head was `embed_out` in memory too
  (5.x calls it `lm_head`), so it is kept by the "embed" rule."""
  trainable = {n for n, p in model.named_parameters() if p.requires_grad}
  state = {k.replace("lang_encoder.lm_head.", "lang_encoder.embed_out.")
           if "gptneox" in type(model.lang_encoder).__name__.lower() else k: v
           for k, v in model.state_dict().items()}
  trainable = {k.replace("lang_encoder.lm_head.", "lang_encoder.embed_out.") for k in trainable}
  sd = {k: v for k, v in state.items()
        if (k in trainable or "embed" in k) and not k.startswith("vision_encoder.")
        and not k.startswith(("lang_encoder.old_decoder_blocks.", "lang_encoder.gated_cross_attn_layers."))}
  torch.save(sd, path)
  return sd


def _released(tmp_path_factory, family):
  root = str(tmp_path_factory.mktemp(f"of_{family}"))
  model, lm_dir, cfg_json = _openflamingo(root, family, every=2)
  ckpt = os.path.join(root, "checkpoint.pt")
  sd = _trainable_checkpoint(model, ckpt)
  assert not any(k.startswith("vision_encoder.") for k in sd)
  visual = {k[len("vision_encoder."):]: v for k, v in model.state_dict().items()
            if k.startswith("vision_encoder.")}
  clip_weights = os.path.join(root, "open_clip_visual.pt")
  torch.save({f"visual.{k}": v for k, v in visual.items()}, clip_weights)
  return model, root, lm_dir, cfg_json, ckpt, clip_weights, visual


@pytest.fixture(scope="module")
def neox_of(tmp_path_factory):
  """OF-4B style: GPT-NeoX LM, the released trainable checkpoint.pt (no vision, no frozen LM layers)."""
  return _released(tmp_path_factory, "gpt_neox")


@pytest.fixture(scope="module")
def mpt_of(tmp_path_factory):
  """OF-3B / OF-9B style: MPT LM whose tied `wte` (resized, trained rows) is in checkpoint.pt."""
  return _released(tmp_path_factory, "mpt")


@pytest.mark.parametrize("family", ["gpt_neox", "mpt"])
def test_released_checkpoint_with_open_clip_weights(family, request):
  fixture = {"gpt_neox": "neox_of", "mpt": "mpt_of"}[family]
  model, _, lm_dir, cfg_json, ckpt, clip_weights, _ = request.getfixturevalue(fixture)
  ours, params = load_openflamingo(ckpt, lm=lm_dir, vision=cfg_json, vision_weights=clip_weights,
                                   cross_attn_every_n_layers=2, vision_tokens="post_ln_post")
  assert ours.lm_family == family and ours.lm["vocab_size"] == 66  # resized: 63 + 3 new tokens
  images = _images()
  _assert_close(_ours(ours, params, images), _of_logits(model, images))


def test_released_checkpoint_with_hf_clip_directory(neox_of, tmp_path):
  """The vision tower as an HF CLIP directory (how ViT-L/14 weights usually arrive): the open_clip
  weights are rewritten into HF's layout with our own tables, loaded back, and give OF's logits."""
  model, _, lm_dir, _, ckpt, _, visual = neox_of
  kw = open_clip_conv.model_kwargs(VISION_CFG)
  shapes = {k: tuple(v.shape) for k, v in flatten(nn.unbox(abstract_params(
    vit.Model(**kw), np.zeros((1, 32, 32, 3), np.float32)))).items()}
  ours_flat = to_ours({k: v.numpy() for k, v in visual.items()}, open_clip_conv.rules(kw), shapes,
                      source_name="visual", ignore=open_clip_conv.ignore_for(""))
  hf_dir = str(tmp_path / "clip")
  write_checkpoint(hf_dir, to_theirs(ours_flat, clip_conv.rules(kw, "vision_model.")))
  v = VISION_CFG["vision_cfg"]
  with open(os.path.join(hf_dir, "config.json"), "w") as f:
    json.dump({"model_type": "clip_vision_model", "hidden_size": v["width"], "num_hidden_layers": v["layers"],
               "num_attention_heads": v["width"] // v["head_width"], "intermediate_size": 4 * v["width"],
               "image_size": v["image_size"], "patch_size": v["patch_size"], "hidden_act": "quick_gelu",
               "layer_norm_eps": 1e-5}, f)
  ours, params = load_openflamingo(ckpt, lm=lm_dir, vision=hf_dir, cross_attn_every_n_layers=2,
                                   vision_tokens="post_ln_post")
  images = _images()
  _assert_close(_ours(ours, params, images), _of_logits(model, images))


def test_bad_inputs_name_the_problem(llama_of, neox_of, tmp_path):
  _, _, lm_dir, cfg_json, full = llama_of
  # Wrong cross_attn_every_n_layers: xattn blocks exist before layers 1 and 3 only.
  with pytest.raises(KeyError, match=r"layers\.0\.gated_cross_attn_layer"):
    load_openflamingo(full, lm=lm_dir, vision=cfg_json, cross_attn_every_n_layers=1)
  with pytest.raises(ValueError, match=r"unexpected tensors.*layers\.1\.gated_cross_attn_layer"):
    load_openflamingo(full, lm=lm_dir, vision=cfg_json, cross_attn_every_n_layers=4)
  # The checkpoint of another LM family.
  _, _, neox_lm, _, neox_ckpt, _, _ = neox_of
  with pytest.raises(ValueError, match="gpt_neox"):
    load_openflamingo(neox_ckpt, lm=lm_dir, vision=cfg_json, cross_attn_every_n_layers=2)
  # A trainable-only checkpoint for an untied LLaMA lacks the resized lm_head: the shape error names it.
  model = llama_of[0]
  trainable = str(tmp_path / "checkpoint.pt")
  _trainable_checkpoint(model, trainable)
  with pytest.raises(ValueError, match="lm_head.weight"):
    load_openflamingo(trainable, lm=lm_dir, vision=cfg_json, cross_attn_every_n_layers=2,
                      vision_weights=neox_of[5])
  # An open_clip JSON with no weights anywhere.
  with pytest.raises(ValueError, match="vision_weights"):
    load_openflamingo(neox_ckpt, lm=neox_lm, vision=cfg_json, cross_attn_every_n_layers=2)
  # A pickle that is not weights-only.
  evil = str(tmp_path / "evil.pt")
  torch.save({"model_state_dict": {"x": torch.zeros(1)}, "cfg": _Opaque()}, evil)
  with pytest.raises(ValueError, match="weights_only"):
    load_openflamingo(evil, lm=lm_dir, vision=cfg_json, cross_attn_every_n_layers=2)


class _Opaque:
  pass
