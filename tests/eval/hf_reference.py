"""transformers' own `generate` as the reference decoder for our models.

`UncachedShim` wraps any function (input_ids int[B, T], attention_mask int[B, T]) -> logits
float[B, T, V] as a transformers causal LM, so `shim.generate(...)` runs HF's greedy / beam search
loop (`use_cache=False`: the whole sequence goes through the function at every step) on our
models' full forward: the uncached reference for the KV-cached `vlm_jax.eval.generate`.
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
