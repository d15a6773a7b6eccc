"""MPT <-> vlm_jax: logit parity (float32, CPU, a left-padded row, real tokens compared) with

- transformers' `MptForCausalLM` for what it implements: no_bias=true, qk_ln off, expansion ratio
  4, alibi_bias_max 8, clip_qkv;
- `_ReferenceMpt` below for what it does not: transformers' MPT builds every Linear and LayerNorm
  without bias whatever `no_bias` says, and has no qk LayerNorm (`attn_config.qk_ln` is accepted and
  ignored), yet MPT-1B (OpenFlamingo-3B) has both. The reference is written here from MPT's
  equations, not copied from mosaicml's code, and is itself checked against transformers where both
  apply.

Also: KV-cache decoding equals the full forward, save_hf_lm -> transformers round trip, the
MosaicGPT key layout (`model_type` "mosaic_gpt"), and errors that name the key or config field.
"""

import json
import math
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from vlm_jax.convert import load_hf_lm, save_hf_lm  # noqa: E402
from vlm_jax.convert.safetensors_io import CheckpointReader, write_checkpoint  # noqa: E402
from vlm_jax.layers.attention import alibi_bias, alibi_slopes, dot_product_attention  # noqa: E402
from vlm_jax.models import mpt  # noqa: E402

ATOL = 1e-4
INPUTS = np.array([[5, 17, 33, 2, 90, 41, 8, 60], [0, 0, 0, 12, 7, 77, 3, 9]], np.int64)
MASK = np.array([[1] * 8, [0, 0, 0, 1, 1, 1, 1, 1]], np.int64)  # row 1 is left-padded
REAL = MASK.astype(bool)
VOCAB = 96


def _assert_close(ours, ref, atol=ATOL):
  np.testing.assert_allclose(np.asarray(ours)[REAL], np.asarray(ref)[REAL], atol=atol, rtol=atol)


def _ours(model, params, ids=INPUTS, mask=MASK):
  return model.apply({"params": params}, jnp.asarray(ids, jnp.int32), jnp.asarray(mask))[0]


def _randomize(module, seed):
  """Large weights (std 0.2) so attention is peaked and an ALiBi, mask or qk-norm error shows in the
  logits (the default init gives near-uniform attention); norm scales around 1, biases non-zero."""
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in module.named_parameters():
      noise = torch.randn(p.shape, generator=gen)
      is_norm = any(s in name for s in ("norm", "_ln", "ln_"))
      if is_norm and name.endswith("weight"):
        p.copy_(1.0 + 0.3 * noise)
      elif name.endswith("bias"):
        p.copy_(0.3 * noise)
      else:
        p.copy_(0.2 * noise)


class _ReferenceMpt(torch.nn.Module):
  """MPT from its equations; `state_dict()` keys are the "mpt" checkpoint layout.

    h = E[ids];  per block:  qkv = clip(W_qkv LN_1(h));  q, k, v = split(qkv)
    q, k = LN_q(q), LN_k(k)                                     (qk_ln, over all of d_model)
    h = h + W_o softmax(q_h k_h^T / sqrt(d_h) + m_h (j - i) + causal/padding mask) v_h
    h = h + W_down gelu(W_up LN_2(h));   logits = LN_f(h) E^T
  with ALiBi slopes m_h = 2^(-h * bias_max / n) over n = next power of two >= heads, odd-indexed
  then even-indexed ones first when heads is not a power of two.
  """

  def __init__(self, *, d, heads, layers, ratio, use_bias, qk_ln, clip_qkv=None, bias_max=8.0):
    super().__init__()
    nn = torch.nn
    self.d, self.heads, self.qk_ln = d, heads, qk_ln
    self.clip_qkv, self.bias_max = clip_qkv, bias_max

    def norm():
      return nn.LayerNorm(d, eps=1e-5, bias=use_bias)

    def block():
      blk, attn, ffn = nn.Module(), nn.Module(), nn.Module()
      attn.Wqkv = nn.Linear(d, 3 * d, bias=use_bias)
      attn.out_proj = nn.Linear(d, d, bias=use_bias)
      if qk_ln:
        attn.q_ln, attn.k_ln = norm(), norm()
      ffn.up_proj = nn.Linear(d, ratio * d, bias=use_bias)
      ffn.down_proj = nn.Linear(ratio * d, d, bias=use_bias)
      blk.norm_1, blk.attn, blk.norm_2, blk.ffn = norm(), attn, norm(), ffn
      return blk

    self.transformer = nn.Module()
    self.transformer.wte = nn.Embedding(VOCAB, d)
    self.transformer.blocks = nn.ModuleList([block() for _ in range(layers)])
    self.transformer.norm_f = norm()

  def slopes(self):
    n = 2 ** math.ceil(math.log2(self.heads))
    m = torch.tensor([2.0 ** (-(h + 1) * self.bias_max / n) for h in range(n)])
    return m if n == self.heads else torch.cat([m[1::2], m[::2]])[: self.heads]

  def forward(self, ids, mask):
    ids, mask = torch.as_tensor(ids), torch.as_tensor(mask).bool()
    b, t = ids.shape
    dh = self.d // self.heads
    pos = torch.arange(t)
    alibi = self.slopes()[:, None, None] * (pos[None, :] - pos[:, None]).float()  # [H, T, S]
    allowed = (pos[None, :] <= pos[:, None])[None, None] & mask[:, None, None, :]
    x = self.transformer.wte(ids)
    for blk in self.transformer.blocks:
      qkv = blk.attn.Wqkv(blk.norm_1(x))
      if self.clip_qkv:
        qkv = qkv.clamp(-self.clip_qkv, self.clip_qkv)
      q, k, v = qkv.split(self.d, -1)
      if self.qk_ln:
        q, k = blk.attn.q_ln(q), blk.attn.k_ln(k)
      q, k, v = (a.view(b, t, self.heads, dh).transpose(1, 2) for a in (q, k, v))
      s = q @ k.transpose(-1, -2) / math.sqrt(dh) + alibi
      s = s.masked_fill(~allowed, torch.finfo(s.dtype).min)
      a = (s.softmax(-1) @ v).transpose(1, 2).reshape(b, t, self.d)
      x = x + blk.attn.out_proj(a)
      x = x + blk.ffn.down_proj(torch.nn.functional.gelu(blk.ffn.up_proj(blk.norm_2(x))))
    return self.transformer.norm_f(x) @ self.transformer.wte.weight.T

  def logits(self, ids=INPUTS, mask=MASK):
    with torch.no_grad():
      return self(ids, mask).numpy()


def _write(path, tensors, config):
  write_checkpoint(path, {k: np.ascontiguousarray(v.detach().numpy()) if torch.is_tensor(v) else v
                          for k, v in tensors.items()})
  with open(os.path.join(path, "config.json"), "w") as f:
    json.dump(config, f)
  return path


def _mpt_config(d, heads, layers, ratio, use_bias, qk_ln, clip_qkv=None, bias_max=8):
  """A mosaicml remote-code style config.json (model_type "mpt")."""
  return {"architectures": ["MPTForCausalLM"], "model_type": "mpt", "d_model": d, "n_heads": heads,
          "n_layers": layers, "expansion_ratio": ratio, "vocab_size": VOCAB,
          "no_bias": not use_bias, "max_seq_len": 2048, "norm_type": "low_precision_layernorm",
          "logit_scale": None,
          "attn_config": {"attn_type": "multihead_attention", "attn_impl": "torch", "alibi": True,
                          "alibi_bias_max": bias_max, "qk_ln": qk_ln, "clip_qkv": clip_qkv,
                          "softmax_scale": None, "prefix_lm": False}}


def _transformers_mpt(path, clip_qkv=None, seed=0):
  torch.manual_seed(seed)
  cfg = transformers.MptConfig(d_model=32, n_heads=4, n_layers=2, vocab_size=VOCAB,
                               attn_config={"clip_qkv": clip_qkv})
  model = transformers.MptForCausalLM(cfg).eval()
  _randomize(model, seed)
  model.save_pretrained(path)
  return model


def _hf_logits(model, ids=INPUTS, mask=MASK):
  with torch.no_grad():
    return model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)).logits.numpy()


@pytest.fixture(scope="module")
def native(tmp_path_factory):
  path = str(tmp_path_factory.mktemp("mpt_native"))
  return path, _transformers_mpt(path)


MPT1B_LIKE = dict(d=32, heads=4, layers=2, ratio=2, use_bias=True, qk_ln=True)


@pytest.fixture(scope="module")
def mpt1b_like(tmp_path_factory):
  """Biases and qk LayerNorm, as MPT-1B; checkpoint in the remote-code "mpt" layout."""
  ref = _ReferenceMpt(**MPT1B_LIKE).eval()
  _randomize(ref, 1)
  path = str(tmp_path_factory.mktemp("mpt1b_like"))
  return _write(path, ref.state_dict(), _mpt_config(**MPT1B_LIKE)), ref


@pytest.mark.parametrize("clip_qkv", [None, 1.5])
def test_logits_match_transformers(native, tmp_path, clip_qkv):
  if clip_qkv is None:
    path, hf_model = native
  else:
    path = str(tmp_path / "clip")
    hf_model = _transformers_mpt(path, clip_qkv, seed=2)
  model, params = load_hf_lm(path)
  assert isinstance(model, mpt.Model) and model.tie_embeddings and not model.use_bias
  assert model.clip_qkv == clip_qkv and "lm_head" not in params
  _assert_close(_ours(model, params), _hf_logits(hf_model))


def test_reference_matches_transformers(native):
  """The hand-written reference is trustworthy where transformers can check it."""
  _, hf_model = native
  ref = _ReferenceMpt(d=32, heads=4, layers=2, ratio=4, use_bias=False, qk_ln=False).eval()
  ref.load_state_dict({k: v for k, v in hf_model.state_dict().items() if k != "lm_head.weight"})
  _assert_close(ref.logits(), _hf_logits(hf_model))


@pytest.mark.parametrize("cfg", [
  dict(d=48, heads=6, layers=2, ratio=2, use_bias=True, qk_ln=True),  # heads not a power of two
  dict(d=32, heads=4, layers=2, ratio=4, use_bias=False, qk_ln=True, clip_qkv=1.0),
  dict(d=32, heads=4, layers=2, ratio=3, use_bias=True, qk_ln=False, bias_max=6),
], ids=["bias+qk_ln+6heads", "no_bias+qk_ln+clip", "bias+alibi_max6"])
def test_logits_match_reference(tmp_path, cfg):
  ref = _ReferenceMpt(**cfg).eval()
  _randomize(ref, 3)
  model, params = load_hf_lm(_write(str(tmp_path / "m"), ref.state_dict(), _mpt_config(**cfg)))
  assert model.use_bias == cfg["use_bias"] and model.qk_norm == cfg["qk_ln"]
  assert ("bias" in params["layers_0"]["attn"]["q"]) == cfg["use_bias"]
  _assert_close(_ours(model, params), ref.logits())


def test_kv_cache_decoding_matches_full_forward(mpt1b_like):
  """Prefill 5 tokens, then decode one at a time: ALiBi offsets follow the cache index, and the
  left-padded row's pad keys stay masked."""
  model, params = load_hf_lm(mpt1b_like[0])
  full = _ours(model, params)
  ids, mask = jnp.asarray(INPUTS, jnp.int32), jnp.asarray(MASK)
  caches = model.init_caches(2, ids.shape[1])
  steps = [(0, 5)] + [(i, i + 1) for i in range(5, ids.shape[1])]
  apply = jax.jit(model.apply)  # two compiles (T=5, T=1) beat eager dispatch of every step
  pieces = []
  for lo, hi in steps:
    logits, aux = apply({"params": params}, ids[:, lo:hi], mask, caches=caches)
    caches = aux["caches"]
    pieces.append(logits)
  assert int(caches[0].index) == ids.shape[1]
  _assert_close(jnp.concatenate(pieces, 1), full, atol=1e-5)


def test_save_round_trip_through_transformers(native, tmp_path, recwarn):
  path, hf_model = native
  model, params = load_hf_lm(path)
  save_hf_lm(model, params, str(tmp_path / "export"))
  assert not [w for w in recwarn if "MptForCausalLM" in str(w.message)]
  reloaded = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "export")).eval()
  assert type(reloaded).__name__ == "MptForCausalLM"
  _assert_close(_hf_logits(reloaded), _hf_logits(hf_model))


def test_save_of_features_transformers_lacks_warns_and_round_trips(mpt1b_like, tmp_path):
  model, params = load_hf_lm(mpt1b_like[0])
  with pytest.warns(UserWarning, match=r"use_bias=True, qk_norm=True, mlp_dim=64"):
    save_hf_lm(model, params, str(tmp_path / "export"))
  with open(tmp_path / "export" / "config.json") as f:
    cfg = json.load(f)
  assert cfg["no_bias"] is False and cfg["attn_config"]["qk_ln"] is True
  assert cfg["expansion_ratio"] == 2
  assert set(CheckpointReader(str(tmp_path / "export")).keys()) == set(mpt1b_like[1].state_dict())
  model2, params2 = load_hf_lm(str(tmp_path / "export"))
  _assert_close(_ours(model2, params2), mpt1b_like[1].logits())


_TO_MOSAIC_GPT = [("norm_1.", "ln_1."), ("norm_2.", "ln_2."), ("ffn.up_proj.", "mlp.mlp_up."),
                  ("ffn.down_proj.", "mlp.mlp_down."), ("transformer.norm_f.", "transformer.ln_f.")]


def _mosaic_gpt_dir(src, dst, **overrides):
  tensors = {}
  for key, value in CheckpointReader(src).items():
    for old, new in _TO_MOSAIC_GPT:
      key = key.replace(old, new)
    tensors[key] = value
  c = MPT1B_LIKE
  # The fields of anas-awadalla/mpt-1b-redpajama-200b's config (MosaicGPTConfig), at tiny sizes; no
  # `no_bias` key, so MosaicGPT's default (biases) applies.
  config = {"architectures": ["MosaicGPT"], "model_type": "mosaic_gpt", "d_model": c["d"],
            "n_heads": c["heads"], "n_layers": c["layers"], "mlp_ratio": c["ratio"],
            "vocab_size": VOCAB, "max_seq_len": 2048, "alibi": True, "alibi_bias_max": 8,
            "attn_qk_ln": True, "attn_clip_qkv": None, "attn_impl": "torch", "softmax_scale": None,
            "prefix_lm": False, "logit_scale": None, "low_precision_layernorm": True,
            "emb_pdrop": 0, "attn_pdrop": 0, "resid_pdrop": 0, **overrides}
  return _write(dst, tensors, config)


def test_mosaic_gpt_layout_loads_with_same_logits(mpt1b_like, tmp_path):
  path = _mosaic_gpt_dir(mpt1b_like[0], str(tmp_path / "mosaic"))
  assert "transformer.blocks.0.mlp.mlp_up.bias" in CheckpointReader(path).keys()
  model, params = load_hf_lm(path)
  assert isinstance(model, mpt.Model) and model.use_bias and model.qk_norm
  _assert_close(_ours(model, params), mpt1b_like[1].logits())
  bad = _mosaic_gpt_dir(mpt1b_like[0], str(tmp_path / "six_heads"), n_heads=6)
  with pytest.raises(NotImplementedError, match=r"six_heads/config.json: n_heads=6"):
    load_hf_lm(bad)


def test_missing_q_ln_and_unsupported_config_are_named(mpt1b_like, tmp_path):
  dst = str(tmp_path / "bad")
  shutil.copytree(mpt1b_like[0], dst)
  tensors = dict(CheckpointReader(dst).items())
  tensors.pop("transformer.blocks.1.attn.q_ln.weight")
  os.remove(os.path.join(dst, "model.safetensors"))
  write_checkpoint(dst, tensors)
  with pytest.raises(KeyError, match=r"missing tensor 'transformer.blocks.1.attn.q_ln.weight'"
                                     r".*layers_1/attn/q_norm/scale"):
    load_hf_lm(dst)
  with open(os.path.join(dst, "config.json")) as f:
    cfg = json.load(f)
  cfg["attn_config"]["alibi"] = False
  with open(os.path.join(dst, "config.json"), "w") as f:
    json.dump(cfg, f)
  with pytest.raises(NotImplementedError, match=r"config.json: attn_config.alibi=False"):
    load_hf_lm(dst)


@pytest.mark.parametrize("heads", [4, 6, 12, 16, 20])
def test_alibi_slopes_and_bias_match_transformers(heads):
  from transformers.models.mpt.modeling_mpt import build_mpt_alibi_tensor

  for bias_max in (8, 6):
    hf = build_mpt_alibi_tensor(heads, 5, alibi_bias_max=bias_max).numpy()  # [H, 1, S]: m_h (j - 4)
    ours = np.asarray(alibi_bias(alibi_slopes(heads, bias_max), 1, 5, q_offset=4))[0]
    np.testing.assert_allclose(ours, hf, rtol=1e-6, atol=1e-7)


def test_biased_attention_fused_path_equals_explicit_path():
  """dot_product_attention hands the bias to jax.nn.dot_product_attention unless probs are asked
  for."""
  rng = np.random.default_rng(0)
  q, k, v = (jnp.asarray(rng.normal(size=s), jnp.float32) for s in [(2, 5, 4, 8), (2, 7, 2, 8),
                                                                     (2, 7, 2, 8)])
  mask = jnp.asarray(rng.random((2, 1, 5, 7)) > 0.3)

  @jax.jit  # one compile instead of one per eager op
  def both(q, k, v, mask):
    bias = alibi_bias(alibi_slopes(4), 5, 7, q_offset=2)
    fused, none = dot_product_attention(q, k, v, mask, bias=bias)
    assert none is None
    return fused, dot_product_attention(q, k, v, mask, bias=bias, return_probs=True)

  fused, (explicit, probs) = both(q, k, v, mask)
  assert probs.shape == (2, 4, 5, 7)
  np.testing.assert_allclose(fused, explicit, atol=1e-5, rtol=1e-5)
