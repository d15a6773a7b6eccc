"""Tiny HF checkpoints for the prompting tests, saved by transformers with save_pretrained (plus a
word-level tokenizer.json), loaded through our converters."""

import os

import numpy as np
import tokenizers
from tokenizers import models, normalizers, pre_tokenizers, processors

# CLIP: 48 px images, 8 px patches -> a 6 x 6 grid; a 50-token vocabulary whose EOS (49) is the
# largest id, as in CLIP's real vocabulary.
CLIP_VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                   image_size=48, patch_size=8, hidden_act="quick_gelu", layer_norm_eps=1e-5)
CLIP_TEXT = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                 vocab_size=50, max_position_embeddings=12, eos_token_id=49, bos_token_id=48,
                 pad_token_id=0)
CLIP_WORDS = ["<pad>", "<unk>", "what", "is", "on", "the", "mat", "a", "cat", "dog", "?", "color"]
# LLaVA: 32 px images, 8 px patches -> 16 image tokens (a 4 x 4 grid); image token 99.
LLAVA_VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                    num_attention_heads=4, image_size=32, patch_size=8, hidden_act="quick_gelu",
                    layer_norm_eps=1e-5)
LLAVA_TEXT = dict(vocab_size=100, hidden_size=32, intermediate_size=48, num_hidden_layers=3,
                  num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5,
                  rope_theta=10000.0, initializer_range=0.2)
LLAVA_IMAGE = 99
LLAVA_WORDS = ["<unk>", "<s>", "</s>", "a", "chat", "user", ":", "assistant", "what", "is", "on",
               "the", "mat", "?", "cat", "color"]


def perturb(model, torch, scale=0.2):
  """HF's init gives near-identity norms and tiny weights; make every param matter."""
  torch.manual_seed(0)
  with torch.no_grad():
    for p in model.parameters():
      p.add_(scale * torch.randn_like(p))
  return model.eval()


def _word_tokenizer(words, specials, unk):
  vocab = {w: i for i, w in enumerate(words)}
  tok = tokenizers.Tokenizer(models.WordLevel(vocab, unk_token=unk))
  tok.normalizer = normalizers.Lowercase()
  tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(),
                                               pre_tokenizers.Punctuation("isolated")])
  tok.add_special_tokens([tokenizers.AddedToken(s, special=True) for s in specials])
  return tok


def clip_tokenizer() -> tokenizers.Tokenizer:
  words = CLIP_WORDS + [f"w{i}" for i in range(len(CLIP_WORDS), 48)] + ["<|startoftext|>",
                                                                        "<|endoftext|>"]
  tok = _word_tokenizer(words, ["<|startoftext|>", "<|endoftext|>"], "<unk>")
  tok.post_processor = processors.TemplateProcessing(
    single="<|startoftext|> $A <|endoftext|>",
    special_tokens=[("<|startoftext|>", 48), ("<|endoftext|>", 49)])
  return tok


def llava_tokenizer() -> tokenizers.Tokenizer:
  words = LLAVA_WORDS + [f"w{i}" for i in range(len(LLAVA_WORDS), LLAVA_IMAGE)] + ["<image>"]
  return _word_tokenizer(words, ["<s>", "</s>", "<image>"], "<unk>")


def save_clip(path, torch, transformers):
  cfg = transformers.CLIPConfig(vision_config=CLIP_VISION, text_config=CLIP_TEXT,
                                projection_dim=8)
  model = perturb(transformers.CLIPModel(cfg), torch)
  model.save_pretrained(path)
  clip_tokenizer().save(os.path.join(path, "tokenizer.json"))
  return model


def save_llava(path, torch, transformers):
  torch.manual_seed(0)
  cfg = transformers.LlavaConfig(
    vision_config=transformers.CLIPVisionConfig(**LLAVA_VISION),
    text_config=transformers.LlamaConfig(**LLAVA_TEXT), image_token_index=LLAVA_IMAGE,
    vision_feature_layer=-2, vision_feature_select_strategy="default")
  model = perturb(transformers.LlavaForConditionalGeneration(cfg), torch)
  model.save_pretrained(path)
  llava_tokenizer().save(os.path.join(path, "tokenizer.json"))
  return model


def noise_image(path, width, height, seed=0):
  from PIL import Image

  rgb = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
  Image.fromarray(rgb).save(path)
  return rgb
