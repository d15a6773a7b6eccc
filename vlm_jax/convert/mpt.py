"""MPT checkpoints <-> `vlm_jax.models.mpt`: transformers' native `MptForCausalLM` and mosaicml's
remote-code MPT (both `model_type` "mpt", one key layout), and the older MosaicGPT layout
(`model_type` "mosaic_gpt": `anas-awadalla/mpt-1b-redpajama-200b`, the LM of OpenFlamingo-3B).

Keys, L = `transformer.blocks.{i}`, "mpt" | "mosaic_gpt" where the layouts differ:
  transformer.wte.weight                  tied output embedding (`lm_head.weight` only when
                                          `tie_word_embeddings` is false, transformers only)
  L.norm_1 | L.ln_1, L.norm_2 | L.ln_2    LayerNorm (.weight; .bias unless no_bias)
  L.attn.Wqkv                             fused rows [q | k | v], each [heads * head_dim] head-major
  L.attn.q_ln, L.attn.k_ln                only with qk_ln | attn_qk_ln: LayerNorm over d_model
  L.attn.out_proj
  L.ffn.up_proj | L.mlp.mlp_up, L.ffn.down_proj | L.mlp.mlp_down
  transformer.norm_f | transformer.ln_f

Verified from source (mosaicml/examples `examples/llm/src/models/mosaic_gpt/mosaic_gpt.py` and
`configuration_mosaic_gpt.py`, `examples/llm/src/models/layers/{attention,gpt_blocks}.py`;
mosaicml/llm-foundry's MPT attention; transformers `models/mpt`):
  - MosaicGPT modules: `transformer.{wte, blocks, ln_f}`; blocks `ln_1, attn, ln_2, mlp`;
    `attn.{Wqkv, q_ln, k_ln, out_proj}` with q_ln/k_ln = `LayerNorm(d_model)` applied to q and k
    after the clip and before the head split; `mlp.{mlp_up, mlp_down}` with exact GELU; `wpe` only
    without alibi; logits = ln_f(h) wte^T.
  - MosaicGPT config fields and defaults: `mlp_ratio` 4, `attn_qk_ln` False, `attn_clip_qkv` None,
    `alibi` False, `alibi_bias_max` 8, `softmax_scale` None, `logit_scale` None, `prefix_lm` False,
    `no_bias` False (when true every module's bias, LayerNorms included, is removed); LayerNorms use
    torch's default eps 1e-5.
  - MosaicGPT's ALiBi slopes are 2^(-h * alibi_bias_max / n_heads), h = 1..n_heads, without MPT's
    power-of-two rounding: equal to MPT's only for a power-of-two head count; others are refused.
  - llm-foundry MPT: slopes as `alibi_slopes`; q_ln over d_model, k_ln over kv_heads * head_dim.
  - transformers' `MptForCausalLM` ignores `no_bias` (no biases ever), `expansion_ratio` (always 4),
    `attn_config.qk_ln`, `alibi_bias_max` (always 8) and `logit_scale`; it does apply `clip_qkv`.
Inferred, not verified: that `anas-awadalla/mpt-1b-redpajama-200b` was saved by this snapshot of
mosaic_gpt.py (the config fields it is known to carry, d_model 2048, 24 layers, 16 heads, alibi,
attn_qk_ln, vocab 50432, fit it), and whether its tensors have biases, which follows its config's
`no_bias` (default False). A wrong guess fails loudly (missing or unexpected `.bias` tensors).
"""

import math
import warnings
from typing import Any

import numpy as np

from vlm_jax.convert.mapping import Rule, identity, linear, linear_from_heads

MODEL_TYPES = ("mpt",)

# Key names of the two layouts; everything else (fused Wqkv, q_ln/k_ln, tied wte) is shared.
_NATIVE = dict(norm_1="norm_1", norm_2="norm_2", up="ffn.up_proj", down="ffn.down_proj",
               norm_f="norm_f")
_MOSAIC_GPT = dict(norm_1="ln_1", norm_2="ln_2", up="mlp.mlp_up", down="mlp.mlp_down",
                   norm_f="ln_f")


def _refuse(name: str, field: str, value, why: str):
  raise NotImplementedError(
    f"{name}: {field}={value!r} is not supported by vlm_jax.models.mpt ({why})")


def _common_checks(name: str, hf: dict, attn: dict, where: str) -> None:
  """Refuse what the model does not implement. `attn` holds the attention fields, which sit at
  `where` in the config ("attn_config." for MPT, the top level for MosaicGPT)."""
  if not attn.get("alibi", False):
    _refuse(name, f"{where}alibi", attn.get("alibi", False),
            "learned position embeddings (wpe) are not implemented")
  if attn.get("softmax_scale") is not None:
    _refuse(name, f"{where}softmax_scale", attn["softmax_scale"],
            "only the default 1/sqrt(head_dim)")
  if attn.get("prefix_lm"):
    _refuse(name, f"{where}prefix_lm", True, "only causal attention")
  if hf.get("logit_scale") is not None:
    _refuse(name, "logit_scale", hf["logit_scale"], "logits are not rescaled")


def _clip(value) -> float | None:
  return float(value) if value else None  # MPT treats 0 as "no clipping"


def model_kwargs_from_hf(hf: dict, name: str = "config.json") -> dict[str, Any]:
  """transformers / mosaicml remote-code MPT config.json -> kwargs of `vlm_jax.models.mpt.Model`."""
  # transformers' MptAttentionConfig defaults alibi to true; mosaicml's configs always spell it out.
  attn = {"alibi": True, **(hf.get("attn_config") or {})}
  _common_checks(name, hf, attn, "attn_config.")
  if attn.get("attn_type", "multihead_attention") != "multihead_attention":
    _refuse(name, "attn_config.attn_type", attn["attn_type"], "only multihead_attention")
  for field in ("qk_gn", "rope"):
    if attn.get(field):
      _refuse(name, f"attn_config.{field}", attn[field], "not implemented")
  if hf.get("norm_type", "low_precision_layernorm") not in ("low_precision_layernorm", "layernorm"):
    _refuse(name, "norm_type", hf["norm_type"], "LayerNorm only")
  ffn = hf.get("ffn_config") or {}  # newer llm-foundry configs
  if ffn.get("ffn_type", "mptmlp") != "mptmlp":
    _refuse(name, "ffn_config.ffn_type", ffn["ffn_type"], "only the GELU MLP 'mptmlp'")
  act = ffn.get("ffn_act_fn") or {"name": "gelu", "approximate": "none"}
  if act.get("name") != "gelu" or act.get("approximate", "none") != "none":
    _refuse(name, "ffn_config.ffn_act_fn", act, "exact GELU only")
  d = hf["d_model"]
  return dict(
    vocab_size=hf["vocab_size"], hidden_size=d, num_layers=hf["n_layers"],
    num_heads=hf["n_heads"],
    mlp_dim=ffn.get("ffn_hidden_size") or int(hf.get("expansion_ratio", 4) * d),
    norm_eps=float(hf.get("layer_norm_epsilon", hf.get("norm_eps", 1e-5))),
    # A missing no_bias means true for transformers (and MPT-7B); llm-foundry's default is false.
    use_bias=not hf.get("no_bias", True), qk_norm=bool(attn.get("qk_ln", False)),
    clip_qkv=_clip(attn.get("clip_qkv")), alibi_bias_max=float(attn.get("alibi_bias_max", 8)),
    tie_embeddings=bool(hf.get("tie_word_embeddings", True)))


def hf_config(kw: dict[str, Any]) -> dict[str, Any]:
  """Inverse of `model_kwargs_from_hf`: config.json for `MptForCausalLM` and mosaicml's MPT code.

  Features transformers' class lacks (biases, qk norm, another MLP width or alibi_bias_max) are
  still written, correctly for mosaicml's code, with a warning: transformers would drop them
  silently.
  """
  d, mlp = kw["hidden_size"], kw["mlp_dim"]
  if mlp % d:
    raise ValueError(f"save_hf_lm: MPT needs mlp_dim ({mlp}) a multiple of hidden_size ({d})")
  if kw.get("num_kv_heads") not in (None, kw["num_heads"]):
    raise ValueError("save_hf_lm: MPT export supports multi-head attention only")
  lacking = {"use_bias=True": kw["use_bias"], "qk_norm=True": kw["qk_norm"],
             f"mlp_dim={mlp} (not 4 * hidden_size)": mlp != 4 * d,
             f"alibi_bias_max={kw['alibi_bias_max']}": kw["alibi_bias_max"] != 8}
  lacking = [what for what, applies in lacking.items() if applies]
  if lacking:
    warnings.warn(f"save_hf_lm: transformers' MptForCausalLM does not implement "
                  f"{', '.join(lacking)}; load this export with mosaicml's MPT code "
                  "(trust_remote_code) or vlm_jax's load_hf_lm for the same logits", stacklevel=2)
  bias_max = kw["alibi_bias_max"]
  return {
    "architectures": ["MptForCausalLM"], "model_type": "mpt", "vocab_size": kw["vocab_size"],
    "d_model": d, "n_heads": kw["num_heads"], "n_layers": kw["num_layers"],
    "expansion_ratio": mlp // d, "no_bias": not kw["use_bias"],
    "layer_norm_epsilon": kw["norm_eps"],
    "tie_word_embeddings": bool(kw["tie_embeddings"]), "max_seq_len": 4096,
    "learned_pos_emb": False, "norm_type": "low_precision_layernorm", "logit_scale": None,
    "torch_dtype": "float32",
    "attn_config": {
      "attn_type": "multihead_attention", "attn_impl": "torch", "alibi": True,
      # transformers' MptAttentionConfig insists on an int
      "alibi_bias_max": int(bias_max) if float(bias_max).is_integer() else bias_max,
      "qk_ln": bool(kw["qk_norm"]), "clip_qkv": kw["clip_qkv"], "softmax_scale": None,
      "prefix_lm": False},
  }


def _fused_qkv(ours: str, theirs: str, heads: int, dh: int, bias: bool) -> list[Rule]:
  """Wqkv [3 * heads * dh, D], rows [q | k | v] each head-major <-> q/k/v kernels [D, heads, dh]
  (+ biases [heads, dh]). MPT splits with `chunk(3)` then `(h d)`; GPT-NeoX's rows are
  [head, qkv, d] instead."""

  def split_w(w):
    return tuple(p.T.reshape(w.shape[1], heads, dh) for p in np.split(w, 3, 0))

  def fuse_w(*kernels):
    return np.concatenate([k.reshape(k.shape[0], -1).T for k in kernels], 0)

  def split_b(b):
    return tuple(p.reshape(heads, dh) for p in np.split(b, 3))

  def fuse_b(*biases):
    return np.concatenate([b.reshape(-1) for b in biases])

  out = [Rule(tuple(f"{ours}/{p}/kernel" for p in "qkv"), f"{theirs}.weight", split_w, fuse_w)]
  if bias:
    out.append(Rule(tuple(f"{ours}/{p}/bias" for p in "qkv"), f"{theirs}.bias", split_b, fuse_b))
  return out


def _norm(ours: str, theirs: str, bias: bool) -> list[Rule]:
  """LayerNorm `{ours}/scale` (+ `/bias` when `bias`) <-> `{theirs}.weight` (+ `.bias`)."""
  out = [identity(f"{ours}/scale", f"{theirs}.weight")]
  return out + [identity(f"{ours}/bias", f"{theirs}.bias")] if bias else out


def _dense(ours: str, theirs: str, bias: bool) -> list[Rule]:
  """torch Linear `{theirs}` <-> `{ours}/kernel` (+ `/bias` when `bias`)."""
  out = [linear(f"{ours}/kernel", f"{theirs}.weight")]
  return out + [identity(f"{ours}/bias", f"{theirs}.bias")] if bias else out


def _rules(kw: dict[str, Any], names: dict[str, str], prefix: str) -> list[Rule]:
  h, d = kw["num_heads"], kw["hidden_size"]
  dh = kw.get("head_dim") or d // h
  b = kw["use_bias"]
  root = f"{prefix}transformer"
  out = [identity("embed/embedding", f"{root}.wte.weight"),
         *_norm("norm", f"{root}.{names['norm_f']}", b)]
  if not kw["tie_embeddings"]:
    out.append(linear("lm_head/kernel", f"{prefix}lm_head.weight"))
  for i in range(kw["num_layers"]):
    o, t = f"layers_{i}", f"{root}.blocks.{i}"
    out += _fused_qkv(f"{o}/attn", f"{t}.attn.Wqkv", h, dh, b)
    out.append(linear_from_heads(f"{o}/attn/o/kernel", f"{t}.attn.out_proj.weight", h, dh))
    if b:
      out.append(identity(f"{o}/attn/o/bias", f"{t}.attn.out_proj.bias"))
    if kw["qk_norm"]:
      out += _norm(f"{o}/attn/q_norm", f"{t}.attn.q_ln", b)
      out += _norm(f"{o}/attn/k_norm", f"{t}.attn.k_ln", b)
    out += [*_norm(f"{o}/input_norm", f"{t}.{names['norm_1']}", b),
            *_norm(f"{o}/post_attn_norm", f"{t}.{names['norm_2']}", b),
            *_dense(f"{o}/mlp/fc1", f"{t}.{names['up']}", b),
            *_dense(f"{o}/mlp/fc2", f"{t}.{names['down']}", b)]
  return out


def rules(kw: dict[str, Any], prefix: str = "") -> list[Rule]:
  """Our params <-> the "mpt" layout (transformers and mosaicml's remote code). `prefix` goes in
  front of every source key (a wrapper's `lang_encoder.`, say)."""
  return _rules(kw, _NATIVE, prefix)


def ignore(key: str) -> bool:
  # A tied lm_head some exporters write anyway; when untied, a rule consumes it first.
  return key == "lm_head.weight"


class MosaicGpt:
  """The MosaicGPT layout (`model_type` "mosaic_gpt"): this module's interface, load only."""

  MODEL_TYPES = ("mosaic_gpt",)

  @staticmethod
  def model_kwargs_from_hf(hf: dict, name: str = "config.json") -> dict[str, Any]:
    _common_checks(name, hf, hf, "")
    heads = hf["n_heads"]
    if 2 ** math.ceil(math.log2(heads)) != heads:
      _refuse(name, "n_heads", heads,
              "MosaicGPT's ALiBi slopes equal MPT's only for a power of two")
    return dict(
      vocab_size=hf["vocab_size"], hidden_size=hf["d_model"], num_layers=hf["n_layers"],
      num_heads=heads, mlp_dim=int(hf.get("mlp_ratio", 4) * hf["d_model"]), norm_eps=1e-5,
      use_bias=not hf.get("no_bias", False), qk_norm=bool(hf.get("attn_qk_ln", False)),
      clip_qkv=_clip(hf.get("attn_clip_qkv")), alibi_bias_max=float(hf.get("alibi_bias_max", 8)),
      tie_embeddings=True)

  @staticmethod
  def rules(kw: dict[str, Any], prefix: str = "") -> list[Rule]:
    return _rules(kw, _MOSAIC_GPT, prefix)

  @staticmethod
  def ignore(key: str) -> bool:
    return False
