"""LLaMA with FlexAttention layers: plain when no HR tokens are given or none is selected, the static
budget equal to the full block set whenever it holds every selected block, batch rows independent,
and each layer's HR blocks exactly those its predecessor's attention row selects."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from vlm_jax.layers import hierarchical as hl
from vlm_jax.models import llama, llama_flex

# A 4-layer LM over a sequence with a 6 x 6 LR image (36 tokens) and a 12 x 12 HR grid in 3 x 3
# blocks of 4 x 4 tokens: the 7B layout (24 x 24, 72 x 72, 9 x 9 blocks) at toy size.
KW = dict(vocab_size=64, hidden_size=32, num_layers=4, num_heads=4, num_kv_heads=2, mlp_dim=48)
FLEX = dict(flex_start=2, flex_blocks=3, hr_grid=12, num_image_tokens=36, flex_threshold=150.0)
B, T, START, HR = 3, 48, 3, 144


def _inputs(seed=0):
  rng = np.random.default_rng(seed)
  ids = rng.integers(1, 64, (B, T)).astype(np.int32)
  mask = np.ones((B, T), np.int32)
  mask[1, -2:] = 0  # a right-padded row selects from its last real token
  hr = rng.normal(size=(B, HR, 32)).astype(np.float32)
  ang = rng.uniform(0, 6, (B, HR, 4))
  cos = np.concatenate([np.cos(ang)] * 2, -1).astype(np.float32)
  sin = np.concatenate([np.sin(ang)] * 2, -1).astype(np.float32)
  return ids, mask, hr, cos, sin


@pytest.fixture(scope="module")
def setup():
  model = llama_flex.Model(**KW, **FLEX)
  ids, mask, hr, cos, sin = _inputs()
  params = nn.unbox(model.init(jax.random.PRNGKey(0), ids, mask)["params"])
  params = llama_flex.hd_from_kv(params)
  select_row = jnp.array([T - 1, T - 3, T - 1])
  kw = dict(hr=hr, hr_cos=cos, hr_sin=sin, image_start=jnp.full((B,), START),
            select_row=select_row)

  @jax.jit
  def run(params, ids, mask, hr, cos, sin, select_row):
    return model.apply({"params": params}, ids, mask, hr=hr, hr_cos=cos, hr_sin=sin,
                       image_start=jnp.full((ids.shape[0],), START), select_row=select_row)

  return model, params, (ids, mask), kw, run


def test_param_layout_is_llamas_plus_hd_copies(setup):
  _, params, (ids, mask), _, _ = setup
  plain = nn.unbox(llama.Model(**KW).init(jax.random.PRNGKey(0), ids, mask)["params"])
  assert len(jax.tree.leaves(params)) == len(jax.tree.leaves(plain)) + 4 * 2  # k_hd, v_hd kernels
  assert jax.tree.map(jnp.shape, plain["layers_3"]["attn"]) == jax.tree.map(
    jnp.shape, {n: p for n, p in params["layers_3"]["attn"].items() if not n.endswith("_hd")})
  for i in range(4):
    attn = params[f"layers_{i}"]["attn"]
    np.testing.assert_array_equal(attn["k_hd"]["kernel"], attn["k"]["kernel"])
    np.testing.assert_array_equal(attn["v_hd"]["kernel"], attn["v"]["kernel"])


def test_without_hr_it_is_plain_llama(setup):
  model, params, (ids, mask), _, _ = setup
  plain = llama.Model(**KW)
  sub = {k: v for k, v in params.items()}
  sub = {k: ({**v, "attn": {n: p for n, p in v["attn"].items() if not n.endswith("_hd")}}
             if k.startswith("layers_") else v) for k, v in sub.items()}
  want, _ = plain.apply({"params": sub}, ids, mask)
  got, aux = model.apply({"params": params}, ids, mask)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=2e-5, rtol=1e-5)
  assert aux["selections"] == []


def test_nothing_selected_is_plain_and_only_the_select_row_changes(setup):
  model, params, (ids, mask), kw, run = setup
  plain, _ = model.apply({"params": params}, ids, mask)
  none = llama_flex.Model(**KW, **{**FLEX, "flex_threshold": 255.0})
  got, aux = none.apply({"params": params}, ids, mask, **kw)
  np.testing.assert_allclose(np.asarray(got), np.asarray(plain), atol=2e-5, rtol=1e-5)
  assert all(not np.asarray(v).any() for _, v in aux["selections"])
  flex, aux = run(params, ids, mask, kw["hr"], kw["hr_cos"], kw["hr_sin"], kw["select_row"])
  assert all(np.asarray(v).any(axis=1).all() for _, v in aux["selections"])
  diff = np.abs(np.asarray(flex) - np.asarray(plain)).max(-1)  # [B, T]
  rows = np.asarray(kw["select_row"])
  for b in range(B):
    # Causal: positions before the selecting row never see HR tokens; from it on they may (later
    # rows attend to its changed hidden state in the next layers).
    assert diff[b, :rows[b]].max() < 1e-5 and diff[b, rows[b]] > 1e-4


def test_budget_holding_every_selected_block_equals_all_blocks(setup):
  _, params, (ids, mask), kw, run = setup
  full, aux = run(params, ids, mask, kw["hr"], kw["hr_cos"], kw["hr_sin"], kw["select_row"])
  most = max(int(np.asarray(v).sum(1).max()) for _, v in aux["selections"])
  assert 1 < most < 9  # else the budgets below are no test
  small = llama_flex.Model(**KW, **{**FLEX, "flex_budget": most})
  got, _ = small.apply({"params": params}, ids, mask, **kw)
  np.testing.assert_allclose(np.asarray(got), np.asarray(full), atol=1e-5, rtol=1e-5)
  one = llama_flex.Model(**KW, **{**FLEX, "flex_budget": 1})
  if most > 1:
    got, _ = one.apply({"params": params}, ids, mask, **kw)
    assert np.abs(np.asarray(got) - np.asarray(full)).max() > 1e-5


def test_rows_are_independent_and_selections_follow_the_previous_layer(setup):
  model, params, (ids, mask), kw, run = setup
  full, aux = run(params, ids, mask, kw["hr"], kw["hr_cos"], kw["hr_sin"], kw["select_row"])
  for b in range(B):
    one, _ = run(params, ids[b:b + 1], mask[b:b + 1], kw["hr"][b:b + 1], kw["hr_cos"][b:b + 1],
                 kw["hr_sin"][b:b + 1], kw["select_row"][b:b + 1])
    np.testing.assert_allclose(np.asarray(one[0]), np.asarray(full[b]), atol=1e-5, rtol=1e-5)
  # Layer flex_start's blocks are selected from layer flex_start-1's attention row, recomputed
  # here from that layer's inputs by hand.
  from vlm_jax.layers.attention import causal_padding_mask
  _, state = model.apply({"params": params}, ids, mask, **kw, capture_intermediates=True,
                         mutable=["intermediates"])
  inter = state["intermediates"]
  x_in = inter["layers_0"]["__call__"][0][0]  # layer 0 output = layer 1 input
  layer1 = params["layers_1"]
  from vlm_jax.layers.norms import RMSNorm
  h = RMSNorm(KW.get("norm_eps", 1e-6)).apply({"params": layer1["input_norm"]}, x_in)
  q = jnp.einsum("bte,ehd->bthd", h, layer1["attn"]["q"]["kernel"])
  k = jnp.einsum("bte,ehd->bthd", h, layer1["attn"]["k"]["kernel"])
  from vlm_jax.layers.rope import apply_rope
  pos = jnp.broadcast_to(jnp.arange(T), (B, T))
  q, k = apply_rope(q, pos), apply_rope(k, pos)
  bias = jnp.where(causal_padding_mask(jnp.asarray(mask), q_offset=0, num_queries=T), 0.0,
                   hl.NEG_INF)[:, 0]
  rows = np.asarray(kw["select_row"])
  attn = hl.image_attention_row(q[np.arange(B), rows], k, bias[np.arange(B), rows],
                                jnp.full((B,), START), 36)
  sel, score = hl.select_blocks(attn, threshold=150.0, blocks=3)
  index, valid = hl.budget_blocks(sel, score, 9)
  got_index, got_valid = aux["selections"][0]
  np.testing.assert_array_equal(np.asarray(got_valid), np.asarray(valid))
  np.testing.assert_array_equal(np.asarray(got_index)[np.asarray(valid)],
                                np.asarray(index)[np.asarray(valid)])


def _reference(params, ids, mask, hr, cos, sin, row):
  """One sample, the authors' way, in numpy float64: per layer a plain softmax; from layer
  flex_start-1 on, the `row`-th query's head-summed attention over the image keys picks blocks
  (threshold, pooling, nearest upsampling) and the next layer gathers hr[mask] (variable count) as
  extra keys/values for that row only."""
  f64 = lambda a: np.asarray(a, np.float64)  # noqa: E731
  rms = lambda x, w: x / np.sqrt((x * x).mean(-1, keepdims=True) + 1e-6) * f64(w)  # noqa: E731
  t = len(ids)
  inv = 1.0 / (10000.0 ** (np.arange(0, 8, 2) / 8))
  ang = np.arange(t)[:, None] * inv
  rc, rs = np.concatenate([np.cos(ang)] * 2, -1), np.concatenate([np.sin(ang)] * 2, -1)
  rope = lambda x, c, s_: x * c[:, None] + np.concatenate(  # noqa: E731
    [-x[..., 4:], x[..., :4]], -1) * s_[:, None]
  allowed = np.tril(np.ones((t, t), bool)) & (mask[None, :] > 0)
  x = f64(params["embed"]["embedding"])[ids]
  hr_mask = None
  for i in range(4):
    p = params[f"layers_{i}"]
    a = p["attn"]
    h = rms(x, p["input_norm"]["scale"])
    q = rope(np.einsum("te,ehd->thd", h, f64(a["q"]["kernel"])), rc, rs)
    k = rope(np.einsum("te,ehd->thd", h, f64(a["k"]["kernel"])), rc, rs)
    v = np.einsum("te,ehd->thd", h, f64(a["v"]["kernel"]))
    k, v = np.repeat(k, 2, 1), np.repeat(v, 2, 1)
    sc = np.einsum("qhd,khd->hqk", q, k) / np.sqrt(8)
    sc = np.where(allowed[None], sc, -np.inf)
    pr = np.exp(sc - sc.max(-1, keepdims=True))
    pr /= pr.sum(-1, keepdims=True)
    out = np.einsum("hqk,khd->qhd", pr, v)
    if hr_mask is not None and hr_mask.any():
      feats = f64(hr)[hr_mask]
      kh = np.repeat(rope(np.einsum("me,ehd->mhd", feats, f64(a["k_hd"]["kernel"])),
                          f64(cos)[hr_mask], f64(sin)[hr_mask]), 2, 1)
      vh = np.repeat(np.einsum("me,ehd->mhd", feats, f64(a["v_hd"]["kernel"])), 2, 1)
      s2 = np.concatenate([sc[:, row], np.einsum("hd,mhd->hm", q[row], kh) / np.sqrt(8)], -1)
      p2 = np.exp(s2 - s2.max(-1, keepdims=True))
      p2 /= p2.sum(-1, keepdims=True)
      out[row] = np.einsum("hk,khd->hd", p2[:, :t], v) + np.einsum("hm,mhd->hd", p2[:, t:], vh)
    if 2 - 1 <= i < 3:  # flex_start - 1 .. L-2 select for the next layer
      img = pr[:, row, START:START + 36].sum(0).reshape(6, 6)
      img = (img - img.min()) / (img.max() - img.min())
      kept = img * 255 > 150.0
      wins = [(0, 2), (2, 4), (4, 6)]
      blocks = np.array([[kept[r0:r1, c0:c1].any() for c0, c1 in wins] for r0, r1 in wins])
      hr_mask = np.repeat(np.repeat(blocks, 4, 0), 4, 1).reshape(-1)
    x = x + np.einsum("thd,hde->te", out, f64(a["o"]["kernel"]))
    h = rms(x, p["post_attn_norm"]["scale"])
    g = h @ f64(p["mlp"]["gate"]["kernel"])
    x = x + (g / (1 + np.exp(-g)) * (h @ f64(p["mlp"]["up"]["kernel"]))) @ f64(
      p["mlp"]["down"]["kernel"])
  return rms(x, params["norm"]["scale"]) @ f64(params["lm_head"]["kernel"])


def test_equals_the_authors_batch1_gather_in_numpy(setup):
  _, params, (ids, mask), kw, run = setup
  got, aux = run(params, ids, mask, kw["hr"], kw["hr_cos"], kw["hr_sin"], jnp.array([T - 1, T - 3,
                                                                                       T // 2]))
  for b, row in enumerate([T - 1, T - 3, T // 2]):
    want = _reference(params, ids[b], mask[b], kw["hr"][b], kw["hr_cos"][b], kw["hr_sin"][b], row)
    real = mask[b] > 0
    np.testing.assert_allclose(np.asarray(got[b])[real], want[real], atol=2e-4, rtol=1e-4)


def test_bad_fields_fail_naming_them():
  with pytest.raises(ValueError, match="flex_start"):
    llama_flex.Model(**KW, **{**FLEX, "flex_start": 4})
  with pytest.raises(ValueError, match="flex_budget"):
    llama_flex.Model(**KW, **{**FLEX, "flex_budget": 10})


def test_cached_decoding_equals_the_uncached_forward(setup):
  """Prefill (KV caches filled, each FlexAttention layer's HR keys/values for the prefill's
  selection cached), then one token at a time with no HR features at all: equal to one uncached
  forward in which every row from the prompt's last on sees the prefill's selection."""
  _, params, (ids, _), kw, _ = setup
  model = llama_flex.Model(**KW, **FLEX, hr_rows="from_select_row")
  tp, new = T - 4, 4
  full_mask = jnp.ones((B, T), jnp.int32)
  hr = dict(hr=kw["hr"], hr_cos=kw["hr_cos"], hr_sin=kw["hr_sin"], image_start=kw["image_start"])
  want, want_aux = model.apply({"params": params}, ids, full_mask, **hr,
                               select_row=jnp.full((B,), tp - 1))
  caches = model.init_caches(B, T)
  logits, aux = model.apply({"params": params}, ids[:, :tp], full_mask, caches=caches, **hr,
                            select_row=jnp.full((B,), tp - 1))
  np.testing.assert_allclose(np.asarray(logits), np.asarray(want[:, :tp]), atol=2e-5, rtol=1e-5)
  assert len(aux["hr_cache"]) == KW["num_layers"] - FLEX["flex_start"]
  step = jax.jit(lambda c, h, x: model.apply({"params": params}, x, full_mask, caches=c,
                                             hr_cache=h))
  for j in range(new):
    logits, aux = step(aux["caches"], aux["hr_cache"], ids[:, tp + j:tp + j + 1])
    np.testing.assert_allclose(np.asarray(logits[:, 0]), np.asarray(want[:, tp + j]), atol=2e-5,
                               rtol=1e-5)
  # The HR path mattered: the same decode without the cached HR keys differs.
  plain, _ = model.apply({"params": params}, ids, full_mask)
  assert np.abs(np.asarray(plain[:, tp:]) - np.asarray(want[:, tp:])).max() > 1e-4
  for (idx, valid), (k_hd, v_hd, slot_valid) in zip(want_aux["selections"], aux["hr_cache"]):
    assert k_hd.shape[1] == slot_valid.shape[1] == idx.shape[1] * 16
    np.testing.assert_array_equal(np.asarray(slot_valid), np.repeat(np.asarray(valid), 16, 1))
