"""INF-LLaVA <-> vlm_jax: a tiny random checkpoint written in the authors' key layout
(liuhaotian LLaVA + `model.spatial_embed.*`, LLaMA-3-style config) converts, and its logits equal a
PyTorch reference of the authors' `encode_images` + `SpatialEmbed` (written here from
reference/flex_inf.md §2.2-2.4, 19 CLIP forwards in a Python loop, transformers' CLIPVisionModel and
LlamaForCausalLM); the DEM output and the projected features match too, on 3n px images and on an
off-size image the authors' F.interpolate upsamples. Also the separate-CLIP directory, the CLI, and
strict errors."""

import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
F = torch.nn.functional

from vlm_jax import converted  # noqa: E402
from vlm_jax.convert import load_hf_llava, load_inf_llava  # noqa: E402
from vlm_jax.convert.__main__ import main  # noqa: E402
from vlm_jax.convert.safetensors_io import write_checkpoint  # noqa: E402
from vlm_jax.models import build_model, inf_llava  # noqa: E402

ATOL = 1e-4
N, S, P, D = 3, 16, 16, 32  # crops, tower px, tokens per view (4 x 4), DEM width
VISION = dict(hidden_size=D, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
              image_size=S, patch_size=4, hidden_act="quick_gelu", layer_norm_eps=1e-5)
TEXT = dict(vocab_size=100, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5, rope_theta=500000.0,
            hidden_act="silu", tie_word_embeddings=False, initializer_range=0.2)
IMG = -200  # IMAGE_TOKEN_INDEX
IDS = np.array([[1, 5, 7] + [IMG] * P + [11, 12, 13, 14, 15],
                [0, 0, 0, 1] + [IMG] * P + [21, 22, 23, 24]], np.int64)
MASK = np.array([[1] * 24, [0, 0, 0] + [1] * 21], np.int64)
PIXELS = np.random.default_rng(0).normal(size=(2, 3, N * S, N * S)).astype(np.float32)  # NCHW


# ---------------------------------------------------------------- the authors' code, in torch


def crop_pixels_n(x, n):
  """[b, c, nH, nW] -> n*n contiguous blocks, row-major."""
  h, w = x.shape[2] // n, x.shape[3] // n
  return [x[:, :, i * h:(i + 1) * h, j * w:(j + 1) * w] for i in range(n) for j in range(n)]


def extract_pixels_n(x, n):
  return [x[:, :, p::n, q::n] for p in range(n) for q in range(n)]


def combine_crop_features_n(maps, n):
  return torch.cat([torch.cat(maps[i * n:(i + 1) * n], dim=3) for i in range(n)], dim=2)


def combine_stride_features_n(maps, n):
  b, c, h, w = maps[0].shape
  out = maps[0].new_zeros(b, c, h * n, w * n)
  for p in range(n):
    for q in range(n):
      out[:, :, p::n, q::n] = maps[p * n + q]
  return out


class MultiHeadedAttention(torch.nn.Module):
  """x = LN(W_o softmax(Q K^T / sqrt(d_k)) V + query): post-LN, residual = the raw query."""

  def __init__(self, h, d):
    super().__init__()
    self.h, self.d_k = h, d // h
    self.linears = torch.nn.ModuleList([torch.nn.Linear(d, d) for _ in range(4)])
    self.ln = torch.nn.LayerNorm(d)

  def forward(self, query, key, value):
    b = query.shape[0]
    q, k, v = [lin(x).view(b, -1, self.h, self.d_k).transpose(1, 2)
               for lin, x in zip(self.linears, (query, key, value))]
    att = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(self.d_k), dim=-1)
    x = (att @ v).transpose(1, 2).contiguous().view(b, -1, self.h * self.d_k)
    return self.ln(self.linears[3](x) + query)


class SpatialEmbed(torch.nn.Module):
  def __init__(self, spatial, channel, heads=8, div=16):
    super().__init__()
    self.spatial = spatial
    self.attention = MultiHeadedAttention(heads, channel)
    ffn = lambda: torch.nn.Sequential(torch.nn.Linear(channel, channel // div), torch.nn.GELU(),  # noqa: E731
                                      torch.nn.Linear(channel // div, channel // 2))
    self.ffn_crop, self.ffn_stride = ffn(), ffn()
    self.ln_fuse = torch.nn.LayerNorm(channel)

  def forward(self, crop_feats, stride_feats, n):
    b, _, c = crop_feats[0].shape
    s = self.spatial

    def grid(f):  # [b, s*s, c] -> [b, c, s, s]
      return f.view(b, s, s, c).permute(0, 3, 1, 2)

    def seq(m):  # [b, c, h, w] -> [b, h*w, c]
      return m.flatten(2).transpose(1, 2)
    loc = combine_crop_features_n([grid(f) for f in crop_feats], n)
    glo = combine_stride_features_n([grid(f) for f in stride_feats], n)
    # "Global as Query": contiguous windows of both maps.
    enh = [self.attention(seq(g), seq(lo), seq(lo))
           for g, lo in zip(crop_pixels_n(glo, n), crop_pixels_n(loc, n))]
    scale_stride = seq(combine_crop_features_n([grid(e) for e in enh], n))
    # "Local as Query": strided windows of both maps.
    enh = [self.attention(seq(lo), seq(g), seq(g))
           for lo, g in zip(extract_pixels_n(loc, n), extract_pixels_n(glo, n))]
    scale_crop = seq(combine_stride_features_n([grid(e) for e in enh], n))
    fused = self.ln_fuse(torch.cat([self.ffn_crop(scale_crop), self.ffn_stride(scale_stride)], -1)
                         + scale_stride + scale_crop)
    fmap = fused.transpose(1, 2).reshape(b, c, n * s, n * s)
    return seq(F.interpolate(fmap.float(), size=(s, s), mode="bilinear", align_corners=False))


class Reference(torch.nn.Module):
  """The authors' LlavaLlamaForCausalLM forward with INF-LLaVA's encode_images."""

  def __init__(self):
    super().__init__()
    self.clip = transformers.CLIPVisionModel(transformers.CLIPVisionConfig(**VISION))
    self.lm = transformers.LlamaForCausalLM(transformers.LlamaConfig(**TEXT))
    self.spatial_embed = SpatialEmbed(S // 4, D, heads=8, div=4)
    self.mm_projector = torch.nn.Sequential(torch.nn.Linear(D, 32), torch.nn.GELU(),
                                            torch.nn.Linear(32, 32))

  def encode_images(self, images):
    images = F.interpolate(images, size=(N * S, N * S), mode="bicubic", align_corners=False)
    views = (crop_pixels_n(images, N) + extract_pixels_n(images, N)
             + [F.interpolate(images, size=(S, S), mode="bicubic", align_corners=False)])
    feats = [self.clip(v, output_hidden_states=True).hidden_states[-2][:, 1:] for v in views]
    dem = self.spatial_embed(feats[:N * N], feats[N * N:2 * N * N], N)
    return self.mm_projector(torch.stack([feats[-1], dem]).mean(0)), dem

  def forward(self, ids, mask, images):
    feats, dem = self.encode_images(images)
    ids = torch.tensor(ids)
    is_image = ids == IMG
    embeds = self.lm.model.embed_tokens(torch.where(is_image, 0, ids))
    embeds[is_image] = feats.reshape(-1, feats.shape[-1])
    logits = self.lm(inputs_embeds=embeds, attention_mask=torch.tensor(mask)).logits
    return logits.numpy(), feats.numpy(), dem.numpy()


def _write(dst, tensors, config):
  os.makedirs(dst, exist_ok=True)
  write_checkpoint(dst, {k: v.detach().numpy().copy() for k, v in tensors.items()})
  with open(os.path.join(dst, "config.json"), "w") as f:
    json.dump(config, f)


def _config():
  return {**TEXT, "architectures": ["LlavaLlamaForCausalLM"], "model_type": "llava_llama",
          "mm_projector_type": "mlp2x_gelu", "mm_vision_select_layer": -2,
          "mm_vision_select_feature": "patch", "mm_hidden_size": D,
          "mm_vision_tower": "openai/clip-vit-large-patch14-336", "mm_patch_merge_type": "flat",
          "image_aspect_ratio": "pad", "mm_use_im_start_end": False}


def _tensors(ref, embed_vision=True):
  out = {k: v for k, v in ref.lm.state_dict().items()}  # model.* and lm_head.weight already
  out.update({f"model.mm_projector.{k}": v for k, v in ref.mm_projector.state_dict().items()})
  out.update({f"model.spatial_embed.{k}": v for k, v in ref.spatial_embed.state_dict().items()})
  if embed_vision:
    out.update({f"model.vision_tower.vision_tower.{k}": v
                for k, v in ref.clip.state_dict().items()})
  return out


@pytest.fixture(scope="module")
def inf(tmp_path_factory):
  """The torch reference, its outputs on PIXELS, and the checkpoint it was written to."""
  torch.manual_seed(0)
  ref = Reference().eval()
  with torch.no_grad():  # every param matters: norms away from 1, biases away from 0
    for p in ref.parameters():
      p.add_(0.2 * torch.randn_like(p))
  root = tmp_path_factory.mktemp("inf")
  path, clip_dir = str(root / "inf"), str(root / "clip")
  _write(path, _tensors(ref), _config())
  os.makedirs(clip_dir)  # the CLIP directory only describes the tower
  with open(os.path.join(clip_dir, "config.json"), "w") as f:
    json.dump(ref.clip.config.to_dict(), f)
  with torch.no_grad():
    out = ref(IDS, MASK, torch.tensor(PIXELS))
  model, params = load_inf_llava(path, vision=clip_dir)
  return dict(ref=ref, out=out, path=path, clip=clip_dir, model=model, params=params,
              apply=jax.jit(model.apply), root=root)


def _real(x):
  return np.asarray(x)[MASK.astype(bool)]


def test_converted_logits_equal_the_authors_pytorch_reference(inf):
  model, params = inf["model"], inf["params"]
  assert isinstance(model, inf_llava.Model) and model.num_crops == 3
  assert model.dem == {"num_heads": 8, "bottleneck_div": 4} and model.image_token_id == IMG
  assert model.lm["rope_theta"] == 500000.0 and model.lm["num_kv_heads"] == 2
  assert set(params) == {"vision", "projector", "lm", "spatial_embed"}
  logits, aux = inf["apply"]({"params": params}, jnp.asarray(PIXELS.transpose(0, 2, 3, 1)),
                             jnp.asarray(IDS, jnp.int32), jnp.asarray(MASK))
  ref_logits, ref_feats, ref_dem = inf["out"]
  np.testing.assert_allclose(np.asarray(aux["dem"]), ref_dem, atol=ATOL, rtol=ATOL)
  np.testing.assert_allclose(np.asarray(aux["image_features"]), ref_feats, atol=ATOL, rtol=ATOL)
  np.testing.assert_allclose(_real(logits), _real(ref_logits), atol=ATOL, rtol=ATOL)
  assert np.abs(ref_dem).max() > 0.5 and np.abs(ref_logits).max() > 1  # not vanishing
  assert model.clip_forwards_per_image == 10  # the reference ran 19


def test_off_size_images_are_upsampled_as_the_authors_do(inf):
  """builder.py leaves the processor at 336, so encode_images bicubic-upsamples to 1008."""
  small = np.random.default_rng(4).normal(size=(2, 3, 40, 40)).astype(np.float32)
  with torch.no_grad():
    ref_logits = inf["ref"](IDS, MASK, torch.tensor(small))[0]
  logits, _ = inf["apply"]({"params": inf["params"]}, jnp.asarray(small.transpose(0, 2, 3, 1)),
                           jnp.asarray(IDS, jnp.int32), jnp.asarray(MASK))
  np.testing.assert_allclose(_real(logits), _real(ref_logits), atol=ATOL, rtol=ATOL)


def test_separate_clip_directory_gives_the_same_params(inf, tmp_path):
  path = str(tmp_path / "inf")
  _write(path, _tensors(inf["ref"], embed_vision=False), _config())
  clip_dir = str(tmp_path / "clip")
  inf["ref"].clip.save_pretrained(clip_dir)
  model, params = load_inf_llava(path, vision=clip_dir)
  assert model == inf["model"]
  jax.tree.map(np.testing.assert_array_equal, params, inf["params"])
  with pytest.raises(FileNotFoundError, match="clip: no weights in this directory"):
    load_inf_llava(path, vision=inf["clip"])  # a config-only CLIP directory


def test_cli_subcommand_writes_an_inf_llava_checkpoint(inf, tmp_path):
  out = str(tmp_path / "conv")
  main(["inf-llava", inf["path"], "--vision", inf["clip"], "--out", out])
  config = converted.read_model_config(out)
  assert config["model_name"] == "inf_llava" and config["source"]["command"] == "inf-llava"
  model = build_model(config["model_name"], config["model"])
  assert model.dem == inf["model"].dem and model.num_crops == 3
  params = converted.load_converted(out)
  jax.tree.map(np.testing.assert_array_equal, params, inf["params"])


def test_strict_errors_name_the_key(inf, tmp_path):
  tensors = _tensors(inf["ref"])
  plain = {k: v for k, v in tensors.items() if not k.startswith("model.spatial_embed.")}
  _write(str(tmp_path / "plain"), plain, _config())
  with pytest.raises(KeyError, match=r"no INF-LLaVA DEM tensors \(model.spatial_embed.\*\)"):
    load_inf_llava(str(tmp_path / "plain"), vision=inf["clip"])
  _write(str(tmp_path / "gap"), {k: v for k, v in tensors.items()
                                 if k != "model.spatial_embed.attention.linears.2.bias"}, _config())
  with pytest.raises(KeyError, match=r"missing tensor 'model.spatial_embed.attention.linears.2."
                                     r"bias'.*spatial_embed/attention/v/bias"):
    load_inf_llava(str(tmp_path / "gap"), vision=inf["clip"])
  with pytest.raises(ValueError, match=r"unexpected tensors.*model.spatial_embed"):
    load_hf_llava(inf["path"], vision=inf["clip"])  # the LLaVA-1.5 loader does not drop the DEM
