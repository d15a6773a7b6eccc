"""Attention Prompting on Image: the CLS-row decomposition against a brute-force per-token one and
against a PyTorch re-implementation of the authors' projected-residual-stream pipeline on a tiny
transformers CLIPModel; the post-processing against hand-worked values and torch's replicate-padded
conv; the blend and the geometry; the LLaVA attribution from our KV-cached decode against
transformers' eager attention of one full (uncached) forward, with left padding and a stop token."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from tests.prompting import checkpoints as ck  # noqa: E402
from vlm_jax.convert import load_hf_llava  # noqa: E402
from vlm_jax.eval.generate import generate  # noqa: E402
from vlm_jax.layers.attention import SelfAttention  # noqa: E402
from vlm_jax.prompting import api, maps  # noqa: E402
from vlm_jax.prompting.clip_model import load_hf_clip  # noqa: E402

PIXELS = np.random.default_rng(0).normal(size=(2, 48, 48, 3)).astype(np.float32)
TEXT_IDS = np.array([[48, 2, 3, 4, 5, 6, 10, 49, 0, 0, 0, 0],
                     [48, 8, 11, 49, 0, 0, 0, 0, 0, 0, 0, 0]], np.int64)


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
  path = str(tmp_path_factory.mktemp("clip"))
  hf = ck.save_clip(path, torch, transformers)
  model, params = load_hf_clip(path)
  return hf, model, params


def test_clip_embeddings_match_transformers(clip):
  hf, model, params = clip
  img, txt, _ = model.apply({"params": params}, jnp.asarray(PIXELS), jnp.asarray(TEXT_IDS))
  with torch.no_grad():
    ref_img = hf.get_image_features(pixel_values=torch.tensor(PIXELS.transpose(0, 3, 1, 2)))
    ref_txt = hf.get_text_features(input_ids=torch.tensor(TEXT_IDS))
  ref_img = getattr(ref_img, "pooler_output", ref_img).numpy()
  ref_txt = getattr(ref_txt, "pooler_output", ref_txt).numpy()
  np.testing.assert_allclose(np.asarray(img), ref_img, atol=1e-5, rtol=1e-5)
  np.testing.assert_allclose(np.asarray(txt), ref_txt, atol=1e-5, rtol=1e-5)


def _brute_force(x, layer, eps):
  """Every query's per-source-token attention output, float64 [B, N(query), N(source), D]."""
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), layer)
  x = np.asarray(x, np.float64)
  mu, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
  h = (x - mu) / np.sqrt(var + eps) * p["norm1"]["scale"] + p["norm1"]["bias"]
  a = p["attn"]
  q, k, v = (np.einsum("bnd,dhk->bnhk", h, a[n]["kernel"]) + a[n]["bias"] for n in "qkv")
  logits = np.einsum("bihk,bjhk->bhij", q, k) / math.sqrt(q.shape[-1])
  probs = np.exp(logits - logits.max(-1, keepdims=True))
  probs /= probs.sum(-1, keepdims=True)
  per_head = np.einsum("bhij,bjhk,hkd->bijhd", probs, v, a["o"]["kernel"])
  return per_head.sum(3) + a["o"]["bias"] / x.shape[1]


@pytest.mark.parametrize("layer", [0, 1])
def test_cls_row_equals_brute_force_and_sums_to_the_attention_output(clip, layer):
  _, model, params = clip
  _, _, aux = model.apply({"params": params}, jnp.asarray(PIXELS), None)
  x = aux["vision"]["hidden_states"][layer]
  lp = params["vision"][f"layers_{layer}"]
  fast = np.asarray(api.cls_contributions(x, lp))
  brute = _brute_force(x, lp, 1e-5)
  assert fast.shape == (2, 37, 32)
  np.testing.assert_allclose(fast, brute[:, 0], atol=1e-5, rtol=1e-5)
  # The contributions add up to what the block's attention writes at CLS.
  h = np.asarray(x, np.float64)
  h = (h - h.mean(-1, keepdims=True)) / np.sqrt(h.var(-1, keepdims=True) + 1e-5)
  h = h * np.asarray(lp["norm1"]["scale"]) + np.asarray(lp["norm1"]["bias"])
  out, _ = SelfAttention(4, 8, qkv_bias=True, out_bias=True, rope_theta=None).apply(
    {"params": lp["attn"]}, jnp.asarray(h, jnp.float32), None)
  np.testing.assert_allclose(fast.sum(1), np.asarray(out)[:, 0], atol=1e-5, rtol=1e-5)
  # Not a tautology: the CLS row is not any other query's row.
  assert np.abs(brute[:, 0] - brute[:, 5]).max() > 1e-2


def _torch_reference_maps(hf, pixels, ids, layer, coe, k):
  """The authors' pipeline in torch, from the equations: PRS projection with the CLS token's
  final-LN statistics (K = 2L - 1 intermediates, N tokens), then merge_mask."""
  vm = hf.vision_model
  with torch.no_grad():
    out = vm(pixel_values=torch.tensor(pixels.transpose(0, 3, 1, 2)), output_hidden_states=True)
    hs = out.hidden_states
    x, blk = hs[layer], vm.encoder.layers[layer]
    h = blk.layer_norm1(x)
    b, n, d = h.shape
    heads, dh = 4, d // 4
    q = blk.self_attn.q_proj(h[:, :1]).view(b, 1, heads, dh)
    kk = blk.self_attn.k_proj(h).view(b, n, heads, dh)
    v = blk.self_attn.v_proj(h).view(b, n, heads, dh)
    a = torch.softmax(torch.einsum("bqhk,bnhk->bhn", q, kk) / math.sqrt(dh), -1)
    w_o = blk.self_attn.out_proj.weight.view(d, heads, dh)  # [out, h, k]
    c = torch.einsum("bhn,bnhk,dhk->bnd", a, v, w_o) + blk.self_attn.out_proj.bias / n
    r = hs[-1][:, 0]  # the final CLS residual, before post_layernorm
    mu = r.mean(-1)[:, None, None]
    sigma = torch.sqrt(r.var(-1, unbiased=False) + 1e-5)[:, None, None]
    ln = vm.post_layernorm
    big_k = 2 * len(vm.encoder.layers) - 1
    proj = hf.visual_projection.weight.T
    norm = hf.get_image_features(pixel_values=torch.tensor(pixels.transpose(0, 3, 1, 2)))
    norm = getattr(norm, "pooler_output", norm).norm(dim=-1)[:, None, None]
    attn = (((c - mu / (big_k * n)) * ln.weight / sigma + ln.bias / (big_k * n)) @ proj) / norm
    z = hs[layer + 1][:, 1:]
    mlps = (((z - mu / big_k) * ln.weight / sigma + ln.bias / big_k) @ proj) / norm
    t = hf.get_text_features(input_ids=torch.tensor(ids))
    t = torch.nn.functional.normalize(getattr(t, "pooler_output", t), dim=-1)
    g = int(math.sqrt(n - 1))
    cls_map = torch.einsum("bnd,bd->bn", attn[:, 1:], t).view(b, g, g)
    comp_map = torch.einsum("bnd,bd->bn", mlps, t).view(b, g, g)

    def norm_min(m):
      return (m - m.min()) / (m.max() - m.min())

    def norm_max(m):
      return (m.max() - m) / (m.max() - m.min())

    conv = torch.nn.Conv2d(1, 1, k, padding=(k - 1) // 2, padding_mode="replicate", bias=False)
    conv.weight.data = torch.ones_like(conv.weight.data) / k**2
    merged = []
    for cm, pm in zip(cls_map, comp_map):
      cm = torch.sigmoid(coe * (norm_min(cm) - norm_min(cm).mean()) / norm_min(cm).std())
      cm = conv(cm.clamp(0, 1)[None])[0]
      pm = conv(norm_max(pm)[None])[0]
      merged.append(norm_min(cm + pm - cm * pm))
  return cls_map.numpy(), comp_map.numpy(), torch.stack(merged).numpy()


@pytest.mark.parametrize("layer,coe,k", [(1, 5.0, 3), (0, 1.0, 1)])
def test_clip_maps_equal_torch_prs_reference(clip, layer, coe, k):
  hf, model, params = clip
  ref_cls, ref_comp, ref_map = _torch_reference_maps(hf, PIXELS, TEXT_IDS, layer, coe, k)
  out = api.clip_attribution(model, params, PIXELS, TEXT_IDS, layers=layer, enhance_coe=coe,
                             kernel_size=k)
  assert out["map"].shape == (2, 6, 6)
  mm = np.asarray(maps.minmax(jnp.asarray(ref_cls)))
  np.testing.assert_allclose(np.asarray(maps.minmax(out["cls"])), mm, atol=1e-5)
  np.testing.assert_allclose(np.asarray(maps.minmax(out["comp"])),
                             np.asarray(maps.minmax(jnp.asarray(ref_comp))), atol=1e-5)
  np.testing.assert_allclose(np.asarray(out["map"]), ref_map, atol=1e-5)
  # A negative index counts from the end.
  again = api.clip_scores(model, params, PIXELS, TEXT_IDS, layers=layer - 3)
  np.testing.assert_allclose(np.asarray(again[0]), np.asarray(out["cls"]), atol=1e-6)


def test_clip_multi_layer_sum_and_errors(clip):
  _, model, params = clip
  a = api.clip_scores(model, params, PIXELS, TEXT_IDS, layers=(0,))[0]
  b = api.clip_scores(model, params, PIXELS, TEXT_IDS, layers=(1,))[0]
  both, comp = api.clip_scores(model, params, PIXELS, TEXT_IDS, layers=(0, 1))
  np.testing.assert_allclose(np.asarray(both), np.asarray(a + b), atol=1e-5)
  np.testing.assert_allclose(np.asarray(comp),
                             np.asarray(api.clip_scores(model, params, PIXELS, TEXT_IDS,
                                                        layers=1)[1]), atol=1e-6)
  with pytest.raises(ValueError, match="layer 3 is out of range for a model with 3 layers"):
    api.clip_scores(model, params, PIXELS, TEXT_IDS, layers=3)


# -------------------------------------------------------------------------------------------------
# Post-processing, hand-worked.


def test_box_filter_uses_edge_padding():
  x = jnp.asarray([[0.0, 0.0, 9.0]])
  np.testing.assert_allclose(np.asarray(maps.box_filter(x, 3)), [[0.0, 3.0, 6.0]], atol=1e-6)
  x = jnp.asarray([[1.0, 2.0], [3.0, 4.0]])
  np.testing.assert_allclose(np.asarray(maps.box_filter(x, 3)),
                             [[18 / 9, 21 / 9], [24 / 9, 27 / 9]], atol=1e-6)
  np.testing.assert_array_equal(np.asarray(maps.box_filter(x, 1)), np.asarray(x))
  with pytest.raises(ValueError, match="odd"):
    maps.box_filter(x, 4)


@pytest.mark.parametrize("k", [3, 5, 7])
def test_box_filter_equals_torch_replicate_conv(k):
  x = np.random.default_rng(k).random((3, 9, 9)).astype(np.float32)
  conv = torch.nn.Conv2d(1, 1, k, padding=(k - 1) // 2, padding_mode="replicate", bias=False)
  conv.weight.data = torch.ones_like(conv.weight.data) / k**2
  with torch.no_grad():
    ref = conv(torch.tensor(x)[:, None])[:, 0].numpy()
  np.testing.assert_allclose(np.asarray(maps.box_filter(jnp.asarray(x), k)), ref, atol=1e-6)


def test_minmax_soft_or_enhance_hand_values():
  x = jnp.asarray([[1.0, 3.0], [5.0, 9.0]])
  np.testing.assert_allclose(np.asarray(maps.minmax(x)), [[0, 0.25], [0.5, 1]], atol=1e-7)
  np.testing.assert_allclose(np.asarray(maps.inverted_minmax(x)), [[1, 0.75], [0.5, 0]],
                             atol=1e-7)
  np.testing.assert_allclose(np.asarray(maps.soft_or(jnp.asarray([0.5, 1.0, 0.0]),
                                                     jnp.asarray([0.5, 0.3, 0.3]))),
                             [0.75, 1.0, 0.3], atol=1e-7)
  # z-score with the unbiased std of (0, 1, 2, 3): sqrt(5 / 3); coe 2.
  std = math.sqrt(5 / 3)
  want = [[1 / (1 + math.exp(-2 * (v - 1.5) / std)) for v in row] for row in ((0, 1), (2, 3))]
  got = maps.enhance(jnp.asarray([[0.0, 1.0], [2.0, 3.0]]), 2.0)
  np.testing.assert_allclose(np.asarray(got), want, atol=1e-6)
  assert abs(want[0][0] - 0.08917) < 1e-4  # sigmoid(-2.3238)
  # Per map in a batch; a constant map is 0 (minmax) / 0.5 (enhance), not NaN.
  batch = jnp.stack([x, jnp.full((2, 2), 4.0)])
  np.testing.assert_allclose(np.asarray(maps.minmax(batch))[1], 0.0)
  np.testing.assert_allclose(np.asarray(maps.minmax(batch))[0], [[0, 0.25], [0.5, 1]], atol=1e-7)
  np.testing.assert_allclose(np.asarray(maps.enhance(batch, 5.0))[1], 0.5)


def test_clip_and_llava_postprocess_compose_the_steps():
  rng = np.random.default_rng(1)
  cls, comp = (jnp.asarray(rng.normal(size=(2, 6, 6)), jnp.float32) for _ in range(2))
  c = maps.box_filter(maps.enhance(maps.minmax(cls), 10.0), 7)
  p = maps.box_filter(maps.inverted_minmax(comp), 7)
  merged = np.asarray(maps.clip_postprocess(cls, comp, enhance_coe=10.0, kernel_size=7))
  np.testing.assert_allclose(merged, np.asarray(maps.minmax(c + p - c * p)), atol=1e-6)
  assert merged.min() == 0.0 and abs(merged.max() - 1.0) < 1e-6
  np.testing.assert_allclose(np.asarray(maps.llava_postprocess(cls, enhance_coe=10.0,
                                                               kernel_size=7)),
                             np.asarray(c), atol=1e-6)


# -------------------------------------------------------------------------------------------------
# Map -> image.


def test_blend_gray_zero_is_pixel_multiplication_and_floor():
  rng = np.random.default_rng(2)
  img = rng.integers(0, 256, (2, 7, 9, 3), dtype=np.uint8)
  m = rng.random((2, 7, 9)).astype(np.float32)
  out = np.asarray(jax.jit(lambda i, m: maps.blend(i, m, gray=0.0))(img, m))
  np.testing.assert_array_equal(out, (img.astype(np.float32) * m[..., None]).astype(np.uint8))
  assert (out <= img).all() and out.dtype == np.uint8
  np.testing.assert_array_equal(np.asarray(maps.blend(img, np.zeros((2, 7, 9)), gray=200.0)),
                                np.full_like(img, 200))
  np.testing.assert_array_equal(np.asarray(maps.blend(img, np.ones((2, 7, 9)), gray=200.0)), img)
  floored = np.asarray(maps.blend(img, np.zeros((2, 7, 9)), floor=0.25))
  np.testing.assert_array_equal(floored, (img.astype(np.float32) * 0.25).astype(np.uint8))
  # The authors' `merge` (float64 gray plane) differs by at most the last truncated level.
  mask_u8 = (m * 255).astype(np.uint8)
  ref = (img.astype(np.float32) * (mask_u8 / np.float32(255))[..., None]
         + (1 - (mask_u8 / np.float32(255))[..., None]) * np.ones(img.shape) * 200).astype(np.uint8)
  ours = np.asarray(maps.blend(img, mask_u8 / 255.0, gray=200.0))
  assert np.abs(ours.astype(int) - ref.astype(int)).max() <= 1


def test_mask_geometry_reference_and_aligned():
  psi = np.repeat(np.array([0.0, 1 / 3, 2 / 3, 1.0])[:, None], 4, 1)  # row r = r / 3
  # LLaVA pads a 40 x 20 image to a 40 x 40 square: the image is square rows 10..29.
  box = maps.pad_box(40, 20)
  assert box == maps.Box(0, -10, 40, 40)
  ref = maps.mask_for_image(psi, 40, 20, method="nearest")
  aligned = maps.mask_for_image(psi, 40, 20, method="nearest", geometry="aligned", box=box)
  np.testing.assert_array_equal(ref[:, 0], np.repeat([0, 85, 170, 255], 5))
  np.testing.assert_array_equal(aligned[:, 0], np.repeat([85, 170], 10))
  # CLIP centre-crops a 40 x 20 image to its middle 20 x 20: columns 10..29.
  box = maps.crop_box(40, 20, 20)
  assert box == maps.Box(10.0, 0.0, 20.0, 20.0)
  cols = psi.T
  aligned = maps.mask_for_image(cols, 40, 20, method="nearest", geometry="aligned", box=box)
  np.testing.assert_array_equal(aligned[0], np.repeat([0, 0, 85, 170, 255, 255], [10, 5, 5, 5, 5,
                                                                                  10]))
  filled = maps.mask_for_image(cols, 40, 20, method="nearest", geometry="aligned", box=box,
                               outside=1.0)
  np.testing.assert_array_equal(filled[0], np.repeat([255, 0, 85, 170, 255, 255],
                                                     [10, 5, 5, 5, 5, 10]))
  # Truncation to uint8 as ToPILImage: 0.999 -> 254.
  assert maps.map_to_uint8(np.array([[0.999, 0.5]])).tolist() == [[254, 127]]
  with pytest.raises(ValueError, match="needs the box"):
    maps.mask_for_image(psi, 40, 20, geometry="aligned")


# -------------------------------------------------------------------------------------------------
# LLaVA.

P, T, M = 16, 24, 6
LLAVA_IDS = np.array([[1, 5, 7] + [ck.LLAVA_IMAGE] * P + [11, 12, 13, 14, 15],
                      [0, 0, 0, 1] + [ck.LLAVA_IMAGE] * P + [21, 22, 23, 24]], np.int32)
LLAVA_MASK = (np.arange(T)[None] >= np.array([[0], [3]])).astype(np.int32)
LLAVA_PIXELS = np.random.default_rng(3).normal(size=(2, 32, 32, 3)).astype(np.float32)


@pytest.fixture(scope="module")
def llava(tmp_path_factory):
  path = str(tmp_path_factory.mktemp("llava"))
  hf = ck.save_llava(path, torch, transformers)
  hf.set_attn_implementation("eager")
  model, params = load_hf_llava(path)
  return hf, model, params


def _torch_rows(hf, tokens, layer):
  """One full forward over prompt + answer (no cache): per row and step, the head-mean attention
  over the image keys renormalised within them, from transformers' eager probabilities."""
  full = np.concatenate([LLAVA_IDS, tokens[:, :M - 1]], 1)
  mask = np.concatenate([LLAVA_MASK, np.ones((2, M - 1), np.int32)], 1)
  pos = np.maximum(np.cumsum(mask, -1) - 1, 0)
  with torch.no_grad():
    out = hf(input_ids=torch.tensor(full, dtype=torch.long),
             pixel_values=torch.tensor(LLAVA_PIXELS.transpose(0, 3, 1, 2)),
             attention_mask=torch.tensor(mask), position_ids=torch.tensor(pos),
             output_attentions=True)
  probs = out.attentions[layer].numpy()  # [B, H, T', T']
  rows = []
  for b in range(2):
    img = np.flatnonzero(LLAVA_IDS[b] == ck.LLAVA_IMAGE)
    r = probs[b, :, T - 1:T - 1 + M][:, :, img]
    rows.append((r / r.sum(-1, keepdims=True)).mean(0))  # [M, P]
  greedy = out.logits[:, T - 1:].argmax(-1).numpy()
  return np.stack(rows), greedy


@pytest.mark.parametrize("layer", [1, -1])
def test_llava_cached_attribution_equals_uncached_torch(llava, layer):
  hf, model, params = llava
  out = api.llava_attribution(model, params, LLAVA_PIXELS, LLAVA_IDS, LLAVA_MASK, layer=layer,
                              max_new_tokens=M)
  tokens = np.asarray(out["tokens"])
  rows, greedy = _torch_rows(hf, tokens, layer % 3)
  np.testing.assert_array_equal(greedy, tokens)  # the uncached argmax continues the same text
  ref_tokens = generate(model, params, LLAVA_IDS, LLAVA_MASK, max_new_tokens=M,
                        images=jnp.asarray(LLAVA_PIXELS))
  np.testing.assert_array_equal(np.asarray(ref_tokens), tokens)
  np.testing.assert_array_equal(np.asarray(out["steps"]), [M, M])
  np.testing.assert_allclose(np.asarray(out["attention"]), rows.mean(1).reshape(2, 4, 4),
                             atol=1e-5)
  # The prefill and every step differ, so the average is over real, distinct rows.
  assert np.abs(rows[:, 0] - rows[:, -1]).max() > 1e-3
  np.testing.assert_allclose(np.asarray(out["attention"]).sum((1, 2)), 1.0, atol=1e-5)


def test_llava_stop_token_ends_each_rows_average(llava):
  hf, model, params = llava
  first = np.asarray(api.llava_attribution(model, params, LLAVA_PIXELS, LLAVA_IDS, LLAVA_MASK,
                                           layer=1, max_new_tokens=M)["tokens"])
  stop = int(first[0, 2])
  out = api.llava_attribution(model, params, LLAVA_PIXELS, LLAVA_IDS, LLAVA_MASK, layer=1,
                              max_new_tokens=M, stop_token_ids=(stop,), pad_token_id=0)
  steps = [int(np.argmax(r == stop)) + 1 if (r == stop).any() else M for r in first]
  assert steps[0] <= 3
  np.testing.assert_array_equal(np.asarray(out["steps"]), steps)
  rows, _ = _torch_rows(hf, first, 1)
  want = np.stack([rows[b, :steps[b]].mean(0) for b in range(2)]).reshape(2, 4, 4)
  np.testing.assert_allclose(np.asarray(out["attention"]), want, atol=1e-5)
  for b in range(2):
    np.testing.assert_array_equal(np.asarray(out["tokens"])[b, :steps[b]], first[b, :steps[b]])
    assert (np.asarray(out["tokens"])[b, steps[b]:] == 0).all()
  np.testing.assert_allclose(np.asarray(out["map"]),
                             np.asarray(maps.llava_postprocess(out["attention"], enhance_coe=5.0,
                                                               kernel_size=3)), atol=1e-6)


def test_llava_errors_name_the_problem(llava):
  _, model, params = llava
  ids = LLAVA_IDS.copy()
  ids[0, 5] = 7
  with pytest.raises(ValueError, match=r"rows \[0\] hold \[15\] image tokens"):
    api.llava_attribution(model, params, LLAVA_PIXELS, ids, LLAVA_MASK, layer=1)
  with pytest.raises(ValueError, match="LLaVA LM layer 3 is out of range"):
    api.llava_attribution(model, params, LLAVA_PIXELS, LLAVA_IDS, LLAVA_MASK, layer=3)
  with pytest.raises(ValueError, match="left-padded"):
    api.llava_attribution(model, params, LLAVA_PIXELS, LLAVA_IDS, LLAVA_MASK[:, ::-1], layer=1)
