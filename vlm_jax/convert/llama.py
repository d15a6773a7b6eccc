"""HF `LlamaForCausalLM`, `MistralForCausalLM` and `Qwen2ForCausalLM` <-> `vlm_jax.models.llama`.

HF keys: `model.embed_tokens.weight`, `model.layers.{i}.self_attn.{q,k,v,o}_proj.weight`,
`model.layers.{i}.mlp.{gate,up,down}_proj.weight`, `model.layers.{i}.{input,post_attention}_layernorm.weight`,
`model.norm.weight`, `lm_head.weight` (absent when `tie_word_embeddings`); Qwen2 adds
`model.layers.{i}.self_attn.{q,k,v}_proj.bias` (o_proj has none). HF stores q/k already in the
rotate-half RoPE layout that `vlm_jax.layers.rope` uses, so no permutation is needed.

Sliding-window attention: Mistral windows every layer when `sliding_window` is set (MistralConfig's
default is 4096 when the key is absent; v0.2+ configs say null). Qwen2 windows only with
`use_sliding_window`, and then only layers i >= `max_window_layers` (or those `layer_types` names
"sliding_attention"); the full-attention layers must come first, the one pattern the model expresses.
"""

from typing import Any

from vlm_jax.convert.mapping import (Rule, bias_to_heads, identity, linear, linear_from_heads,
                                     linear_to_heads)

MODEL_TYPES = ("llama", "mistral", "qwen2")


def _rope_theta(hf: dict, name: str) -> float:
  params = hf.get("rope_parameters") or {}
  scaling = hf.get("rope_scaling") or {}
  rope_type = params.get("rope_type") or scaling.get("rope_type") or scaling.get("type") or "default"
  if rope_type != "default":
    raise NotImplementedError(f"{name}: rope type {rope_type!r} is not supported yet (only 'default')")
  return float(params.get("rope_theta", hf.get("rope_theta", 10000.0)))


def _sliding_window(hf: dict, name: str) -> tuple[int | None, int]:
  """(sliding_window, full_attention_layers) of an HF config, by transformers' own defaults."""
  model_type = hf.get("model_type", "llama")
  num_layers = hf["num_hidden_layers"]
  if model_type == "mistral":  # MistralModel ignores layer_types: one window for every layer
    return hf.get("sliding_window", 4096), 0
  if model_type != "qwen2":
    return None, 0
  window = hf.get("sliding_window", 4096) if hf.get("use_sliding_window", False) else None
  layer_types = hf.get("layer_types")
  if layer_types is None:  # Qwen2Config.__post_init__: layers i >= max_window_layers are windowed
    full = hf.get("max_window_layers", 28)
    layer_types = ["sliding_attention" if window is not None and i >= full else "full_attention"
                   for i in range(num_layers)]
  if len(layer_types) != num_layers or set(layer_types) - {"full_attention", "sliding_attention"}:
    raise NotImplementedError(f"{name}: layer_types {layer_types!r}: expected {num_layers} entries of "
                              "'full_attention' / 'sliding_attention'")
  full = layer_types.count("full_attention")
  if "sliding_attention" in layer_types[:full]:
    raise NotImplementedError(f"{name}: layer_types {layer_types!r}: vlm_jax.models.llama supports "
                              "full-attention layers only before all sliding-window layers")
  if full == num_layers:
    return None, 0
  if window is None:  # transformers itself fails on this config when it builds the masks
    raise ValueError(f"{name}: layer_types has sliding_attention layers but use_sliding_window is "
                     "false / sliding_window is null")
  return window, full


def model_kwargs_from_hf(hf: dict, name: str = "config.json") -> dict[str, Any]:
  """HF config dict -> kwargs of `vlm_jax.models.llama.Model`."""
  qwen2 = hf.get("model_type") == "qwen2"  # q/k/v biases always, o_proj none; no attention_bias field
  for field in [] if qwen2 else ["attention_bias", "mlp_bias"]:
    if hf.get(field):
      raise NotImplementedError(f"{name}: {field}=true is not supported by vlm_jax.models.llama")
  if hf.get("hidden_act", "silu") != "silu":
    raise NotImplementedError(f"{name}: hidden_act {hf['hidden_act']!r}; vlm_jax.models.llama uses silu")
  heads = hf["num_attention_heads"]
  window, full = _sliding_window(hf, name)
  return dict(
    vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"], num_layers=hf["num_hidden_layers"],
    num_heads=heads, num_kv_heads=hf.get("num_key_value_heads") or heads,
    head_dim=hf.get("head_dim") or hf["hidden_size"] // heads, mlp_dim=hf["intermediate_size"],
    rope_theta=_rope_theta(hf, name), norm_eps=hf.get("rms_norm_eps", 1e-6),
    tie_embeddings=bool(hf.get("tie_word_embeddings", False)), qkv_bias=qwen2,
    sliding_window=window, full_attention_layers=full)


def hf_config(kw: dict[str, Any]) -> dict[str, Any]:
  """Inverse of `model_kwargs_from_hf`: a config.json that transformers loads as Qwen2ForCausalLM when
  `qkv_bias`, else MistralForCausalLM with a `sliding_window`, else LlamaForCausalLM."""
  config = {
    "vocab_size": kw["vocab_size"],
    "hidden_size": kw["hidden_size"], "intermediate_size": kw["mlp_dim"],
    "num_hidden_layers": kw["num_layers"], "num_attention_heads": kw["num_heads"],
    "num_key_value_heads": kw.get("num_kv_heads") or kw["num_heads"],
    "head_dim": kw.get("head_dim") or kw["hidden_size"] // kw["num_heads"],
    "rms_norm_eps": kw.get("norm_eps", 1e-6), "hidden_act": "silu",
    "rope_parameters": {"rope_theta": kw.get("rope_theta", 10000.0), "rope_type": "default"},
    "rope_theta": kw.get("rope_theta", 10000.0),
    "tie_word_embeddings": bool(kw.get("tie_embeddings", False)), "torch_dtype": "float32",
    "max_position_embeddings": 4096,
  }
  window, full = kw.get("sliding_window"), kw.get("full_attention_layers", 0)
  if kw.get("qkv_bias"):
    layers = kw["num_layers"]
    return {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", **config,
            "use_sliding_window": window is not None, "sliding_window": window,
            "max_window_layers": full if window is not None else layers,
            "layer_types": ["sliding_attention" if window is not None and i >= full
                            else "full_attention" for i in range(layers)]}
  if window is not None:
    if full:
      raise NotImplementedError(f"hf_config: full_attention_layers={full} without qkv_bias: Mistral "
                                "windows every layer and no bias-free HF family windows only some")
    return {"architectures": ["MistralForCausalLM"], "model_type": "mistral", **config,
            "sliding_window": window}
  return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", **config,
          "attention_bias": False, "mlp_bias": False}


def rules(kw: dict[str, Any], prefix: str = "model.", head: str = "lm_head.") -> list[Rule]:
  """`prefix` / `head` are where the decoder and the output head sit in the checkpoint; composites
  move them (LLaVA-HF: `language_model.model.` / `language_model.lm_head.`)."""
  h = kw["num_heads"]
  kvh = kw.get("num_kv_heads") or h
  dh = kw.get("head_dim") or kw["hidden_size"] // h
  out = [identity("embed/embedding", f"{prefix}embed_tokens.weight"),
         identity("norm/scale", f"{prefix}norm.weight")]
  if not kw.get("tie_embeddings"):
    out.append(linear("lm_head/kernel", f"{head}weight"))
  for i in range(kw["num_layers"]):
    o, t = f"layers_{i}", f"{prefix}layers.{i}"
    out += [
      linear_to_heads(f"{o}/attn/q/kernel", f"{t}.self_attn.q_proj.weight", h, dh),
      linear_to_heads(f"{o}/attn/k/kernel", f"{t}.self_attn.k_proj.weight", kvh, dh),
      linear_to_heads(f"{o}/attn/v/kernel", f"{t}.self_attn.v_proj.weight", kvh, dh),
      *([bias_to_heads(f"{o}/attn/{p}/bias", f"{t}.self_attn.{p}_proj.bias", n, dh)
         for p, n in (("q", h), ("k", kvh), ("v", kvh))] if kw.get("qkv_bias") else []),
      linear_from_heads(f"{o}/attn/o/kernel", f"{t}.self_attn.o_proj.weight", h, dh),
      linear(f"{o}/mlp/gate/kernel", f"{t}.mlp.gate_proj.weight"),
      linear(f"{o}/mlp/up/kernel", f"{t}.mlp.up_proj.weight"),
      linear(f"{o}/mlp/down/kernel", f"{t}.mlp.down_proj.weight"),
      identity(f"{o}/input_norm/scale", f"{t}.input_layernorm.weight"),
      identity(f"{o}/post_attn_norm/scale", f"{t}.post_attention_layernorm.weight"),
    ]
  return out


def ignore(key: str) -> bool:
  """Non-parameter buffers some checkpoints carry."""
  return key.endswith("rotary_emb.inv_freq")
