"""Autoregressive generation with a KV cache, one compiled program per static configuration.

  generate(model, params, input_ids int32[B, T], attention_mask int[B, T], *, max_new_tokens=N, ...)
    -> int32[B, N]: the generated ids only; after a row's stop token (kept, as HF keeps its eos) the
       row is filled with pad_token_id

Static shapes throughout: the left-padded prompt is prefilled into preallocated KV caches of
length T + N - 1 (the last new token is never fed back), then a `jax.lax.while_loop` feeds one
token per step and stops as soon as every row has stopped (beam search: as soon as no beam can
improve), never later than N tokens. Position ids of left-padded rows are cumsum(mask) - 1, as HF's
`generate` makes them; the attention mask covers the whole cache (prompt mask, then ones: causality
hides what is not written yet). The whole loop is one `jax.jit` keyed on (model config, decoding
options, input shapes, mesh, rules), so repeated calls with the same shapes do not retrace.

Semantics follow the installed transformers' `GenerationMixin.generate` (5.x; the tests compare
token for token):
- Logits processors in HF's order: `min_new_tokens` first (the stop tokens get -inf while fewer than
  `min_new_tokens` tokens were generated), then, only when sampling, the warpers temperature, top-k,
  top-p (`TopKLogitsWarper` keeps every token scoring at least the k-th; `TopPLogitsWarper` removes
  the tokens whose ascending cumulative probability is <= 1 - top_p). They keep at least 1 token
  (beam sampling: len(stop_token_ids) + 1, or 2 without stop tokens, as HF). Unlike HF's
  GenerationConfig (top_k=50 by default), top_k defaults to 0 (off) here.
- Greedy takes the argmax; sampling draws from softmax(scores) with `rng` (folded with the step).
- Beam search is HF's vectorised `_beam_search` with its default early_stopping=False: per step the
  top max(2, 1 + len(stop_token_ids)) * num_beams continuations over all beams by accumulated log
  prob; those ending in a stop token or at the length limit become hypotheses scored
  sum(log p) / (new tokens incl. the stop token) ** length_penalty (only those among the first
  num_beams candidates, and only while the row can still improve), the best num_beams others run
  on. A row stops improving once all num_beams hypothesis slots are full and its best running beam,
  divided by its current length ** length_penalty, does not beat the worst hypothesis. The best
  hypothesis per row is returned. OpenFlamingo's captioning/VQA eval: num_beams=3,
  length_penalty=0.0, min_new_tokens=0, stop at <|endofchunk|>. With do_sample the continuations are
  drawn without replacement (Gumbel top-k) instead of taken greedily, as HF's beam sampling.

Models: every LM family of `vlm_jax.models` (llama, gpt_neox, mpt; unscanned or `scan_layers`),
Flamingo (`vision_x=float[B, T_img, H, W, 3]`: the vision tower and resampler run once, at the
prefill, which also returns each xattn block's media keys/values; the new tokens reuse them and
attend to the last prompt image, OpenFlamingo's cached-media mode) and LLaVA (`images=float[N, H, W,
3]`, used at the prefill only). With beams the prefill runs once per row; the caches and media
keys/values are then repeated per beam and the caches reordered by the surviving beams every step.

Sharding: with `mesh`, the call runs under `jax.set_mesh(mesh)` and the logical-axis `rules`
(`vlm_jax.sharding.logical_rules`, default DEFAULT_RULES) as training does; inputs whose leading
(batch) axis divides over the data-parallel axes are split over them, the rest replicated, and the
ids come back replicated. Params are used as given (e.g. sharded by the converters' `mesh=`).
"""

import dataclasses
import functools
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vlm_jax import sharding
from vlm_jax.layers.attention import KVCache
from vlm_jax.models import flamingo, llama, llava, llava_flex

NEG = -1.0e9  # HF beam search's "impossible" score offset (additive, as there)


@dataclasses.dataclass(frozen=True)
class DecodeOptions:
  """The static decoding options (part of the compilation key)."""

  max_new_tokens: int
  num_beams: int = 1
  length_penalty: float = 1.0
  do_sample: bool = False
  temperature: float = 1.0
  top_k: int = 0
  top_p: float = 1.0
  min_new_tokens: int = 0
  stop_token_ids: tuple[int, ...] = ()
  pad_token_id: int = 0

  def __post_init__(self):
    checks = [
      (self.max_new_tokens >= 1, f"max_new_tokens must be >= 1, got {self.max_new_tokens}"),
      (self.num_beams >= 1, f"num_beams must be >= 1, got {self.num_beams}"),
      (self.temperature > 0, f"temperature must be > 0, got {self.temperature}"),
      (self.top_k >= 0, f"top_k must be >= 0 (0 = off), got {self.top_k}"),
      (0 < self.top_p <= 1, f"top_p must be in (0, 1], got {self.top_p}"),
      (self.min_new_tokens >= 0, f"min_new_tokens must be >= 0, got {self.min_new_tokens}"),
    ]
    for ok, msg in checks:
      if not ok:
        raise ValueError(msg)


class _ModelKey:
  """A linen Module as a jit static argument. Modules holding dicts (Flamingo's sub-configs) do not
  hash; two modules with the same class and repr (every field) build the same computation."""

  def __init__(self, model: nn.Module):
    self.model = model
    self._key = (type(model), repr(model))

  def __hash__(self):
    return hash(self._key)

  def __eq__(self, other):
    return isinstance(other, _ModelKey) and self._key == other._key


# -------------------------------------------------------------------------------------------------
# Model adapters: prefill the prompt into the caches, then decode one token per call.


def map_cache_rows(fn: Callable[[jax.Array, int], jax.Array], caches: Any) -> Any:
  """fn(array, batch_axis) over the k/v buffers of every KVCache in `caches` (per layer [B, K, S, D]
  or stacked [L, B, K, S, D]); the write indices are shared by all rows and stay."""
  def one(c):
    return KVCache(fn(c.k, c.k.ndim - 4), fn(c.v, c.v.ndim - 4), c.index) if isinstance(
      c, KVCache) else c
  return jax.tree.map(one, caches, is_leaf=lambda x: isinstance(x, KVCache))


class _LM:
  """A decoder LM of the llama family: no inputs besides the ids."""

  inputs: tuple[str, ...] = ()

  def __init__(self, model):
    self.model = model

  def init_caches(self, batch: int, length: int):
    return self.model.init_caches(batch, length, self.model.dtype)

  def prefill(self, params, ids, mask, positions, caches, inputs):
    logits, aux = self.model.apply({"params": params}, ids, mask, positions, caches,
                                   last_logits_only=True)
    return logits[:, -1], aux["caches"], {}

  def step(self, params, tok, mask, positions, caches, extra):
    logits, aux = self.model.apply({"params": params}, tok, mask, positions, caches)
    return logits[:, -1], aux["caches"]

  def repeat_extra(self, extra, k):
    return extra


class _Flamingo(_LM):
  """Flamingo: media keys/values and the last prompt image index computed at the prefill."""

  inputs = ("vision_x",)

  def prefill(self, params, ids, mask, positions, caches, inputs):
    logits, aux = self.model.apply({"params": params}, inputs["vision_x"], ids, mask,
                                   positions=positions, caches=caches, last_logits_only=True)
    # OpenFlamingo's cached-media mode: new tokens attend to the last image of the prompt.
    extra = {"media_kv": aux["media_kv"], "text_time": aux["text_time"][:, -1:]}
    return logits[:, -1], aux["lm"]["caches"], extra

  def step(self, params, tok, mask, positions, caches, extra):
    logits, aux = self.model.apply({"params": params}, None, tok, mask, positions=positions,
                                   caches=caches, text_time=extra["text_time"],
                                   media_kv=extra["media_kv"])
    return logits[:, -1], aux["lm"]["caches"]

  def repeat_extra(self, extra, k):
    # MediaKV leaves: [B, H, T_img, R, D], or [G, B, ...] stacked per scanned group.
    kv = jax.tree.map(lambda a: jnp.repeat(a, k, axis=a.ndim - 5), extra["media_kv"])
    return {"media_kv": kv, "text_time": jnp.repeat(extra["text_time"], k, axis=0)}


class _Llava(_LM):
  """LLaVA: the images are scattered into the prompt's embeddings at the prefill only."""

  inputs = ("images",)

  def prefill(self, params, ids, mask, positions, caches, inputs):
    logits, aux = self.model.apply({"params": params}, inputs.get("images"), ids, mask,
                                   positions=positions, caches=caches, last_logits_only=True)
    return logits[:, -1], aux["lm"]["caches"], {}

  def step(self, params, tok, mask, positions, caches, extra):
    logits, aux = self.model.apply({"params": params}, None, tok, mask, positions=positions,
                                   caches=caches)
    return logits[:, -1], aux["lm"]["caches"]


class _LlavaFlex(_LM):
  """LLaVA-FlexAttn: the prefill selects HR blocks from the last prompt token's attention, and
  each FlexAttention layer's HR keys/values for them are cached; the decode steps reuse them (no
  vision tower, no HR features in the loop)."""

  inputs = ("images", "ori_sizes")

  def prefill(self, params, ids, mask, positions, caches, inputs):
    logits, aux = self.model.apply({"params": params}, inputs["images"], ids, mask,
                                   ori_sizes=inputs.get("ori_sizes"), positions=positions,
                                   caches=caches, last_logits_only=True)
    return logits[:, -1], aux["lm"]["caches"], {"hr_cache": aux["lm"]["hr_cache"]}

  def step(self, params, tok, mask, positions, caches, extra):
    logits, aux = self.model.apply({"params": params}, None, tok, mask, positions=positions,
                                   caches=caches, hr_cache=extra["hr_cache"])
    return logits[:, -1], aux["lm"]["caches"]

  def repeat_extra(self, extra, k):
    return {"hr_cache": jax.tree.map(lambda a: jnp.repeat(a, k, axis=0), extra["hr_cache"])}


def _adapter(model: nn.Module) -> _LM:
  if isinstance(model, flamingo.Model):
    return _Flamingo(model)
  if isinstance(model, llava_flex.Model):
    return _LlavaFlex(model)
  if isinstance(model, llava.Model):
    return _Llava(model)
  if isinstance(model, llama.Model):
    return _LM(model)
  raise TypeError(f"generate: no decoding support for {type(model).__module__}."
                  f"{type(model).__name__}; expected an LM of vlm_jax.models (llama, gpt_neox, "
                  "mpt), flamingo.Model or llava.Model")


def cast_for_decoding(model: nn.Module, params: Any, dtype: Any = jnp.bfloat16):
  """(model computing in `dtype`, params with every floating leaf cast to `dtype`): the low-precision
  weights option of decoding. A bf16 step reads half the weight and KV-cache bytes (`init_caches`
  follows the model's dtype); the logits are still returned in float32. Params loaded in bf16
  (`load_hf_lm(..., param_dtype="bfloat16")`, `convert --dtype bfloat16`) are kept as they are."""
  dtype = jnp.dtype(dtype)
  cast = jax.tree.map(
    lambda a: a.astype(dtype) if jnp.issubdtype(a.dtype, jnp.floating) else a, params)
  return model.clone(dtype=dtype), cast


# -------------------------------------------------------------------------------------------------
# Logits processors (HF order and semantics).


def _stop_mask(opts: DecodeOptions, vocab: int) -> jax.Array:
  """bool[V]: True at the stop tokens."""
  ids = np.asarray([s for s in opts.stop_token_ids if 0 <= s < vocab], np.int32)
  return jnp.zeros((vocab,), bool).at[ids].set(True)


def _is_stop(tok: jax.Array, opts: DecodeOptions) -> jax.Array:
  out = jnp.zeros(tok.shape, bool)
  for s in opts.stop_token_ids:
    out = out | (tok == s)
  return out


def first_argmax(scores: jax.Array) -> jax.Array:
  """jnp.argmax(scores, -1) as int32[...] (the first maximum; the first NaN if any), written as
  two plain reductions: a max, then the smallest index holding it. XLA:CPU lowers argmax to a
  variadic (value, index) reduce that took 370 us for float32[16, 8192] against 86 us this way
  (1.2 ms vs 0.25 ms at a 32k vocabulary), once per decode step."""
  top = scores.max(-1, keepdims=True)  # NaN when the row holds one
  hit = (scores == top) | jnp.isnan(scores)
  idx = jnp.arange(scores.shape[-1], dtype=jnp.int32)
  return jnp.min(jnp.where(hit, idx, scores.shape[-1]), axis=-1)


def top_k_filter(scores: jax.Array, k: int, min_tokens_to_keep: int = 1) -> jax.Array:
  """HF `TopKLogitsWarper`: float[..., V] -> scores with everything below the k-th largest at -inf
  (ties with the k-th are kept)."""
  k = min(max(k, min_tokens_to_keep), scores.shape[-1])
  kth = jax.lax.top_k(scores, k)[0][..., -1:]
  return jnp.where(scores < kth, -jnp.inf, scores)


def top_p_filter(scores: jax.Array, p: float, min_tokens_to_keep: int = 1) -> jax.Array:
  """HF `TopPLogitsWarper`: sort ascending, drop the tokens whose cumulative probability is
  <= 1 - p, always keeping the `min_tokens_to_keep` most likely. scores: float[B, V]."""
  order = jnp.argsort(scores, axis=-1)
  sorted_scores = jnp.take_along_axis(scores, order, axis=-1)
  cum = jnp.cumsum(jax.nn.softmax(sorted_scores, axis=-1), axis=-1)
  remove = cum <= 1 - p
  remove = remove.at[..., -min_tokens_to_keep:].set(False)
  rows = jnp.arange(scores.shape[0])[:, None]
  remove = jnp.zeros_like(remove).at[rows, order].set(remove)
  return jnp.where(remove, -jnp.inf, scores)


def warp(scores: jax.Array, opts: DecodeOptions, min_tokens_to_keep: int = 1) -> jax.Array:
  """The sampling warpers in HF's order: temperature, top-k, top-p.  scores: float32[B, V]."""
  if opts.temperature != 1.0:
    scores = scores / opts.temperature
  if opts.top_k:
    scores = top_k_filter(scores, opts.top_k, min_tokens_to_keep)
  if opts.top_p < 1.0:
    scores = top_p_filter(scores, opts.top_p, min_tokens_to_keep)
  return scores


def _min_new_tokens(scores: jax.Array, i: jax.Array, opts: DecodeOptions) -> jax.Array:
  """HF `MinNewTokensLengthLogitsProcessor`: no stop token before `min_new_tokens` are out."""
  if not opts.min_new_tokens or not opts.stop_token_ids:
    return scores
  block = (i < opts.min_new_tokens) & _stop_mask(opts, scores.shape[-1])
  return jnp.where(block, -jnp.inf, scores)


# -------------------------------------------------------------------------------------------------
# The decoding loops.


def _greedy(adapter, opts, params, logits, caches, extra, mask, first_pos, rng):
  """Greedy or sampled decoding, one token per row per step.  logits: float32[B, V] of the
  prefill."""
  n, pad = opts.max_new_tokens, opts.pad_token_id

  def choose(logits, i, finished):
    scores = _min_new_tokens(logits.astype(jnp.float32), i, opts)
    if opts.do_sample:
      tok = jax.random.categorical(jax.random.fold_in(rng, i), warp(scores, opts), axis=-1)
    else:
      tok = first_argmax(scores)
    tok = jnp.where(finished, pad, tok.astype(jnp.int32))
    return tok, finished | _is_stop(tok, opts)

  b = logits.shape[0]
  tok, finished = choose(logits, 0, jnp.zeros((b,), bool))
  out = jnp.full((b, n), pad, jnp.int32).at[:, 0].set(tok)

  def cond(state):
    i, _, _, finished, _ = state
    return (i < n) & ~jnp.all(finished)

  def body(state):
    i, out, tok, finished, caches = state
    logits, caches = adapter.step(params, tok[:, None], mask, (first_pos + i - 1)[:, None], caches,
                                  extra)
    tok, finished = choose(logits, i, finished)
    return i + 1, out.at[:, i].set(tok), tok, finished, caches

  state = (jnp.asarray(1, jnp.int32), out, tok, finished, caches)
  return jax.lax.while_loop(cond, body, state)[1]


def _take(x: jax.Array, idx: jax.Array) -> jax.Array:
  """x[b, idx[b, j]] along axis 1.  x: [B, K, ...], idx: int[B, J] -> [B, J, ...]."""
  return jnp.take_along_axis(x, idx.reshape(idx.shape + (1,) * (x.ndim - 2)), axis=1)


def _beam(adapter, opts, params, logits, caches, extra, mask, first_pos, rng):
  """HF's vectorised beam search (early_stopping=False). logits: float32[B * K, V] of the prefill,
  rows b * K + j (the K beams of a row are copies of it until the first step)."""
  n, k, pad = opts.max_new_tokens, opts.num_beams, opts.pad_token_id
  bk, vocab = logits.shape
  b = bk // k
  keep = max(2, 1 + len(opts.stop_token_ids)) * k
  min_keep = len(opts.stop_token_ids) + 1 if opts.stop_token_ids else 2
  top_mask = jnp.arange(keep) < k
  lp_pen = opts.length_penalty

  def select(s, logits, i):
    lp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    lp = _min_new_tokens(lp, i, opts)
    if opts.do_sample:
      lp = warp(lp, opts, min_keep)
    acc = (lp.reshape(b, k, vocab) + s["running_scores"][..., None]).reshape(b, k * vocab)
    if opts.do_sample:  # sampling without replacement from softmax(acc): Gumbel top-k
      g = jax.random.gumbel(jax.random.fold_in(rng, i), acc.shape)
      idx = jax.lax.top_k(acc + g, keep)[1]
      topk_lp = jnp.take_along_axis(acc, idx, axis=-1)
    else:
      topk_lp, idx = jax.lax.top_k(acc, keep)
    beam, tok = idx // vocab, (idx % vocab).astype(jnp.int32)
    topk_seqs = _take(s["running_seqs"], beam).at[:, :, i].set(tok)  # [B, keep, N]
    hits = _is_stop(tok, opts) | (i + 1 >= n)
    # The best num_beams continuations that did not stop run on.
    run_lp = topk_lp + hits.astype(jnp.float32) * NEG
    nxt = jax.lax.top_k(run_lp, k)[1]
    new = {"running_seqs": _take(topk_seqs, nxt), "running_scores": _take(run_lp, nxt),
           "src": _take(beam, nxt)}
    # Hypotheses: among the first num_beams candidates, the stopped ones, length-penalised.
    did = hits & top_mask
    fin = topk_lp / jnp.asarray(i + 1, jnp.float32) ** lp_pen
    fin = fin + (~s["unsatisfied"]).astype(jnp.float32) * NEG
    fin = fin + (~did).astype(jnp.float32) * NEG
    merged = jnp.concatenate([s["scores"], fin], axis=1)
    top = jax.lax.top_k(merged, k)[1]
    new["seqs"] = _take(jnp.concatenate([s["seqs"], topk_seqs], axis=1), top)
    new["scores"] = _take(merged, top)
    new["finished"] = _take(jnp.concatenate([s["finished"], did], axis=1), top)
    # Can a running beam still beat the worst hypothesis? (cur_len - prompt_len = i + 1)
    best = new["running_scores"][:, :1] / jnp.asarray(i + 1, jnp.float32) ** lp_pen
    worst = jnp.where(new["finished"], jnp.min(new["scores"], axis=1, keepdims=True), NEG)
    new["unsatisfied"] = s["unsatisfied"] & jnp.any(best > worst, axis=-1, keepdims=True)
    new["done"] = ~(jnp.any(new["unsatisfied"]) & ~jnp.all(hits))
    return new

  init = {
    "running_seqs": jnp.full((b, k, n), pad, jnp.int32),
    # Only beam 0 is live at first, so the K copies do not pick the same tokens.
    "running_scores": jnp.zeros((b, k), jnp.float32).at[:, 1:].set(NEG),
    "seqs": jnp.full((b, k, n), pad, jnp.int32),
    "scores": jnp.full((b, k), NEG, jnp.float32),
    "finished": jnp.zeros((b, k), bool),
    "unsatisfied": jnp.ones((b, 1), bool),
  }
  state = select(init, logits, 0)
  rows = (jnp.arange(b) * k)[:, None]

  def cond(carry):
    i, s, _ = carry
    return (i < n) & ~s["done"]

  def body(carry):
    i, s, caches = carry
    src = (rows + s["src"]).reshape(-1)
    caches = map_cache_rows(lambda a, axis: jnp.take(a, src, axis=axis), caches)
    tok = s["running_seqs"][:, :, i - 1].reshape(-1, 1)
    logits, caches = adapter.step(params, tok, mask, (first_pos + i - 1)[:, None], caches, extra)
    return i + 1, select(s, logits, i), caches

  _, state, _ = jax.lax.while_loop(cond, body, (jnp.asarray(1, jnp.int32), state, caches))
  return state["seqs"][:, 0]


def padded_positions(mask: jax.Array) -> jax.Array:
  """HF's position ids of left-padded rows: cumsum(mask) - 1, 0 on the padding.  int[B, T]."""
  return jnp.maximum(jnp.cumsum(mask, axis=-1) - 1, 0)


@functools.partial(jax.jit, static_argnames=("key", "opts", "mesh", "rules"))
def _generate_jit(key: _ModelKey, opts: DecodeOptions, mesh, rules, params, input_ids,
                  attention_mask, rng, inputs):
  """The whole generation as one program. `rules` is only part of the compilation key: the trace
  reads them from the enclosing `nn.logical_axis_rules`."""
  del rules
  adapter = _adapter(key.model)
  input_ids = input_ids.astype(jnp.int32)
  b, t = input_ids.shape
  n, k = opts.max_new_tokens, opts.num_beams
  prompt_mask = attention_mask.astype(jnp.int32)
  # The mask over the whole cache [B, T + N - 1]: the new tokens are all real.
  mask = jnp.concatenate([prompt_mask, jnp.ones((b, n - 1), jnp.int32)], axis=1)
  positions = padded_positions(prompt_mask)
  first_pos = prompt_mask.sum(-1)  # the first new token's position per row
  caches = adapter.init_caches(b, t + n - 1)
  logits, caches, extra = adapter.prefill(params, input_ids, mask, positions, caches, inputs)
  if k == 1:
    out = _greedy(adapter, opts, params, logits, caches, extra, mask, first_pos, rng)
  else:
    rep = functools.partial(jnp.repeat, repeats=k, axis=0)
    caches = map_cache_rows(lambda a, axis: jnp.repeat(a, k, axis=axis), caches)
    out = _beam(adapter, opts, params, rep(logits), caches, adapter.repeat_extra(extra, k),
                rep(mask), rep(first_pos), rng)
  if mesh is not None:  # every process can read the (small) result
    out = jax.lax.with_sharding_constraint(out, sharding.replicated(mesh))
  return out


def generate(
  model: nn.Module,
  params: Any,
  input_ids: Any,
  attention_mask: Any,
  *,
  max_new_tokens: int,
  num_beams: int = 1,
  length_penalty: float = 1.0,
  do_sample: bool = False,
  temperature: float = 1.0,
  top_k: int = 0,
  top_p: float = 1.0,
  min_new_tokens: int = 0,
  stop_token_ids=(),
  pad_token_id: int = 0,
  rng: jax.Array | None = None,
  mesh=None,
  rules=None,
  **model_inputs,
) -> jax.Array:
  """Generate up to `max_new_tokens` tokens after left-padded prompts (see the module docstring).

  input_ids: int[B, T]; attention_mask: int[B, T] (1 = real token; every row must end with a real
  token, i.e. be left-padded). model_inputs: Flamingo `vision_x=float[B, T_img, H, W, 3]`, LLaVA
  `images=float[N, H, W, 3]`. rng: a PRNG key, required when `do_sample`. mesh / rules: run sharded
  (rules as `config.sharding_rules`; default `sharding.DEFAULT_RULES`).
  Returns int32[B, max_new_tokens].
  """
  opts = DecodeOptions(int(max_new_tokens), int(num_beams), float(length_penalty), bool(do_sample),
                       float(temperature), int(top_k), float(top_p), int(min_new_tokens),
                       tuple(int(s) for s in stop_token_ids), int(pad_token_id))
  adapter = _adapter(model)
  unknown = set(model_inputs) - set(adapter.inputs)
  if unknown:
    takes = list(adapter.inputs) or "only the ids"
    raise ValueError(f"generate: {type(model).__module__}.{type(model).__name__} takes no "
                     f"inputs {sorted(unknown)} (it takes {takes})")
  if isinstance(adapter, _Flamingo) and model_inputs.get("vision_x") is None:
    raise ValueError("generate: a Flamingo needs vision_x=float[B, T_img, H, W, 3]")
  if do_sample and rng is None:
    raise ValueError("generate: do_sample=True needs rng (a jax.random key)")
  if rng is None:
    rng = jax.random.PRNGKey(0)  # unused without sampling; keeps one signature for the jit
  if np.ndim(input_ids) != 2 or np.shape(attention_mask) != np.shape(input_ids):
    raise ValueError(f"input_ids and attention_mask must both be [B, T], got {np.shape(input_ids)} "
                     f"and {np.shape(attention_mask)}")
  if not isinstance(attention_mask, jax.core.Tracer) and getattr(
      attention_mask, "is_fully_addressable", True):
    last = np.asarray(attention_mask)[:, -1]
    if not np.all(last):
      raise ValueError(f"generate: prompts must be left-padded (attention_mask[:, -1] == 1); rows "
                       f"{np.flatnonzero(last == 0).tolist()} end with padding")
  key = _ModelKey(model)
  if mesh is None:
    return _generate_jit(key, opts, None, None, params, jnp.asarray(input_ids, jnp.int32),
                         jnp.asarray(attention_mask, jnp.int32), rng, model_inputs)
  rules = sharding.logical_rules(rules)
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    ids, am = sharding.full_batch(input_ids, mesh), sharding.full_batch(attention_mask, mesh)
    inputs = {name: sharding.full_batch(v, mesh) for name, v in model_inputs.items()}
    return _generate_jit(key, opts, mesh, rules, params, ids, am, rng, inputs)
