"""transformers' own `generate` as the reference decoder for our models.

`UncachedShim` wraps any function (input_ids int[B, T], attention_mask int[B, T]) -> logits
float[B, T, V] as a transformers causal LM, so `shim.generate(...)` runs HF's greedy / beam search
loop (`use_cache=False`: the whole sequence goes through the function at every step) on our
models' full forward: the uncached reference for the KV-cached `vlm_jax.eval.generate`.
`build_hf_lm` makes the tiny random transformers LMs the LM tests convert.
"""

import numpy as np
import torch
import transformers
from transformers.modeling_outputs import CausalLMOutputWithPast


class UncachedShim(transformers.PreTrainedModel, transformers.GenerationMixin):
  config_class = transformers.PretrainedConfig

  def __init__(self, fn, vocab_size: int):
    super().__init__(transformers.PretrainedConfig(vocab_size=vocab_size))
    self.fn = fn
    self.unused = torch.nn.Parameter(torch.zeros(1))  # generate() reads the device off a param
    self.generation_config.use_cache = False

  def forward(self, input_ids=None, attention_mask=None, **_):
    logits = self.fn(input_ids.numpy(), attention_mask.numpy())
    return CausalLMOutputWithPast(logits=torch.tensor(np.asarray(logits, np.float32)))


def hf_generate(model, ids, mask, max_new_tokens: int, pad: int, **kw) -> np.ndarray:
  """HF `generate` -> the new tokens int[B, max_new_tokens], padded with `pad` after early stops
  (HF crops the output to the longest row instead)."""
  with torch.no_grad():
    out = model.generate(input_ids=torch.tensor(np.asarray(ids, np.int64)),
                         attention_mask=torch.tensor(np.asarray(mask, np.int64)),
                         max_new_tokens=max_new_tokens, pad_token_id=pad, **kw)
  new = out[:, np.shape(ids)[1]:].numpy()
  return np.pad(new, ((0, 0), (0, max_new_tokens - new.shape[1])), constant_values=pad)


def positions(mask: np.ndarray) -> np.ndarray:
  """HF's position ids of left-padded rows: cumsum(mask) - 1 (0 on the padding)."""
  return np.maximum(np.cumsum(mask, axis=-1) - 1, 0)


VOCAB, PAD = 96, 1
INPUTS = np.array([[5, 17, 33, 2, 90, 41, 8, 60], [0, 0, 0, 12, 7, 77, 3, 9]], np.int64)
MASK = np.array([[1] * 8, [0, 0, 0, 1, 1, 1, 1, 1]], np.int64)  # row 1 is left-padded


def _randomize(model, seed=0):
  """std-0.2 weights (peaked attention and logits, so a mask or position bug changes tokens), norm
  scales around 1, non-zero biases."""
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      noise = torch.randn(p.shape, generator=gen)
      if ("norm" in name or "ln" in name) and name.endswith("weight"):
        p.copy_(1.0 + 0.3 * noise)
      else:
        p.copy_(0.2 * noise)
  return model


def _no_special_tokens(cfg):
  # No default eos/bos: the tests choose the stop tokens.
  cfg.bos_token_id = cfg.eos_token_id = cfg.pad_token_id = None
  return cfg


HF_LMS = {
  "llama": lambda: transformers.LlamaForCausalLM(_no_special_tokens(transformers.LlamaConfig(
    vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, rope_theta=10000.0, rms_norm_eps=1e-5))),
  "gpt_neox": lambda: transformers.GPTNeoXForCausalLM(_no_special_tokens(
    transformers.GPTNeoXConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64,
                               num_hidden_layers=2, num_attention_heads=4, rotary_pct=0.5))),
  "mpt": lambda: transformers.MptForCausalLM(_no_special_tokens(transformers.MptConfig(
    d_model=32, n_heads=4, n_layers=2, vocab_size=VOCAB))),
}


def build_hf_lm(family: str, path: str):
  torch.manual_seed(0)
  hf = _randomize(HF_LMS[family]().eval())
  hf.generation_config.eos_token_id = hf.generation_config.bos_token_id = None
  hf.save_pretrained(path)
  return hf
