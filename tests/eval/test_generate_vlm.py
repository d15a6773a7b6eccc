"""KV-cached generation of the vision-language models equals the uncached path: transformers'
greedy and beam search loops driving our full forward (prompt + tokens so far, images included)
at every step. Flamingo (per-layer and scanned): media keys/values computed once at the prefill,
new tokens attending to the last prompt image, per-row stop tokens, OpenFlamingo's beam settings;
the decode loop holds no vision tower. LLaVA: also equal to transformers' own LLaVA `generate`."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from tests.eval.hf_reference import UncachedShim, hf_generate, positions  # noqa: E402
from tests.models.test_scan_remat import _init, _stacked  # noqa: E402
from vlm_jax.convert import load_hf_llava  # noqa: E402
from vlm_jax.eval import generate  # noqa: E402
from vlm_jax.eval.generate import DecodeOptions, _generate_jit, _ModelKey  # noqa: E402
from vlm_jax.models import flamingo  # noqa: E402

PAD, MEDIA, N = 1, 3, 6
LM = dict(vocab_size=40, hidden_size=32, num_layers=4, num_heads=4, num_kv_heads=2, mlp_dim=48)
FLAMINGO = dict(vision=dict(image_size=16, patch_size=8, width=16, depth=1, heads=2), lm=LM,
                resampler=dict(depth=1, heads=2, dim_head=8, num_latents=3),
                xattn=dict(heads=2, dim_head=8), cross_attn_every_n_layers=2, media_token_id=MEDIA)
# Two images per row; row 1 is left-padded.
IDS = np.array([[5, MEDIA, 6, 7, 8, 4, MEDIA, 9, 10, 11],
                [0, 0, 0, MEDIA, 12, 13, 4, MEDIA, 14, 15]])
MASK = (IDS != 0).astype(np.int32)
VISION_X = np.random.default_rng(1).normal(size=(2, 2, 16, 16, 3)).astype(np.float32)


@pytest.fixture(scope="module", params=[False, True], ids=["per_layer", "scanned"])
def fl(request):
  """(model, params) with open tanh gates, per-layer or scanned (same weights)."""
  model = flamingo.Model(**FLAMINGO)
  params = _init(model, VISION_X, IDS, MASK)
  if not request.param:
    return model, params
  scanned = flamingo.Model(**{**FLAMINGO, "lm": dict(LM, scan_layers=True)})
  return scanned, _stacked(scanned, params)


def _uncached(model, params, vision_x, vocab):
  """transformers' generate loop over our full forward: vision tower, resampler and every token
  again at each step (rows repeated per beam as HF repeats the prompts)."""
  apply = jax.jit(lambda p, vx, ids, mask, pos: model.apply({"params": p}, vx, ids, mask,
                                                            positions=pos)[0])

  def fn(ids, mask):
    vx = np.repeat(vision_x, ids.shape[0] // vision_x.shape[0], axis=0)
    return np.asarray(apply(params, vx, ids, mask, positions(mask)))
  return UncachedShim(fn, vocab)


def _generate(model, params, vision_x=VISION_X, **kw):
  return np.asarray(generate(model, params, IDS, MASK, max_new_tokens=N, pad_token_id=PAD,
                             vision_x=vision_x, **kw))


def test_flamingo_greedy_equals_uncached_with_per_row_stop_tokens(fl):
  model, params = fl
  ref_model = _uncached(model, params, VISION_X, LM["vocab_size"])
  ref = hf_generate(ref_model, IDS, MASK, N, PAD, do_sample=False)
  np.testing.assert_array_equal(_generate(model, params), ref)
  stops = (int(ref[0, 1]), int(ref[1, 3]))
  got = _generate(model, params, stop_token_ids=stops)
  np.testing.assert_array_equal(
    got, hf_generate(ref_model, IDS, MASK, N, PAD, do_sample=False, eos_token_id=list(stops)))
  for row in got:  # each row stops at its own first stop token, the rest is padding
    hit = int(np.flatnonzero(np.isin(row, stops))[0])
    assert np.all(row[hit + 1:] == PAD)
  assert np.flatnonzero(np.isin(got[0], stops))[0] <= 1


def test_flamingo_beam_search_equals_uncached_openflamingo_settings(fl):
  """OpenFlamingo's eval: num_beams=3, length_penalty=0.0, min_new_tokens=0, stop tokens."""
  model, params = fl
  ref_model = _uncached(model, params, VISION_X, LM["vocab_size"])
  free = hf_generate(ref_model, IDS, MASK, N, PAD, do_sample=False, num_beams=3)
  stops = (int(free[0, 2]), int(free[1, 1]))
  kw = dict(num_beams=3, length_penalty=0.0, min_new_tokens=0)
  got = _generate(model, params, stop_token_ids=stops, **kw)
  ref = hf_generate(ref_model, IDS, MASK, N, PAD, do_sample=False, eos_token_id=list(stops), **kw)
  np.testing.assert_array_equal(got, ref)
  assert np.isin(got, stops).any()


def test_flamingo_images_matter_and_rows_do_not_mix(fl):
  model, params = fl
  both = _generate(model, params, num_beams=3)
  alone = np.asarray(generate(model, params, IDS[1:], MASK[1:], max_new_tokens=N, num_beams=3,
                              pad_token_id=PAD, vision_x=VISION_X[1:]))
  np.testing.assert_array_equal(both[1:], alone)
  swapped = _generate(model, params, vision_x=VISION_X[:, ::-1].copy())  # images swapped
  assert not np.array_equal(swapped, _generate(model, params))


def _primitives(jaxpr) -> set[str]:
  """Every primitive name in a jaxpr, sub-jaxprs (loops, conds, calls) included."""
  out = set()
  for eqn in jaxpr.eqns:
    out.add(eqn.primitive.name)
    for v in eqn.params.values():
      for sub in v if isinstance(v, (list, tuple)) else [v]:
        inner = getattr(sub, "jaxpr", sub)
        if hasattr(inner, "eqns"):
          out |= _primitives(inner)
  return out


def test_flamingo_decode_loop_does_not_run_the_vision_tower(fl):
  """The ViT's patch embedding (a convolution) appears at the prefill and never in the loop."""
  model, params = fl
  traced = _generate_jit.trace(_ModelKey(model), DecodeOptions(max_new_tokens=N), None, None,
                               params, jnp.asarray(IDS), jnp.asarray(MASK), jax.random.PRNGKey(0),
                               {"vision_x": jnp.asarray(VISION_X)})
  eqns = traced.jaxpr.jaxpr.eqns
  loops = [e for e in eqns if e.primitive.name == "while"]
  assert len(loops) == 1
  assert "conv_general_dilated" in _primitives(traced.jaxpr.jaxpr)
  assert "conv_general_dilated" not in _primitives(loops[0].params["body_jaxpr"].jaxpr)


# LLaVA: a tiny random transformers LLaVA, converted.
IMAGE, P = 99, 16  # image token id; (32 / 8)^2 patches per image, CLS dropped
LLAVA_IDS = np.array([[1, 5, 7] + [IMAGE] * P + [11, 12, 13, 14, 15],
                      [0, 0, 0, 1] + [IMAGE] * P + [21, 22, 23, 24]])
LLAVA_MASK = np.array([[1] * 24, [0, 0, 0] + [1] * 21])
PIXELS = np.random.default_rng(0).normal(size=(2, 3, 32, 32)).astype(np.float32)  # NCHW


@pytest.fixture(scope="module")
def llava(tmp_path_factory):
  torch.manual_seed(0)
  vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                image_size=32, patch_size=8, hidden_act="quick_gelu", layer_norm_eps=1e-5)
  text = dict(vocab_size=100, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5,
              initializer_range=0.2, bos_token_id=None, eos_token_id=None, pad_token_id=None)
  cfg = transformers.LlavaConfig(
    vision_config=transformers.CLIPVisionConfig(**vision),
    text_config=transformers.LlamaConfig(**text), image_token_index=IMAGE,
    vision_feature_layer=-2, vision_feature_select_strategy="default", projector_hidden_act="gelu")
  hf = transformers.LlavaForConditionalGeneration(cfg).eval()
  with torch.no_grad():
    for p in hf.parameters():
      p.add_(0.2 * torch.randn_like(p))
  hf.generation_config.eos_token_id = hf.generation_config.bos_token_id = None
  path = str(tmp_path_factory.mktemp("llava"))
  hf.save_pretrained(path)
  model, params = load_hf_llava(path)
  return hf, model, params


def test_llava_greedy_equals_transformers(llava):
  """Row 0 generates the image token id (99) as its 2nd token: at a decoding step it is an
  ordinary token with its own embedding row, as in transformers."""
  hf, model, params = llava
  got = np.asarray(generate(model, params, LLAVA_IDS, LLAVA_MASK, max_new_tokens=N,
                            pad_token_id=PAD, images=PIXELS.transpose(0, 2, 3, 1)))
  with torch.no_grad():
    out = hf.generate(input_ids=torch.tensor(LLAVA_IDS), attention_mask=torch.tensor(LLAVA_MASK),
                      pixel_values=torch.tensor(PIXELS), max_new_tokens=N, do_sample=False,
                      pad_token_id=PAD)
  np.testing.assert_array_equal(got, out[:, LLAVA_IDS.shape[1]:].numpy())
  assert got[0, 1] == IMAGE


def test_llava_greedy_and_beams_equal_the_uncached_path(llava):
  """Over a prompt whose continuations hold no image-token id (the uncached forward would read one
  as an image slot)."""
  _, model, params = llava
  ids = LLAVA_IDS.copy()
  ids[0, -5:] = [41, 42, 43, 44, 45]
  images = PIXELS.transpose(0, 2, 3, 1)
  ref = _uncached(model, params, images, 100)

  def ours(**kw):
    return np.asarray(generate(model, params, ids, LLAVA_MASK, max_new_tokens=N, pad_token_id=PAD,
                               images=images, **kw))
  got = ours()
  np.testing.assert_array_equal(got, hf_generate(ref, ids, LLAVA_MASK, N, PAD, do_sample=False))
  assert IMAGE not in got
  # Beams: our prefill runs once per row and repeats the caches per beam; the reference repeats
  # the prompts and images per beam, as HF does.
  kw = dict(num_beams=3, length_penalty=0.0, stop_token_ids=(int(got[0, 2]),))
  beams = ours(**kw)
  stops = list(kw.pop("stop_token_ids"))
  np.testing.assert_array_equal(
    beams, hf_generate(ref, ids, LLAVA_MASK, N, PAD, do_sample=False, eos_token_id=stops, **kw))
