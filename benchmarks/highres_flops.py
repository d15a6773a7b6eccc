"""High-resolution FLOP budget (issue 12): what one prefill and one decode step cost for LLaVA-1.5
(336), LLaVA-HD (every HR token in the sequence), a CogAgent-style cross-attention baseline,
LLaVA-FlexAttn (1008) and INF-LLaVA, counted by XLA and timed on this CPU.

  python benchmarks/highres_flops.py                      # 7B widths, 2 LM / 4 CLIP layers: FLOPs + CPU time
  python benchmarks/highres_flops.py --mode=compile_only  # full 7B shapes (32 x 4096, CLIP-L 24): FLOPs only
  python benchmarks/highres_flops.py --quick              # toy sizes (either mode), seconds

FLOPs are `jax.jit(f).lower(...).compile().cost_analysis()["flops"]` of the forward (float32,
batch 1 unless said; a dot counts 2 M N K, elementwise ops 1 per element). A **prefill** is what
`vlm_jax.eval.generate` runs on the prompt: the vision tower (included: every CLIP view, the
projector, the LR resize), the LM over the prompt filling a KV cache of prompt + `--new_tokens`
slots, logits of the last position only. `vision_flops` is the tower part compiled alone and
`lm_flops` = prefill - vision. A **decode step** is one new token against that cache (no vision).
`--mode=compile_only` lowers and compiles only: params are `jax.eval_shape` of the inits, so
nothing 7B is allocated, and nothing runs.

The prompt: `--text_tokens` (64) text tokens with the image run after the first `--image_offset`
(36): LLaVA-1.5's vicuna system prompt and "USER: <image>\\n", then the question and "ASSISTANT:".
The paper gives no prompt length (reference/flex_inf.md 1.11, its issue #6: no FLOP script).

Models (all on the same LLaMA; the baselines that are not library models are defined here):
- `llava`: `models.llava` on a 336 image (576 tokens).
- `hd`: LLaVA-HD = the same `llava.Model` fed the 1008 image's LR view AND its 3 x 3 crops as ten
  images, so all 576 + 5184 image tokens are in the sequence (the LM sees 5824 positions).
- `xattn`: the cross-attention baseline = LLaVA-1.5 plus, in every decoder layer, a cross-attention
  from the decoder's hidden states (text and LR rows) to the 5184 HR features, at the LM's width
  (4096, 32 heads) on the projected HR features; the prefill computes the HR keys/values once per
  layer, decode steps reuse them. This is the variant whose count reproduces the paper's
  cross-attention baseline (26.7 TFLOPs here against its 27.1), so the issue's 0.55x target is
  checked against it. `xattn_1024` is CogAgent's own narrower design: hidden `xattn_hidden`
  (1024) on the crops' 1024-wide CLIP features; it costs about what FlexAttention does (both are
  dominated by the same nine extra CLIP crops), and its ratio is reported next to the target.
- `flex`: `models.llava_flex` with a static budget of `--budget` HR blocks (8 of 81 = the paper's
  "~10% of HR tokens", reference 1.4), KV-cached decoding with the prefill's HR keys/values
  (`eval.generate._LlavaFlex`). `flex_all` is the library default budget (all 81 blocks).
  `flex_authors_decode` is the authors' decode step (1.7): the new token re-selects and every
  FlexAttention layer recomputes k_hd / v_hd on its gathered blocks (no HR cache).
  `flex_batched`: batch `--batch`, budget `--budget` per row: the static path. The authors'
  inference is batch 1 with a variable boolean gather of the n blocks actually selected; its cost
  is the batch-1 model with budget = n (XLA's count depends on shapes only, and the static path with
  budget >= n gives the same attention output: tests/layers/test_hierarchical.py). So batched per
  sample vs batch-1 at the same budget is the static path's overhead over the gather at n = budget.
- `inf`: `models.inf_llava` (DCM views through CLIP, n^2 + 1 of them at odd n, DEM, 576 LM tokens).

Writes benchmarks/results/highres_flops_cpu.json (run) or highres_flops_compile_only_cpu.json,
with the targets of issue 12 checked, and prints a one-line summary last.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import sys
import time
from typing import Any, Callable

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from timing import best_time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from vlm_jax.layers import hierarchical as hl  # noqa: E402
from vlm_jax.layers.linear import dense  # noqa: E402
from vlm_jax.layers.mlp import Mlp  # noqa: E402
from vlm_jax.layers.norms import RMSNorm  # noqa: E402
from vlm_jax.layers.resize import resize  # noqa: E402
from vlm_jax.models import llama, llama_flex, llava, llava_flex, vit  # noqa: E402

IMG = 32000
CLIP_L = dict(image_size=336, patch_size=14, width=1024, depth=24, heads=16, mlp_dim=4096)
VICUNA_7B = dict(vocab_size=32000, hidden_size=4096, num_layers=32, num_heads=32, mlp_dim=11008,
                 norm_eps=1e-5)
# full: the 7B shapes (flex_start 9: the authors' hard-coded split). run: 7B widths, fewer layers
# (flex_start 1: 1 of 2 LM layers is a FlexAttention layer). quick: toy sizes with the same
# structure (a 6 x 6 LR grid, 18 x 18 HR grid in 9 x 9 blocks, 8 blocks = 10%).
PRESETS = {
  "full": dict(vision=CLIP_L, lm=VICUNA_7B, flex_start=9, xattn_hidden=1024, xattn_heads=32),
  "run": dict(vision={**CLIP_L, "depth": 4}, lm={**VICUNA_7B, "num_layers": 2}, flex_start=1,
              xattn_hidden=1024, xattn_heads=32),
  "quick": dict(vision=dict(image_size=48, patch_size=8, width=64, depth=2, heads=2),
                lm=dict(vocab_size=256, hidden_size=128, num_layers=2, num_heads=4, mlp_dim=256,
                        norm_eps=1e-5), flex_start=1, xattn_hidden=32, xattn_heads=4),
}
PAPER_TFLOPS = {"magnifierbench": {"flex": 17.1, "hd": 24.9, "xattn": 27.1},
                "textvqa": {"flex": 17.1, "hd": 24.5, "xattn": 26.7}}
TARGETS = {"flex_vs_hd_prefill": 0.60, "flex_vs_xattn_prefill": 0.55,
           "flex_decode_vs_llava_decode": 1.1, "batched_vs_batch1_per_sample": 1.0}
# The targets are about the full model: with 2 of 32 LM layers (and 4 of 24 CLIP layers) the
# run preset weighs the nine extra CLIP crops, which FlexAttention and the cross-attention baseline both
# pay, far above the LM layers where they differ, so its ratios are reported, not judged.
TARGETS_JUDGED_ON = {
  "full": "these shapes (the full LLaVA-1.5-7B)",
  "run": "highres_flops_compile_only_cpu.json (full 7B shapes); at 2 LM layers the shared CLIP "
         "crops dominate, so these ratios are reported, not judged",
  "quick": "highres_flops_compile_only_cpu.json (full 7B shapes); toy sizes are a smoke run",
}


# -------------------------------------------------------------------------------------------------
# The cross-attention baseline (not a library model: it exists to be measured against).


class CrossAttention(nn.Module):
  """CogAgent-style cross-attention to the HR features, in a residual branch:

    x + W_o Attn(RMSNorm(x) W_q, hr W_k, hr W_v)     x: float[B, T, D], hr: float[B, M, D_hr]

  W_q: D -> C, W_k, W_v: D_hr -> C, W_o: C -> D with C = `hidden` (1024 in CogAgent); no mask (the
  HR tokens have no sequence position: every row sees all M). `kv` = the cached (k, v)
  float[B, M, heads, C / heads] of a previous call (decoding): then `hr` is not read.
  Returns (out float[B, T, D], (k, v))."""

  hidden: int
  heads: int
  norm_eps: float = 1e-5

  @nn.compact
  def __call__(self, x, hr, kv=None):
    shape, names = (self.heads, self.hidden // self.heads), ("embed", "heads", "kv")
    q = dense(shape, names, name="q")(RMSNorm(self.norm_eps, name="norm")(x))
    if kv is None:
      kv = (dense(shape, names, name="k")(hr), dense(shape, names, name="v")(hr))
    out = jax.nn.dot_product_attention(q, *kv)
    return x + dense(x.shape[-1], ("heads", "kv", "embed"), axis=(-2, -1), name="o")(out), kv


class XAttnLlava(nn.Module):
  """LLaVA-1.5 (`vision`, `projector`, `lm` as `models.llava`, so its params are shared) plus
  `xattn_{i}` = `CrossAttention` before decoder layer i, for every i (through llama's
  `before_layer` hook; CogAgent puts it after the self-attention inside the layer: same FLOPs).

  images float[B, zS, zS, 3]: the LR view (bilinear, antialias) gives the 576 sequence tokens, the
  z x z crops' CLIP features (layer -2, stitched to [B, (z g)^2, Dv]) are the HR features
  (`hr_from="projector"`: their projector output instead). images None = a decoding step with the
  prefill's `hr_kv`. -> (logits float32[B, T, V], {"lm", "hr_kv": [(k, v)] per layer})."""

  vision: dict
  lm: dict
  image_token_id: int = IMG
  zoom: int = 3
  xattn_hidden: int = 1024
  xattn_heads: int = 32
  hr_from: str = "clip"

  @nn.compact
  def __call__(self, images, input_ids, attention_mask=None, *, positions=None, caches=None,
               hr_kv=None, last_logits_only=False):
    lm = llama.Model(name="lm", **self.lm)
    blocks = [CrossAttention(self.xattn_hidden, self.xattn_heads, lm.norm_eps, name=f"xattn_{i}")
              for i in range(lm.num_layers)]
    hook, hr, ids = None, None, input_ids
    if images is not None:
      is_image = input_ids == self.image_token_id
      tower = vit.Model(name="vision", **self.vision)
      b, s = images.shape[0], tower.image_size
      views = jnp.concatenate([resize(images, (s, s), "bilinear_aa"),
                               llava_flex.split_crops(images, self.zoom)], axis=0)
      z = tower(views)[1]["hidden_states"][-2][:, 1:]
      proj = Mlp(lm.hidden_size, "gelu", True, out_dim=lm.hidden_size, name="projector")
      lr = proj(z[:b])
      hr = llava_flex.stitch_crops(z[b:] if self.hr_from == "clip" else proj(z[b:]), self.zoom)
      ids = jnp.where(is_image, 0, input_ids)

      def hook(x):
        return llava.scatter_image_features(x, is_image, lr.reshape(-1, lr.shape[-1]))
    new_kv = []

    def before_layer(i, h):
      h, kv = blocks[i](h, hr, None if hr_kv is None else hr_kv[i])
      new_kv.append(kv)
      return h
    logits, laux = lm(ids, attention_mask, positions, caches, before_layer=before_layer,
                      embed_hook=hook, last_logits_only=last_logits_only)
    return logits, {"lm": laux, "hr_kv": new_kv}


# -------------------------------------------------------------------------------------------------
# One entry per measured model: its prefill, decode step and vision-only functions.


@dataclasses.dataclass
class Entry:
  """prefill(params, images, ids, mask, caches) -> (logits [B, V], caches, extra);
  step(params, tok, mask, positions, caches, extra) -> logits [B, V];
  vision(params, images) -> features (the tower part of the prefill, for vision_flops)."""

  name: str
  prefill: Callable
  step: Callable
  vision: Callable
  params: Any
  image_px: int
  seq_len: int
  init_caches: Callable
  batch: int = 1
  note: str = ""


def _views(images, size, zoom):
  """[B, zS, zS, 3] -> [B * (1 + z^2), S, S, 3]: per image its LR view then its crops (HD's order
  of image runs in input_ids)."""
  b = images.shape[0]
  lr = resize(images, (size, size), "bilinear_aa")[:, None]
  crops = llava_flex.split_crops(images, zoom).reshape(b, zoom * zoom, size, size, 3)
  return jnp.concatenate([lr, crops], axis=1).reshape(-1, size, size, 3)


def _tower(cfg, params, views, project=True):
  z = vit.Model(**cfg["vision"]).apply({"params": params["vision"]}, views)[1]["hidden_states"]
  z = z[-2][:, 1:]
  if not project:
    return z
  d = cfg["lm"]["hidden_size"]
  return Mlp(d, "gelu", True, out_dim=d).apply({"params": params["projector"]}, z)


def _split_views(images, size, zoom):
  return jnp.concatenate([resize(images, (size, size), "bilinear_aa"),
                          llava_flex.split_crops(images, zoom)], axis=0)


def build_entries(cfg, args, abstract: bool) -> list[Entry]:
  """The models of the module docstring, with params (arrays, or ShapeDtypeStructs when
  `abstract`) shared where they are the same tensors (one LLaVA-1.5 tree under every model)."""
  s, z = cfg["vision"]["image_size"], args.zoom
  p = (s // cfg["vision"]["patch_size"]) ** 2
  g = int(round(p ** 0.5))
  t, t_hd = args.text_tokens + p, args.text_tokens + p * (1 + z * z)
  make = jax.eval_shape if abstract else (lambda f: jax.jit(f)())
  key = jax.random.PRNGKey(0)
  ids1, mask1 = prompt(1, t, p, args.image_offset)
  base_m = llava.Model(vision=cfg["vision"], lm=cfg["lm"], image_token_id=IMG)
  base = make(lambda: nn.unbox(base_m.init(key, jnp.zeros((1, s, s, 3)), ids1, mask1)["params"]))
  flex_lm = dict(cfg["lm"], flex_start=cfg["flex_start"], flex_blocks=args.blocks,
                 hr_grid=z * g, num_image_tokens=p)
  # W'_K, W'_V start as copies of W_K, W_V (hd_from_kv): the same arrays, nothing allocated.
  flex_params = {**base, "lm": llama_flex.hd_from_kv(base["lm"])}
  big = jnp.zeros((1, z * s, z * s, 3))

  def llava_like(model, name, seq, image_px, views_fn, note):
    def prefill(params, images, ids, mask, caches):
      logits, aux = model.apply({"params": params}, views_fn(images), ids, mask, caches=caches,
                                last_logits_only=True)
      return logits[:, -1], aux["lm"]["caches"], None

    def step(params, tok, mask, positions, caches, extra):
      return model.apply({"params": params}, None, tok, mask, positions=positions,
                         caches=caches)[0][:, -1]
    return Entry(name, prefill, step, lambda pr, im: _tower(cfg, pr, views_fn(im)), base,
                 image_px, seq, model.init_caches, note=note)

  entries = [
    llava_like(base_m, "llava", t, s, lambda im: im, "LLaVA-1.5 on a 336 image"),
    llava_like(base_m, "hd", t_hd, z * s, lambda im: _views(im, s, z),
               "LLaVA-HD: LR view + all 3x3 crops' tokens in the sequence"),
  ]

  def xattn_entry(name, hidden, heads, hr_from, note):
    m = XAttnLlava(cfg["vision"], cfg["lm"], IMG, z, hidden, heads, hr_from)
    blocks = make(lambda: {k: v for k, v in nn.unbox(
      m.init(key, big, ids1, mask1)["params"]).items() if k.startswith("xattn_")})
    params = {**base, **blocks}

    def prefill(params, images, ids, mask, caches):
      logits, aux = m.apply({"params": params}, images, ids, mask, caches=caches,
                            last_logits_only=True)
      return logits[:, -1], aux["lm"]["caches"], {"hr_kv": aux["hr_kv"]}

    def step(params, tok, mask, positions, caches, extra):
      return m.apply({"params": params}, None, tok, mask, positions=positions, caches=caches,
                     hr_kv=extra["hr_kv"])[0][:, -1]

    def vision(params, images):
      b = images.shape[0]
      zz = _tower(cfg, params, _split_views(images, s, z), project=False)
      d = cfg["lm"]["hidden_size"]
      proj = lambda x: Mlp(d, "gelu", True, out_dim=d).apply(  # noqa: E731
        {"params": params["projector"]}, x)
      return proj(zz[:b]), (zz[b:] if hr_from == "clip" else proj(zz[b:]))
    return Entry(name, prefill, step, vision, params, z * s, t,
                 lambda b, n: llama.Model(**cfg["lm"]).init_caches(b, n), note=note)

  entries.append(xattn_entry("xattn_1024", cfg["xattn_hidden"], cfg["xattn_heads"], "clip",
                             f"CogAgent's narrow xattn, hidden {cfg['xattn_hidden']}, every layer, "
                             "to the crops' CLIP features"))
  entries.append(xattn_entry("xattn", cfg["lm"]["hidden_size"], cfg["lm"]["num_heads"],
                             "projector", "xattn at the LM width to the projected HR features "
                             "(the paper's cross-attention cost)"))

  def flex_entry(name, budget, batch, note, authors_decode=False):
    m = llava_flex.Model(vision=cfg["vision"], lm=dict(flex_lm, flex_budget=budget),
                         image_token_id=IMG, zoom=z)
    lm_m = llama_flex.Model(**dict(flex_lm, flex_budget=budget))

    def prefill(params, images, ids, mask, caches):
      logits, aux = m.apply({"params": params}, images, ids, mask, caches=caches,
                            last_logits_only=True)
      extra = {"hr_cache": aux["lm"]["hr_cache"]}
      if authors_decode:  # what the uncached step needs: the HR features and their RoPE tables
        start = jnp.argmax(ids == IMG, axis=1).astype(jnp.int32)
        cos, sin = hl.hr_rope_tables(start, p, lm_m.dim_per_head, lm_m.rope_theta, lm_m.hr_grid)
        extra = {"hr": aux["hr_features"], "hr_cos": cos, "hr_sin": sin, "image_start": start}
      return logits[:, -1], aux["lm"]["caches"], extra

    def step(params, tok, mask, positions, caches, extra):
      if not authors_decode:
        return m.apply({"params": params}, None, tok, mask, positions=positions, caches=caches,
                       hr_cache=extra["hr_cache"])[0][:, -1]
      # The new token's row (row 0 of this call) selects from its attention over the cached LR
      # keys in layer flex_start-1 on, and each FlexAttention layer gathers and projects afresh.
      logits, _ = lm_m.apply({"params": params["lm"]}, tok, mask, positions, caches,
                             hr=extra["hr"], hr_cos=extra["hr_cos"], hr_sin=extra["hr_sin"],
                             image_start=extra["image_start"],
                             select_row=jnp.zeros((tok.shape[0],), jnp.int32))
      return logits[:, -1]
    return Entry(name, prefill, step, lambda pr, im: _tower(cfg, pr, _split_views(im, s, z)),
                 flex_params, z * s, t, m.init_caches, batch=batch, note=note)

  n_all = args.blocks ** 2
  entries += [
    flex_entry("flex", args.budget, 1, f"FlexAttn, static budget {args.budget}/{n_all} blocks, "
               "HR k/v cached for decoding"),
    flex_entry("flex_all", None, 1, f"FlexAttn, library default budget (all {n_all} blocks)"),
    flex_entry("flex_authors_decode", args.budget, 1, "FlexAttn decode step as the authors: "
               "re-select and recompute k_hd/v_hd every step (prefill as flex)",
               authors_decode=True),
    flex_entry("flex_batched", args.budget, args.batch, f"FlexAttn static path, batch "
               f"{args.batch}, budget {args.budget} per row"),
  ]
  inf = inf_entry(cfg, args, base, make, t)
  if inf is not None:
    entries.append(inf)
  return entries


def inf_entry(cfg, args, base, make, t):
  """INF-LLaVA (`models.inf_llava`, the authors' DEM, dead views skipped: n^2 + 1 CLIP forwards per
  image at odd n) on the same LLaVA-1.5 tree plus its `spatial_embed`; 576 image tokens in the
  sequence, decoding as LLaVA-1.5 (no vision tower in the step)."""
  from vlm_jax.layers import dual_perspective as dp
  from vlm_jax.models import inf_llava

  s, z = cfg["vision"]["image_size"], args.zoom
  p = (s // cfg["vision"]["patch_size"]) ** 2
  m = inf_llava.Model(vision=cfg["vision"], lm=cfg["lm"], image_token_id=IMG, num_crops=z)
  ids1, mask1 = prompt(1, t, p, args.image_offset)
  big = jnp.zeros((1, z * s, z * s, 3))
  dem = make(lambda: nn.unbox(m.init(jax.random.PRNGKey(0), big, ids1, mask1)["params"])[
    "spatial_embed"])
  params = {**base, "spatial_embed": dem}
  encoded, source = m.view_plan()

  def prefill(params, images, ids, mask, caches):
    logits, aux = m.apply({"params": params}, images, ids, mask, caches=caches,
                          last_logits_only=True)
    return logits[:, -1], aux["lm"]["caches"], None

  def step(params, tok, mask, positions, caches, extra):
    return m.apply({"params": params}, None, tok, mask, positions=positions,
                   caches=caches)[0][:, -1]

  def vision(params, images):  # the tower part of `inf_llava.Model`: views, CLIP, DEM, projector
    b = images.shape[0]
    feats = _tower(cfg, params, inf_llava.dcm_views(images, z, s, encoded), project=False)
    feats = jnp.take(feats.reshape(b, len(encoded), *feats.shape[1:]), np.asarray(source), axis=1)
    tokens, _ = dp.DualPerspectiveEnhancement(num_crops=z).apply(
      {"params": params["spatial_embed"]}, feats.reshape(-1, *feats.shape[2:]))
    d = cfg["lm"]["hidden_size"]
    return Mlp(d, "gelu", True, out_dim=d).apply({"params": params["projector"]}, tokens)
  return Entry("inf", prefill, step, vision, params, z * s, t, m.init_caches,
               note=f"INF-LLaVA, n={z}: {len(encoded)} CLIP forwards per image (dead views "
               f"skipped, authors' DEM), {p} image tokens")


# -------------------------------------------------------------------------------------------------
# Measuring.


def prompt(batch: int, seq: int, n_image: int, offset: int) -> tuple[np.ndarray, np.ndarray]:
  """ids int32[B, seq] with one run of n_image image tokens at `offset` (text ids elsewhere) and
  an all-ones mask (no padding: every row is the same prompt length)."""
  rng = np.random.default_rng(0)
  ids = rng.integers(1, 200, (batch, seq)).astype(np.int32)
  ids[:, offset:offset + n_image] = IMG
  return ids, np.ones((batch, seq), np.int32)


def flops_of(fn, *args) -> tuple[float, Any, float]:
  """(XLA flops, compiled, compile seconds) of jit(fn) on args (arrays or ShapeDtypeStructs)."""
  t0 = time.perf_counter()
  compiled = jax.jit(fn).lower(*args).compile()
  ca = compiled.cost_analysis()
  ca = ca[0] if isinstance(ca, (list, tuple)) else ca
  return float(ca["flops"]), compiled, time.perf_counter() - t0


def measure(e: Entry, args, abstract: bool, timed: bool, n_image: int) -> dict:
  b, t = e.batch, e.seq_len
  s_max = t + args.new_tokens
  ids, _ = prompt(b, t, n_image, args.image_offset)
  # With a KV cache the mask covers all s_max slots (1 = a real key), as in eval.generate.
  mask = (np.arange(s_max)[None] < t).astype(np.int32).repeat(b, 0)
  shape = (b, e.image_px, e.image_px, 3)
  if abstract:
    images = jax.ShapeDtypeStruct(shape, jnp.float32)
    caches = jax.eval_shape(lambda: e.init_caches(b, s_max))
  else:
    images = jax.random.normal(jax.random.PRNGKey(1), shape, jnp.float32)
    caches = e.init_caches(b, s_max)
  pre_args = (e.params, images, ids, mask, caches)
  row = {"model": e.name, "note": e.note, "batch": b, "seq_len": t, "kv_len": s_max,
         "image_px": e.image_px}
  row["prefill_flops"], pre, row["prefill_compile_s"] = flops_of(e.prefill, *pre_args)
  row["vision_flops"], vis, _ = flops_of(e.vision, e.params, images)
  row["lm_flops"] = row["prefill_flops"] - row["vision_flops"]
  out = jax.eval_shape(e.prefill, *pre_args) if abstract else pre(*pre_args)
  dec_mask = (np.arange(s_max)[None] <= t).astype(np.int32).repeat(b, 0)
  step_args = (e.params, np.full((b, 1), 7, np.int32), dec_mask, np.full((b, 1), t, np.int32),
               out[1], out[2])
  row["decode_flops"], step, row["decode_compile_s"] = flops_of(e.step, *step_args)
  for k in ("prefill_flops", "vision_flops", "lm_flops", "decode_flops"):
    row[k.replace("_flops", "_flops_per_sample")] = row[k] / b
  if timed:
    reps = max(1, args.reps - 1) if e.name == "hd" else args.reps
    row["prefill_s"] = best_time(pre, *pre_args, reps=reps)
    row["vision_s"] = best_time(vis, e.params, images, reps=reps)
    row["decode_step_s"] = best_time(step, *step_args, reps=args.reps)
    row["reps"] = reps
  print(json.dumps({k: v for k, v in row.items() if k != "note"}), flush=True)
  return row


def ratios(rows: dict) -> dict:
  def r(a, b, key):
    return rows[a][key] / rows[b][key] if a in rows and b in rows else None
  out = {
    "flex_vs_hd_prefill": r("flex", "hd", "prefill_flops"),
    "flex_vs_xattn_prefill": r("flex", "xattn", "prefill_flops"),
    "flex_vs_xattn_1024_prefill": r("flex", "xattn_1024", "prefill_flops"),
    "flex_vs_llava_prefill": r("flex", "llava", "prefill_flops"),
    "flex_all_vs_hd_prefill": r("flex_all", "hd", "prefill_flops"),
    "flex_vs_hd_lm": r("flex", "hd", "lm_flops"),
    "flex_vs_xattn_lm": r("flex", "xattn", "lm_flops"),
    "flex_decode_vs_llava_decode": r("flex", "llava", "decode_flops"),
    "flex_authors_decode_vs_llava_decode": r("flex_authors_decode", "llava", "decode_flops"),
    "hd_decode_vs_llava_decode": r("hd", "llava", "decode_flops"),
    "xattn_decode_vs_llava_decode": r("xattn", "llava", "decode_flops"),
    "batched_vs_batch1_per_sample": r("flex_batched", "flex", "prefill_flops_per_sample"),
    "batched_vs_batch1_decode_per_sample": r("flex_batched", "flex", "decode_flops_per_sample"),
  }
  if "inf" in rows:
    out["inf_vs_llava_prefill"] = r("inf", "llava", "prefill_flops")
    out["flex_vs_inf_prefill"] = r("flex", "inf", "prefill_flops")
    out["inf_vs_hd_prefill"] = r("inf", "hd", "prefill_flops")
    out["inf_decode_vs_llava_decode"] = r("inf", "llava", "decode_flops")
  if all("prefill_s" in rows.get(k, {}) for k in ("flex", "hd", "xattn", "llava", "flex_batched")):
    out["time_flex_vs_hd_prefill"] = r("flex", "hd", "prefill_s")
    out["time_flex_vs_xattn_prefill"] = r("flex", "xattn", "prefill_s")
    out["time_flex_decode_vs_llava_decode"] = r("flex", "llava", "decode_step_s")
    out["time_batched_vs_batch1_per_sample"] = (
      rows["flex_batched"]["prefill_s"] / rows["flex_batched"]["batch"] / rows["flex"]["prefill_s"])
  return out


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--mode", choices=("run", "compile_only"), default="run")
  p.add_argument("--quick", action="store_true", help="toy sizes (seconds)")
  p.add_argument("--text_tokens", type=int, default=None, help="default 64 (quick: 16)")
  p.add_argument("--image_offset", type=int, default=None, help="default 36 (quick: 8)")
  p.add_argument("--new_tokens", type=int, default=32, help="KV cache slots after the prompt")
  p.add_argument("--zoom", type=int, default=3)
  p.add_argument("--blocks", type=int, default=9, help="flex_blocks: HR blocks per side")
  p.add_argument("--budget", type=int, default=8, help="flex_budget of `flex` (8/81 ~ 10%%)")
  p.add_argument("--batch", type=int, default=None, help="flex_batched's batch (default 4; "
                 "compile_only 8)")
  p.add_argument("--reps", type=int, default=3)
  p.add_argument("--models", default="", help="comma-separated subset (default all)")
  p.add_argument("--out", default="")
  args = p.parse_args(argv)
  abstract = args.mode == "compile_only"
  preset = "quick" if args.quick else ("full" if abstract else "run")
  cfg = PRESETS[preset]
  args.text_tokens = args.text_tokens or (16 if args.quick else 64)
  args.image_offset = args.image_offset if args.image_offset is not None else (
    8 if args.quick else 36)
  args.batch = args.batch or (8 if abstract else 4)
  n_image = (cfg["vision"]["image_size"] // cfg["vision"]["patch_size"]) ** 2
  t0 = time.perf_counter()
  entries = build_entries(cfg, args, abstract)
  if args.models:
    keep = set(args.models.split(","))
    entries = [e for e in entries if e.name in keep]
  rows = {}
  for e in entries:
    rows[e.name] = measure(e, args, abstract, timed=not abstract, n_image=n_image)
  rat = ratios(rows)
  targets = {k: {"value": rat.get(k), "max": v,
                 "met": None if rat.get(k) is None else bool(rat[k] <= v + 1e-9)}
             for k, v in TARGETS.items()}
  dev = jax.devices()[0]
  out = {
    "benchmark": "highres_flops", "mode": args.mode, "preset": preset,
    "machine": {"platform": dev.platform, "device_kind": dev.device_kind,
                "num_devices": jax.device_count(), "cpu_count": os.cpu_count(),
                "host": platform.node(), "python": platform.python_version(),
                "jax": jax.__version__, "flax": flax.__version__},
    "dtype": "float32",
    "flops_source": "XLA cost_analysis()['flops'] of the compiled forward (lower + compile)",
    "config": {"vision": cfg["vision"], "lm": cfg["lm"], "flex_start": cfg["flex_start"],
               "xattn_hidden": cfg["xattn_hidden"], "xattn_heads": cfg["xattn_heads"],
               "zoom": args.zoom, "flex_blocks": args.blocks, "budget": args.budget,
               "batch": args.batch, "text_tokens": args.text_tokens,
               "image_offset": args.image_offset, "new_tokens": args.new_tokens,
               "image_tokens": n_image, "hr_tokens": n_image * args.zoom ** 2,
               "inf_llava": "inf" in rows},
    "models": rows, "ratios": rat, "targets": targets,
    "targets_judged_on": TARGETS_JUDGED_ON[preset], "paper_tflops": PAPER_TFLOPS,
    "paper_ratios": {"flex_vs_hd": 17.1 / 24.9, "flex_vs_xattn": 17.1 / 27.1},
    "wall_s": time.perf_counter() - t0,
  }
  name = ("highres_flops_compile_only" if abstract else "highres_flops") + (
    "_quick" if args.quick else "")
  path = args.out or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                  f"{name}_{dev.platform}.json")
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, "w") as f:
    json.dump(out, f, indent=2)
  tf = lambda k: rows[k]["prefill_flops"] / 1e12 if k in rows else float("nan")  # noqa: E731
  fmt = lambda k: "n/a" if rat.get(k) is None else f"{rat[k]:.3f}"  # noqa: E731
  print(f"highres_flops [{preset}, {args.mode}] -> {path}: prefill TFLOPs llava {tf('llava'):.3f} "
        f"hd {tf('hd'):.3f} xattn {tf('xattn'):.3f} flex {tf('flex'):.3f}; flex/hd "
        f"{fmt('flex_vs_hd_prefill')} flex/xattn {fmt('flex_vs_xattn_prefill')} decode "
        f"flex/llava {fmt('flex_decode_vs_llava_decode')} batched/batch-1 "
        f"{fmt('batched_vs_batch1_per_sample')}; targets met "
        f"{sum(bool(v['met']) for v in targets.values())}/{len(targets)}")
  return out


if __name__ == "__main__":
  main()
