"""FlexAttention's selection and hierarchical attention against the authors' operations written in
PyTorch in this file (reference/flex_inf.md §1.4-1.5): the mask of planted attention rows (threshold,
margins, overlapping pooling windows), zero selected == plain attention, everything selected ==
attention over the concatenated keys, and the static budgeted batch == the batch-1 boolean gather."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vlm_jax.layers import hierarchical as hl

torch = pytest.importorskip("torch")
F = torch.nn.functional


def torch_selection(attn_heads: np.ndarray, ori_size, threshold=48.0) -> np.ndarray:
  """The authors' steps on [H, 576] probabilities of one row: head sum, margins, min-max,
  *255 > threshold, adaptive max-pool to 9x9, nearest to 72x72 -> bool[5184]."""
  a = torch.tensor(attn_heads).sum(0).reshape(24, 24)
  w, h = ori_size
  num = int((abs(w - h) // 2) / max(w, h) * 24)
  if num:
    if w > h:
      a[:num] = 0
      a[-num:] = 0
    else:
      a[:, :num] = 0
      a[:, -num:] = 0
  a = (a - a.min()) / (a.max() - a.min())
  mask = (a * 255 > threshold).float()[None, None]
  mask = F.adaptive_max_pool2d(mask, (9, 9))
  mask = F.interpolate(mask, size=72, mode="nearest")
  return mask.bool().reshape(-1).numpy()


def _planted_row(rng, peaks, heads=4):
  """[H, 576] probabilities: small noise plus mass on the given (row, col) cells."""
  a = rng.uniform(0.0, 0.01, (heads, 24, 24))
  for r, c in peaks:
    a[:, r, c] += 1.0
  a = a / a.sum(axis=(1, 2), keepdims=True)
  return a.reshape(heads, 576).astype(np.float32)


def _ours(attn_heads, ori_size, threshold=48.0):
  num, axis = hl.margin_patches(*ori_size)
  sel, score = hl.select_blocks(jnp.asarray(attn_heads.sum(0))[None], threshold=threshold,
                                margins=hl.margin_mask(jnp.array([num]), jnp.array([axis])))
  return np.asarray(sel[0]), np.asarray(score[0])


def test_pool_windows_overlap_like_torch():
  wins = hl.pool_windows(24, 9)
  assert wins[:3] == [(0, 3), (2, 6), (5, 8)] and wins[-1] == (21, 24)
  x = torch.arange(24.0)[None, None, :, None].expand(1, 1, 24, 1)
  want = F.adaptive_max_pool2d(x, (9, 1)).reshape(-1).numpy()
  np.testing.assert_array_equal(want, [e - 1 for _, e in wins])


@pytest.mark.parametrize("peaks, ori_size, blocks", [
  ([(0, 0)], (1008, 1008), [0]),
  # Row 2 lies in windows 0 ([0,3)) and 1 ([2,6)): two block rows for one cell.
  ([(2, 12)], (1008, 1008), [4, 13]),
  ([(2, 2), (23, 23)], (1008, 1008), [0, 1, 9, 10, 80]),
  # A 4:3 landscape image: margin rows 0..2 and 21..23 are zeroed, so the peak at row 1 is ignored.
  ([(1, 12), (12, 12)], (1200, 900), [40]),
  # Portrait: columns are the margin.
  ([(12, 1), (5, 12)], (600, 1000), [13, 22]),  # row 5: windows [2,6) and [5,8)
])
def test_planted_rows_select_the_expected_blocks(peaks, ori_size, blocks):
  a = _planted_row(np.random.default_rng(0), peaks)
  sel, score = _ours(a, ori_size)
  assert sorted(np.flatnonzero(sel).tolist()) == blocks
  want = torch_selection(a, ori_size)
  np.testing.assert_array_equal(np.asarray(hl.blocks_to_tokens(jnp.asarray(sel))), want)
  assert np.all(score[sel] > 48 / 255) and np.all(score[~sel] < 0)


def test_threshold_is_strict_and_random_rows_match_torch():
  rng = np.random.default_rng(1)
  for i in range(20):
    a = rng.dirichlet(np.full(576, 0.3), size=3).astype(np.float32)
    size = [(1008, 1008), (1300, 700), (500, 900)][i % 3]
    np.testing.assert_array_equal(np.asarray(hl.blocks_to_tokens(jnp.asarray(_ours(a, size)[0]))),
                                  torch_selection(a, size))
  # A cell at exactly threshold/255 after min-max is not kept: values 0, 48/255, 1.
  a = np.zeros((1, 576), np.float32)
  a[0, 0], a[0, 300] = 1.0, 48 / 255
  sel, _ = _ours(a, (1008, 1008))
  assert np.flatnonzero(sel).tolist() == [0]
  flat, _ = _ours(np.full((1, 576), 1 / 576, np.float32), (1008, 1008))
  assert not flat.any()


def test_block_token_index_and_gather():
  idx = jnp.array([[0, 10, 80]])
  tok = np.asarray(hl.block_token_index(idx))[0].reshape(3, 64)
  grid = np.arange(72 * 72).reshape(72, 72)
  np.testing.assert_array_equal(tok[0], grid[:8, :8].reshape(-1))
  np.testing.assert_array_equal(tok[1], grid[8:16, 8:16].reshape(-1))
  np.testing.assert_array_equal(tok[2], grid[64:, 64:].reshape(-1))
  hr = jnp.asarray(np.random.default_rng(0).normal(size=(1, 5184, 5)).astype(np.float32))
  np.testing.assert_array_equal(np.asarray(hl.gather_blocks(hr, idx))[0], np.asarray(hr)[0, tok.reshape(-1)])
  mask = np.zeros(81, bool)
  mask[[0, 10, 80]] = True
  np.testing.assert_array_equal(np.flatnonzero(np.asarray(hl.blocks_to_tokens(jnp.asarray(mask)))),
                                np.sort(tok.reshape(-1)))


def test_image_attention_row_equals_the_full_softmax_slice():
  rng = np.random.default_rng(2)
  b, t, h, kv, d, start, n = 2, 40, 4, 2, 8, 5, 16
  q = rng.normal(size=(b, h, d)).astype(np.float32)
  k = rng.normal(size=(b, t, kv, d)).astype(np.float32)
  bias = np.zeros((b, t), np.float32)
  bias[1, :3] = -1e30  # left padding of row 1
  got = hl.image_attention_row(jnp.asarray(q), jnp.asarray(k), jnp.asarray(bias),
                               jnp.array([start, start + 2]), n)
  kk = np.repeat(k, h // kv, axis=2)
  s = np.einsum("bhd,bthd->bht", q, kk) / math.sqrt(d) + bias[:, None]
  p = np.exp(s - s.max(-1, keepdims=True))
  p = p / p.sum(-1, keepdims=True)
  want = np.stack([p[0, :, start:start + n].sum(0), p[1, :, start + 2:start + 2 + n].sum(0)])
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-7)


def torch_hier(q, k, v, causal_bias, k_hd, v_hd, select_rows, alpha):
  """The authors' inference/training arithmetic for one sample: two softmaxes over one score
  matrix [H, Tq, Tk+M] with masks (a) HR all masked, (b) HR visible; rows in `select_rows` blend."""
  q, k, v, k_hd, v_hd = (torch.tensor(x) for x in (q, k, v, k_hd, v_hd))
  h, kv = q.shape[1], k.shape[1]
  k = k.repeat_interleave(h // kv, 1)
  v = v.repeat_interleave(h // kv, 1)
  k_hd = k_hd.repeat_interleave(h // kv, 1)
  v_hd = v_hd.repeat_interleave(h // kv, 1)
  keys = torch.cat([k, k_hd], 0).permute(1, 0, 2)
  vals = torch.cat([v, v_hd], 0).permute(1, 0, 2)
  s = q.permute(1, 0, 2) @ keys.transpose(1, 2) / math.sqrt(q.shape[-1])
  m = k_hd.shape[0]
  base = torch.tensor(causal_bias)
  empty = torch.cat([base, torch.full((base.shape[0], m), -65504.0)], 1)
  select = torch.cat([base, torch.zeros(base.shape[0], m)], 1)
  out_a = torch.softmax(s + empty, -1) @ vals
  out_b = torch.softmax(s + select, -1) @ vals
  out = out_a.clone()
  out[:, select_rows] = (1 - alpha) * out_a[:, select_rows] + alpha * out_b[:, select_rows]
  return out.permute(1, 0, 2).numpy()


@pytest.fixture(scope="module")
def attn_case():
  rng = np.random.default_rng(3)
  b, t, h, kv, d = 3, 12, 4, 2, 8
  q = rng.normal(size=(b, t, h, d)).astype(np.float32)
  k = rng.normal(size=(b, t, kv, d)).astype(np.float32)
  v = rng.normal(size=(b, t, kv, d)).astype(np.float32)
  causal = np.where(np.tril(np.ones((t, t), bool)), 0.0, -1e30).astype(np.float32)
  hr_k = rng.normal(size=(b, 5184, kv, d)).astype(np.float32)
  hr_v = rng.normal(size=(b, 5184, kv, d)).astype(np.float32)
  fn = jax.jit(hl.hierarchical_attention)
  return dict(q=q, k=k, v=v, causal=causal, hr_k=hr_k, hr_v=hr_v, fn=fn, b=b, t=t)


def test_zero_selected_is_plain_attention(attn_case):
  c = attn_case
  m = 128
  out = c["fn"](c["q"], c["k"], c["v"], jnp.broadcast_to(c["causal"], (c["b"], 1, c["t"], c["t"])),
                c["hr_k"][:, :m], c["hr_v"][:, :m], jnp.zeros((c["b"], c["t"], m), bool))
  for i in range(c["b"]):
    want = torch_hier(c["q"][i], c["k"][i], c["v"][i], c["causal"], c["hr_k"][i, :0],
                      c["hr_v"][i, :0], [], 1.0)
    np.testing.assert_allclose(np.asarray(out[i]), want, rtol=1e-5, atol=1e-5)


def test_all_selected_is_attention_over_the_concatenated_keys(attn_case):
  c = attn_case
  m = 5184
  valid = jnp.zeros((c["b"], c["t"], m), bool).at[:, -1].set(True)  # the last row selects all
  for alpha in (1.0, 0.3):
    out = c["fn"](c["q"], c["k"], c["v"], jnp.broadcast_to(c["causal"], (c["b"], 1, c["t"], c["t"])),
                  c["hr_k"], c["hr_v"], valid, alpha)
    for i in range(c["b"]):
      want = torch_hier(c["q"][i], c["k"][i], c["v"][i], c["causal"], c["hr_k"][i], c["hr_v"][i],
                        [c["t"] - 1], alpha)
      np.testing.assert_allclose(np.asarray(out[i]), want, rtol=1e-4, atol=1e-5)


def test_static_budget_batch_equals_the_batch1_gather(attn_case):
  """Per sample, the authors' inference path: mask from the last row, hd[mask] (variable M), HR
  keys only for the last row. Ours: a batch with a fixed budget of 12 blocks, padded."""
  c = attn_case
  rng = np.random.default_rng(4)
  peaks = [[(3, 3)], [(3, 3), (20, 5), (12, 12)], [(0, 23), (23, 0)]]
  attn = np.stack([_planted_row(rng, p).sum(0) for p in peaks])
  sel, score = hl.select_blocks(jnp.asarray(attn))
  idx, valid = hl.budget_blocks(sel, score, 12)
  assert np.asarray(valid).sum(1).tolist() == np.asarray(sel).sum(1).tolist()
  k_sel = hl.gather_blocks(jnp.asarray(c["hr_k"]), idx)   # [B, 12*64, KV, D]
  v_sel = hl.gather_blocks(jnp.asarray(c["hr_v"]), idx)
  slot_valid = jnp.repeat(valid, 64, axis=1)              # [B, 768]
  rows = jnp.zeros((c["b"], c["t"], 1), bool).at[:, -1].set(True)
  out = c["fn"](c["q"], c["k"], c["v"], jnp.broadcast_to(c["causal"], (c["b"], 1, c["t"], c["t"])),
                k_sel, v_sel, rows & slot_valid[:, None, :])
  for i in range(c["b"]):
    mask = np.asarray(hl.blocks_to_tokens(sel[i]))
    want = torch_hier(c["q"][i], c["k"][i], c["v"][i], c["causal"], c["hr_k"][i][mask],
                      c["hr_v"][i][mask], [c["t"] - 1], 1.0)
    np.testing.assert_allclose(np.asarray(out[i]), want, rtol=1e-4, atol=1e-5)
  # Rows other than the last are plain attention; the HR keys changed only the last row.
  plain = c["fn"](c["q"], c["k"], c["v"], jnp.broadcast_to(c["causal"], (c["b"], 1, c["t"], c["t"])),
                  k_sel, v_sel, jnp.zeros_like(rows & slot_valid[:, None, :]))
  np.testing.assert_array_equal(np.asarray(out[:, :-1]), np.asarray(plain[:, :-1]))
  assert np.abs(np.asarray(out[:, -1]) - np.asarray(plain[:, -1])).max() > 1e-3


def test_budget_keeps_the_highest_scoring_blocks():
  sel = jnp.array([[True, False, True, True, False]])
  score = jnp.array([[0.5, 0.9, 1.0, 0.2, -1.0]])
  idx, valid = hl.budget_blocks(sel, score, 2)
  assert np.asarray(idx).tolist() == [[2, 0]] and np.asarray(valid).tolist() == [[True, True]]
  idx, valid = hl.budget_blocks(sel, score, 4)
  assert np.asarray(idx)[0, :3].tolist() == [2, 0, 3] and np.asarray(valid).tolist() == [
    [True, True, True, False]]


def test_hr_rope_tables_are_torch_bicubic_of_the_lr_span():
  cos, sin = hl.hr_rope_tables(jnp.array([5, 40]), 576, 16)
  inv = 1.0 / (10000.0 ** (np.arange(0, 16, 2) / 16))
  for b, start in enumerate([5, 40]):
    ang = (start + np.arange(576))[:, None] * inv
    for got, fn in ((cos, np.cos), (sin, np.sin)):
      lr = torch.tensor(np.concatenate([fn(ang)] * 2, -1).reshape(24, 24, 16)).permute(2, 0, 1)
      want = F.interpolate(lr[None], size=72, mode="bicubic", align_corners=False)[0]
      np.testing.assert_allclose(np.asarray(got[b]), want.permute(1, 2, 0).reshape(5184, 16).numpy(),
                                 atol=1e-5)
  # Values, not positions, are interpolated: the tables are not unit rotations (as the authors').
  assert np.abs(np.asarray(cos) ** 2 + np.asarray(sin) ** 2 - 1).max() > 1e-2
