"""HF `GPTNeoXForCausalLM` <-> `vlm_jax.models.gpt_neox`.

HF keys: `gpt_neox.embed_in.weight`, `gpt_neox.layers.{i}.attention.query_key_value.{weight,bias}` (fused,
rows ordered [head, (q|k|v), head_dim]), `...attention.dense.*`, `...mlp.dense_h_to_4h.*`,
`...mlp.dense_4h_to_h.*`, `...{input,post_attention}_layernorm.*`, `gpt_neox.final_layer_norm.*`,
`embed_out.weight`. Older checkpoints also carry `attention.bias` / `masked_bias` buffers (ignored).
"""

from typing import Any

import numpy as np

from vlm_jax.convert.mapping import (Rule, identity, layernorm, linear, linear_from_heads,
                                     linear_with_bias)

MODEL_TYPES = ("gpt_neox",)


def model_kwargs_from_hf(hf: dict, name: str = "config.json") -> dict[str, Any]:
  rope = hf.get("rope_parameters") or {}
  if rope.get("rope_type", "default") != "default" or hf.get("rope_scaling"):
    raise NotImplementedError(f"{name}: only the default rope type is supported")
  if hf.get("hidden_act", "gelu") != "gelu":
    raise NotImplementedError(f"{name}: hidden_act {hf['hidden_act']!r}; vlm_jax.models.gpt_neox "
                              "uses exact gelu")
  return dict(
    vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"], num_layers=hf["num_hidden_layers"],
    num_heads=hf["num_attention_heads"], mlp_dim=hf["intermediate_size"],
    rope_theta=float(rope.get("rope_theta", hf.get("rotary_emb_base", 10000.0))),
    rotary_pct=float(rope.get("partial_rotary_factor", hf.get("rotary_pct", 0.25))),
    use_parallel_residual=bool(hf.get("use_parallel_residual", True)),
    norm_eps=hf.get("layer_norm_eps", 1e-5), tie_embeddings=bool(hf.get("tie_word_embeddings", False)))


def hf_config(kw: dict[str, Any]) -> dict[str, Any]:
  return {
    "architectures": ["GPTNeoXForCausalLM"], "model_type": "gpt_neox", "vocab_size": kw["vocab_size"],
    "hidden_size": kw["hidden_size"], "intermediate_size": kw["mlp_dim"],
    "num_hidden_layers": kw["num_layers"], "num_attention_heads": kw["num_heads"],
    "hidden_act": "gelu", "layer_norm_eps": kw["norm_eps"],
    "use_parallel_residual": kw["use_parallel_residual"],
    "rope_parameters": {"rope_theta": kw["rope_theta"], "partial_rotary_factor": kw["rotary_pct"],
                        "rope_type": "default"},
    "rotary_pct": kw["rotary_pct"], "rotary_emb_base": kw["rope_theta"],
    "tie_word_embeddings": kw["tie_embeddings"], "attention_bias": True, "torch_dtype": "float32",
    "max_position_embeddings": 4096,
  }


def _fused_qkv(ours_prefix: str, theirs: str, heads: int, dh: int) -> list[Rule]:
  names = tuple(f"{ours_prefix}/{p}/kernel" for p in "qkv")
  bias_names = tuple(f"{ours_prefix}/{p}/bias" for p in "qkv")

  def split_w(w):  # [H*3*Dh, D] -> 3 x [D, H, Dh]
    w = w.reshape(heads, 3, dh, w.shape[-1])
    return tuple(np.transpose(w[:, j], (2, 0, 1)) for j in range(3))

  def fuse_w(q, k, v):
    return np.stack([np.transpose(x, (1, 2, 0)) for x in (q, k, v)], 1).reshape(heads * 3 * dh, -1)

  def split_b(b):
    b = b.reshape(heads, 3, dh)
    return tuple(b[:, j] for j in range(3))

  def fuse_b(q, k, v):
    return np.stack([q, k, v], 1).reshape(-1)

  return [Rule(names, f"{theirs}.weight", split_w, fuse_w),
          Rule(bias_names, f"{theirs}.bias", split_b, fuse_b)]


def rules(kw: dict[str, Any]) -> list[Rule]:
  h, d = kw["num_heads"], kw["hidden_size"]
  dh = d // h
  out = [identity("embed/embedding", "gpt_neox.embed_in.weight"),
         *layernorm("norm", "gpt_neox.final_layer_norm")]
  if not kw.get("tie_embeddings"):
    out.append(linear("lm_head/kernel", "embed_out.weight"))
  for i in range(kw["num_layers"]):
    o, t = f"layers_{i}", f"gpt_neox.layers.{i}"
    out += _fused_qkv(f"{o}/attn", f"{t}.attention.query_key_value", h, dh)
    out += [
      linear_from_heads(f"{o}/attn/o/kernel", f"{t}.attention.dense.weight", h, dh),
      identity(f"{o}/attn/o/bias", f"{t}.attention.dense.bias"),
      *linear_with_bias(f"{o}/mlp/fc1", f"{t}.mlp.dense_h_to_4h"),
      *linear_with_bias(f"{o}/mlp/fc2", f"{t}.mlp.dense_4h_to_h"),
      *layernorm(f"{o}/input_norm", f"{t}.input_layernorm"),
      *layernorm(f"{o}/post_attn_norm", f"{t}.post_attention_layernorm"),
    ]
  return out


def ignore(key: str) -> bool:
  return key.endswith(("attention.bias", "attention.masked_bias", "rotary_emb.inv_freq"))
