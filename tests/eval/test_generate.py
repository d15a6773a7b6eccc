"""KV-cached generation of the decoder LMs (`vlm_jax.eval.generate`): greedy ids equal transformers'
`generate` token for token (left-padded rows, per-row stop tokens, min_new_tokens) for LLaMA,
GPT-NeoX and MPT; the cached decode equals a full forward at every step (scanned too); sampling
warpers equal transformers'; compiled programs are reused."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from tests.eval.hf_reference import (  # noqa: E402
  HF_LMS, INPUTS, MASK, PAD, build_hf_lm, hf_generate, positions)
from vlm_jax.convert import load_hf_lm  # noqa: E402
from vlm_jax.eval import cast_for_decoding, generate  # noqa: E402
from vlm_jax.eval.generate import DecodeOptions, _generate_jit, first_argmax, warp  # noqa: E402

N = 8


@pytest.fixture(scope="module", params=sorted(HF_LMS))
def lm(request, tmp_path_factory):
  """(family, transformers model, our model, params) for each LM family."""
  path = str(tmp_path_factory.mktemp(request.param))
  hf = build_hf_lm(request.param, path)
  model, params = load_hf_lm(path)
  return request.param, hf, model, params


def _ours(model, params, **kw):
  return np.asarray(generate(model, params, INPUTS, MASK, pad_token_id=PAD, **kw))


def _hf(hf, **kw):
  return hf_generate(hf, INPUTS, MASK, kw.pop("max_new_tokens", N), PAD, do_sample=False,
                     num_beams=1, **kw)


def test_greedy_matches_transformers_with_left_padding_and_stop_tokens(lm):
  _, hf, model, params = lm
  ref = _hf(hf)
  np.testing.assert_array_equal(_ours(model, params, max_new_tokens=N), ref)
  # Two stop tokens: row 0 stops at its 3rd token, the other stops a row only if it shows up.
  stops = (int(ref[0, 2]), int(ref[1, 5]))
  ref_stop = _hf(hf, eos_token_id=list(stops))
  got = _ours(model, params, max_new_tokens=N, stop_token_ids=stops)
  np.testing.assert_array_equal(got, ref_stop)
  first = int(np.flatnonzero(np.isin(got[0], stops))[0])
  assert first <= 2 and np.all(got[0, first + 1:] == PAD)  # stop token kept, then padding
  assert not np.all(got[1] == PAD)


def test_min_new_tokens_matches_transformers(llama):
  hf, model, params = llama
  ref = _hf(hf)
  stop = int(ref[0, 0])  # would stop row 0 at once without min_new_tokens
  kw = dict(min_new_tokens=3)
  got = _ours(model, params, max_new_tokens=N, stop_token_ids=(stop,), **kw)
  np.testing.assert_array_equal(got, _hf(hf, eos_token_id=[stop], **kw))
  assert stop not in got[0, :3].tolist()


def _full_forward_greedy(model, params, n):
  """Argmax of a full forward (no cache) over prompt + tokens so far, one token at a time."""
  apply = jax.jit(lambda p, ids, mask, pos: model.apply({"params": p}, ids, mask, pos)[0][:, -1])
  ids, mask, out = INPUTS, MASK, []
  for _ in range(n):
    tok = np.asarray(apply(params, ids, mask, positions(mask)).argmax(-1))
    out.append(tok)
    ids = np.concatenate([ids, tok[:, None]], 1)
    mask = np.concatenate([mask, np.ones_like(tok)[:, None]], 1)
  return np.stack(out, 1)


@pytest.mark.parametrize("scan", [False, True])
def test_cached_decode_equals_full_forward_at_every_step(lm, tmp_path, scan):
  family, hf, model, params = lm
  if scan:
    hf.save_pretrained(str(tmp_path))
    model, params = load_hf_lm(str(tmp_path), scan_layers=True)
  np.testing.assert_array_equal(_ours(model, params, max_new_tokens=N),
                                _full_forward_greedy(model, params, N))


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
  """(transformers model, our model, params) of the tiny LLaMA, for the decoder-independent tests."""
  path = str(tmp_path_factory.mktemp("llama_sampling"))
  hf = build_hf_lm("llama", path)
  return (hf, *load_hf_lm(path))


def test_sampling_top_k_1_is_greedy_and_a_fixed_rng_is_deterministic(llama):
  _, model, params = llama
  greedy = _ours(model, params, max_new_tokens=N)
  key = jax.random.PRNGKey(3)
  np.testing.assert_array_equal(
    _ours(model, params, max_new_tokens=N, do_sample=True, top_k=1, rng=key), greedy)
  kw = dict(max_new_tokens=N, do_sample=True, temperature=3.0, rng=key)
  a, b = _ours(model, params, **kw), _ours(model, params, **kw)
  np.testing.assert_array_equal(a, b)
  others = [_ours(model, params, **{**kw, "rng": jax.random.PRNGKey(s)}) for s in (4, 5)]
  assert any(not np.array_equal(a, o) for o in others)  # hot sampling does depend on the key


def test_sampled_tokens_stay_inside_top_k(llama):
  """Teacher-forced over the sampled ids, every sampled token is among the k most likely."""
  _, model, params = llama
  out = _ours(model, params, max_new_tokens=N, do_sample=True, top_k=3, temperature=5.0,
              rng=jax.random.PRNGKey(0))
  ids = np.concatenate([INPUTS, out], 1)
  mask = np.concatenate([MASK, np.ones_like(out)], 1)
  logits = np.asarray(model.apply({"params": params}, ids, mask, positions(mask))[0])
  step_logits = logits[:, INPUTS.shape[1] - 1:-1]  # the logits each new token was drawn from
  rank = (step_logits > np.take_along_axis(step_logits, out[..., None], -1)).sum(-1)
  assert rank.max() < 3, rank
  assert len(np.unique(out)) > 2  # and it is not just greedy


@pytest.mark.parametrize("temperature,top_k,top_p,keep", [
  (1.0, 5, 1.0, 1), (1.0, 0, 0.7, 1), (0.7, 4, 0.8, 1), (1.3, 0, 0.3, 3), (1.0, 1, 1.0, 2),
  (1.0, 0, 0.05, 1)])
def test_warpers_match_transformers(temperature, top_k, top_p, keep):
  logits = np.random.default_rng(0).normal(size=(4, 50)).astype(np.float32) * 3
  opts = DecodeOptions(max_new_tokens=1, do_sample=True, temperature=temperature, top_k=top_k,
                       top_p=top_p)
  got = np.asarray(warp(jnp.asarray(logits), opts, keep))
  procs = []
  if temperature != 1.0:
    procs.append(transformers.TemperatureLogitsWarper(temperature))
  if top_k:
    procs.append(transformers.TopKLogitsWarper(top_k, min_tokens_to_keep=keep))
  if top_p < 1.0:
    procs.append(transformers.TopPLogitsWarper(top_p, min_tokens_to_keep=keep))
  ref = torch.tensor(logits)
  for proc in procs:
    ref = proc(None, ref)
  ref = ref.numpy()
  np.testing.assert_array_equal(np.isinf(got), np.isinf(ref))
  np.testing.assert_allclose(got[~np.isinf(got)], ref[~np.isinf(ref)], rtol=1e-6)
  assert np.isinf(got).any() and (~np.isinf(got)).sum(-1).min() >= keep


def test_first_argmax_is_torch_argmax_with_ties_nans_and_infinities():
  """Greedy's token choice: the first maximum (torch.argmax and HF's greedy pick the first of
  tied maxima; a NaN wins, as in torch and jnp.argmax)."""
  s = np.random.default_rng(3).normal(size=(64, 300)).astype(np.float32)
  s[1, [7, 200]] = s[1].max() + 1.0  # a tie: index 7
  s[2, [250, 11]] = np.nan  # NaNs: the first, 11
  s[3] = -np.inf
  s[4, 90] = np.inf
  s[5] = 0.0  # all tied: 0
  s[6, -1] = s[6].max() + 1.0  # the last index
  got = np.asarray(jax.jit(first_argmax)(jnp.asarray(s)))
  ref = torch.argmax(torch.tensor(s), dim=-1).numpy()
  np.testing.assert_array_equal(got, ref)
  assert got.dtype == np.int32 and got[1:7].tolist() == [7, 11, 0, 90, 0, 299]


def test_repeated_calls_reuse_the_compiled_program(llama):
  _, model, params = llama
  _ours(model, params, max_new_tokens=4)
  size = _generate_jit._cache_size()
  _ours(model, jax.tree.map(lambda x: x * 1.01, params), max_new_tokens=4)
  same_config = type(model)(**{f: getattr(model, f) for f in model.__dataclass_fields__
                              if f not in ("parent", "name")})
  _ours(same_config, params, max_new_tokens=4)
  assert _generate_jit._cache_size() == size


def test_bad_inputs_get_clear_errors(llama):
  _, model, params = llama
  with pytest.raises(ValueError, match="left-padded"):
    generate(model, params, INPUTS, MASK[:, ::-1], max_new_tokens=2)
  with pytest.raises(ValueError, match="takes no inputs"):
    generate(model, params, INPUTS, MASK, max_new_tokens=2, vision_x=np.zeros((2, 1, 8, 8, 3)))
  with pytest.raises(ValueError, match="needs rng"):
    generate(model, params, INPUTS, MASK, max_new_tokens=2, do_sample=True)
  with pytest.raises(ValueError, match="top_p"):
    generate(model, params, INPUTS, MASK, max_new_tokens=2, top_p=0.0)


def test_bf16_weights_option_halves_the_bytes_and_keeps_the_clear_argmaxes(llama):
  """cast_for_decoding: bf16 params, bf16 KV caches, float32 logits within bf16's error of the
  float32 model's; where float32's top-2 margin exceeds twice that error, the greedy choice is the
  same; the cached bf16 decode equals the bf16 full forward (the cache keeps what was written)."""
  _, model, params = llama
  m16, p16 = cast_for_decoding(model, params)
  floats = [a for a in jax.tree.leaves(p16) if jnp.issubdtype(a.dtype, jnp.floating)]
  assert floats and all(a.dtype == jnp.bfloat16 for a in floats)
  assert sum(a.nbytes for a in floats) * 2 == sum(a.nbytes for a in jax.tree.leaves(params))
  assert m16.init_caches(2, 8)[0].k.dtype == jnp.bfloat16
  ref, _ = model.apply({"params": params}, INPUTS, MASK)
  got, _ = m16.apply({"params": p16}, INPUTS, MASK)
  assert got.dtype == jnp.float32
  ref, got = np.asarray(ref), np.asarray(got)
  err = np.abs(got - ref).max()
  assert err < 0.05 * np.abs(ref).max(), err
  top2 = np.sort(ref, axis=-1)[..., -2:]
  clear = (top2[..., 1] - top2[..., 0]) > 2 * err
  assert clear.sum() >= 1
  np.testing.assert_array_equal(got.argmax(-1)[clear], ref.argmax(-1)[clear])
  # Greedy bf16 decode = argmax of the bf16 full forward over prompt + generated tokens.
  ids = np.asarray(generate(m16, p16, INPUTS, MASK, max_new_tokens=4, pad_token_id=PAD))
  full_ids = np.concatenate([INPUTS, ids[:, :-1]], 1)
  full_mask = np.concatenate([MASK, np.ones_like(ids[:, :-1])], 1)
  logits, _ = m16.apply({"params": p16}, full_ids, full_mask, positions(full_mask))
  logits = np.asarray(logits)[:, INPUTS.shape[1] - 1:]
  top2 = np.sort(logits, axis=-1)[..., -2:]
  clear = (top2[..., 1] - top2[..., 0]) > 2 * err  # both bf16: no flip of a clear choice
  assert clear.mean() > 0.5
  np.testing.assert_array_equal(logits.argmax(-1)[clear], ids[clear])
