"""Beam search of `vlm_jax.eval.generate` equals transformers' beam search (its vectorised
`_beam_search`, early_stopping=False): the best beam per row, token for token, for several
length penalties (OpenFlamingo's 0.0 included), with stop tokens that end hypotheses early, with
min_new_tokens, and without stop tokens (hypotheses end at the length limit)."""

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from tests.eval.hf_reference import INPUTS, MASK, PAD, build_hf_lm, hf_generate  # noqa: E402
from vlm_jax.convert import load_hf_lm  # noqa: E402
from vlm_jax.eval import generate  # noqa: E402

N, BEAMS = 7, 3


@pytest.fixture(scope="module")
def lms(tmp_path_factory):
  """family -> (family, hf model, our model, params), built on first use and shared."""
  built = {}

  def get(family):
    if family not in built:
      path = str(tmp_path_factory.mktemp(family))
      hf = build_hf_lm(family, path)
      built[family] = (family, hf, *load_hf_lm(path))
    return built[family]
  return get


@pytest.fixture(scope="module")
def lm(lms):
  """The tiny LLaMA: length penalties, min_new_tokens and sampling do not depend on the decoder."""
  return lms("llama")


def _both(hf, model, params, **kw):
  ours = np.asarray(generate(model, params, INPUTS, MASK, max_new_tokens=N, num_beams=BEAMS,
                             pad_token_id=PAD, **kw))
  stops = kw.pop("stop_token_ids", ())
  ref = hf_generate(hf, INPUTS, MASK, N, PAD, num_beams=BEAMS, do_sample=False,
                    eos_token_id=list(stops) or None, **kw)
  return ours, ref


def _stop_tokens(hf, model, params):
  """Stop tokens the beams really meet: tokens 2 and 4 of the unconstrained best beams."""
  ours, _ = _both(hf, model, params, length_penalty=1.0)
  return int(ours[0, 2]), int(ours[1, 4])


@pytest.mark.parametrize("family,length_penalty", [
  ("llama", 0.0), ("llama", 1.0), ("llama", 2.0), ("llama", -1.0), ("gpt_neox", 0.0)])
def test_beam_search_matches_transformers_with_stop_tokens(lms, family, length_penalty):
  _, hf, model, params = lms(family)
  stops = _stop_tokens(hf, model, params)
  ours, ref = _both(hf, model, params, length_penalty=length_penalty, stop_token_ids=stops)
  np.testing.assert_array_equal(ours, ref)
  if length_penalty <= 1.0:  # (2.0 favours long hypotheses enough to prefer running on here)
    assert np.isin(ours, stops).any()  # the best hypothesis did end at a stop token
  for row in ours:  # nothing but padding after a row's stop token
    hit = np.flatnonzero(np.isin(row, stops))
    if hit.size:
      assert np.all(row[hit[0] + 1:] == PAD)


def test_beam_search_without_stop_tokens_and_with_min_new_tokens(lm):
  _, hf, model, params = lm
  ours, ref = _both(hf, model, params, length_penalty=1.0)
  np.testing.assert_array_equal(ours, ref)
  assert not np.any(ours == PAD) or PAD in ref  # full length: no hypothesis ended early
  stops = _stop_tokens(hf, model, params)
  ours, ref = _both(hf, model, params, length_penalty=0.0, stop_token_ids=stops, min_new_tokens=4)
  np.testing.assert_array_equal(ours, ref)
  assert not np.isin(ours[:, :4], stops).any()


def test_beam_sampling_is_deterministic_for_a_fixed_rng(lm):
  _, hf, model, params = lm
  kw = dict(max_new_tokens=N, num_beams=BEAMS, do_sample=True, temperature=2.0, top_k=20,
            pad_token_id=PAD)
  a = generate(model, params, INPUTS, MASK, rng=jax.random.PRNGKey(0), **kw)
  b = generate(model, params, INPUTS, MASK, rng=jax.random.PRNGKey(0), **kw)
  np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert a.shape == (2, N)
