"""Layer stacking (`scan_layers`) and rematerialisation (`remat_policy`): the scanned model with the
per-layer params stacked (`param_paths.stack_layers`) gives the per-layer model's outputs, for every
decoder family, the ViT and Flamingo (xattn interleaved per group of layers); remat changes nothing
numerically; KV-cache decoding works scanned; converters load into and export from scanned
models."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from tests.train.configs_loader import load_config
from vlm_jax.layers.gated_xattn import GatedCrossAttentionBlock, media_text_time
from vlm_jax.layers.scan import REMAT_POLICIES
from vlm_jax.models import flamingo, gpt_neox, llama, mpt, vit
from vlm_jax.param_paths import (flatten, stack_layers, to_per_layer, to_stacked, unflatten,
                                 unstack_layers)

IDS = jnp.array([[5, 9, 14, 3, 22, 7, 31, 8], [0, 0, 11, 4, 19, 6, 27, 2]])
MASK = jnp.array([[1] * 8, [0, 0, 1, 1, 1, 1, 1, 1]])
REAL = np.asarray(MASK, bool)
TINY = dict(vocab_size=50, hidden_size=32, num_layers=4, num_heads=4, mlp_dim=48)
DECODERS = {
  # Windowed after the first layer: the scan picks each layer's mask by a per-layer flag.
  "llama": (llama.Model, dict(TINY, num_kv_heads=2, sliding_window=4, full_attention_layers=1)),
  "gpt_neox": (gpt_neox.Model, dict(TINY, rotary_pct=0.5)),
  "mpt": (mpt.Model, dict(TINY, qk_norm=True, use_bias=True)),
}


def _apply(model, params, *inputs):
  """model.apply under jit (a scan runs faster compiled than op by op)."""
  return jax.jit(lambda p, *x: model.apply({"params": p}, *x))(params, *inputs)


def _init(model, *inputs, seed=0):
  """Random params of the model's shapes without running (or compiling) its init: weights large
  enough that attention is far from uniform (a mask or layer-order bug shows), norm scales near
  1."""
  rng = np.random.default_rng(seed)
  shapes = nn.unbox(jax.eval_shape(model.init, jax.random.PRNGKey(0), *inputs)["params"])

  def draw(path, a):
    name = jax.tree_util.keystr(path)
    if "scale" in name:
      return jnp.asarray(1.0 + 0.2 * rng.normal(size=a.shape), a.dtype)
    if name.endswith("_gate']"):  # Flamingo's tanh gates, 0 at init: open them so xattn counts
      return jnp.full(a.shape, 0.7, a.dtype)
    # Kernels are [in..., out...]: the output projection `o` [heads, kv, embed] and the patch
    # conv [kh, kw, 3, width] contract more than their first axis.
    n_in = 2 if "['o']" in name else 3 if "patch" in name else 1
    fan_in = int(np.prod(a.shape[:n_in])) if a.ndim > 1 else 1
    return jnp.asarray(rng.normal(size=a.shape) * (1.5 / np.sqrt(fan_in)), a.dtype)
  return jax.tree_util.tree_map_with_path(draw, shapes)


def _stacked(model, params):
  return unflatten(to_stacked(flatten(params), model.layer_stacks()))


def _close(a, b, atol=1e-5):
  np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=atol, rtol=atol)


def test_stack_unstack_round_trip_and_errors():
  rng = np.random.default_rng(0)
  flat = {f"lm/layers_{i}/attn/q/kernel": rng.normal(size=(4, 2, 3)) for i in range(3)}
  flat |= {f"lm/layers_{i}/norm/scale": rng.normal(size=(4,)) for i in range(3)}
  flat["lm/embed/embedding"] = rng.normal(size=(5, 4))
  stacked = stack_layers(flat, "lm/layers_{i}")
  assert sorted(stacked) == ["lm/embed/embedding", "lm/layers/attn/q/kernel",
                             "lm/layers/norm/scale"]
  assert stacked["lm/layers/attn/q/kernel"].shape == (3, 4, 2, 3)
  np.testing.assert_array_equal(stacked["lm/layers/attn/q/kernel"][2],
                                flat["lm/layers_2/attn/q/kernel"])
  back = unstack_layers(stacked, "lm/layers", "lm/layers_{i}")
  assert back.keys() == flat.keys() and all(np.array_equal(back[k], flat[k]) for k in flat)
  # Non-contiguous ids (Flamingo's xattn_1, xattn_3) under another name.
  xattn = {f"xattn_{i}/attn_gate": np.full((1,), i, np.float32) for i in (1, 3)}
  s = stack_layers(xattn, "xattn_{i}", "lm/layers/xattn", indices=(1, 3))
  np.testing.assert_array_equal(s["lm/layers/xattn/attn_gate"][:, 0], [1, 3])
  assert unstack_layers(s, "lm/layers/xattn", "xattn_{i}", (1, 3)).keys() == xattn.keys()
  del flat["lm/layers_1/norm/scale"]
  with pytest.raises(ValueError, match=r"'norm/scale' exists for layers \[0, 2\]"):
    stack_layers(flat, "lm/layers_{i}")


@pytest.mark.parametrize("name", sorted(DECODERS))
def test_scanned_decoder_equals_per_layer_and_decodes_with_caches(name):
  cls, cfg = DECODERS[name]
  model, scanned = cls(**cfg), cls(**cfg, scan_layers=True)
  params = _init(model, IDS, MASK)
  stacked = _stacked(scanned, params)
  abstract = nn.unbox(jax.eval_shape(scanned.init, jax.random.PRNGKey(0), IDS, MASK)["params"])
  assert jax.tree.map(lambda a: a.shape, abstract) == jax.tree.map(lambda a: a.shape, stacked)
  assert "layers" in stacked and "layers_0" not in stacked
  full, _ = model.apply({"params": params}, IDS, MASK)
  got, _ = _apply(scanned, stacked, IDS, MASK)
  _close(got, full)
  with pytest.raises(ValueError, match="stacked KVCache"):
    scanned.apply({"params": stacked}, IDS, MASK, caches=model.init_caches(2, 8))
  with pytest.raises(ValueError, match="before_layer"):
    scanned.apply({"params": stacked}, IDS, MASK, before_layer=lambda i, h: h)
  if name == "gpt_neox":  # its cache path is LLaMA's; keep the test quick
    return
  # Scanned decoding: one stacked cache [L, B, S, K, D], prefill then token by token.
  caches = scanned.init_caches(2, 8)
  assert caches.k.shape[0] == cfg["num_layers"]
  step = jax.jit(lambda p, x, c: scanned.apply({"params": p}, x, MASK, caches=c))
  logits, aux = step(stacked, IDS[:, :5], caches)
  steps = [logits]
  for t in range(5, 8):
    logits, aux = step(stacked, IDS[:, t:t + 1], aux["caches"])
    steps.append(logits)
  np.testing.assert_allclose(np.asarray(jnp.concatenate(steps, 1))[REAL], np.asarray(full)[REAL],
                             atol=2e-5, rtol=2e-5)
  assert aux["caches"].index.tolist() == [8] * cfg["num_layers"]


def test_scanned_vit_equals_per_layer_hidden_states_included():
  cfg = dict(image_size=16, patch_size=8, width=16, depth=3, heads=2)
  model, scanned = vit.Model(**cfg), vit.Model(**cfg, scan_layers=True)
  images = jnp.asarray(np.random.default_rng(0).normal(size=(2, 16, 16, 3)), jnp.float32)
  params = _init(model, images)
  out, aux = model.apply({"params": params}, images)
  got, saux = _apply(scanned, _stacked(scanned, params), images)
  _close(got, out)
  assert len(saux["hidden_states"]) == len(aux["hidden_states"]) == 4
  for a, b in zip(saux["hidden_states"], aux["hidden_states"]):
    _close(a, b)
  _close(saux["pooled"], aux["pooled"])


def _flamingo_cfg(scan: bool) -> dict:
  """configs/flamingo.py:tiny shapes with enough layers to scan: 4 LM layers, xattn every 2."""
  c = load_config("flamingo", "tiny").model.to_dict()
  c["cross_attn_every_n_layers"] = 2
  c["lm"] = dict(c["lm"], num_layers=4, scan_layers=scan)
  c["vision"] = dict(c["vision"], depth=2, scan_layers=scan)
  return c


def _flamingo_inputs(cfg):
  s, media = cfg["vision"]["image_size"], cfg["media_token_id"]
  vx = jnp.asarray(np.random.default_rng(1).normal(size=(2, 2, s, s, 3)), jnp.float32)
  ids = jnp.array([[5, 6, media, 7, 8, 9, media, 9, 10, 0],
                   [media, 11, 12, 13, media, 13, 14, 15, 1, 0]])
  return vx, ids, (ids != 0).astype(jnp.int32)


@pytest.fixture(scope="module")
def flamingo_setup():
  cfg = _flamingo_cfg(False)
  model, scanned = flamingo.Model(**cfg), flamingo.Model(**_flamingo_cfg(True))
  inputs = _flamingo_inputs(cfg)
  params = _init(model, *inputs)
  return model, scanned, params, _stacked(scanned, params), inputs


def test_scanned_flamingo_equals_per_layer_with_xattn_per_group(flamingo_setup):
  model, scanned, params, stacked, inputs = flamingo_setup
  assert sorted(k for k in params if k.startswith("xattn_")) == ["xattn_1", "xattn_3"]
  # Decoder layers as the scanned LM's, one xattn block per group of 2 layers.
  assert stacked["lm"]["layers"]["attn"]["q"]["kernel"].shape[0] == 4
  assert stacked["lm"]["layers"]["xattn"]["attn_gate"].shape == (2, 1)
  abstract = nn.unbox(jax.eval_shape(scanned.init, jax.random.PRNGKey(0), *inputs)["params"])
  assert jax.tree.map(lambda a: a.shape, abstract) == jax.tree.map(lambda a: a.shape, stacked)
  full, _ = _apply(model, params, *inputs)
  apply = jax.jit(lambda p: scanned.apply({"params": p}, *inputs))
  got, _ = apply(stacked)
  _close(got, full)
  gates_shut = jax.tree.map(lambda x: x, stacked)
  gates_shut["lm"]["layers"]["xattn"]["attn_gate"] = jnp.zeros((2, 1))
  shut, _ = apply(gates_shut)
  assert np.abs(np.asarray(shut - got)).max() > 1e-4  # the xattn blocks are really applied
  back = to_per_layer(flatten(stacked), scanned.layer_stacks())
  assert back.keys() == flatten(params).keys()
  with pytest.raises(ValueError, match="must be a multiple"):
    flamingo.Model(**{**_flamingo_cfg(True), "cross_attn_every_n_layers": 3})


def _loss_and_grads(model, params, *inputs, jit=True):
  """(loss, grads) of a token log-likelihood; the last input is the token mask."""
  def loss(p):
    logits, _ = model.apply({"params": p}, *inputs)
    return jnp.mean(jax.nn.log_softmax(logits)[..., 1] * inputs[-1])
  fn = jax.value_and_grad(loss)
  return (jax.jit(fn) if jit else fn)(params)


def _assert_same_loss_and_grads(got, ref, rel):
  """Loss to 1e-6, gradients to `rel` of the largest gradient (all exactly 0 would be vacuous)."""
  np.testing.assert_allclose(got[0], ref[0], atol=1e-6)
  scale = max(float(jnp.abs(g).max()) for g in jax.tree.leaves(ref[1]))
  assert scale > 1e-3
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=rel * scale, rtol=0), got[1],
               ref[1])


def test_every_remat_policy_gives_the_same_loss_and_gradients():
  """Op by op (no jit) the recomputed forward pass is bit-identical, so any difference would be a
  policy that changes the math."""
  cls, cfg = DECODERS["llama"]
  cfg = dict(cfg, num_layers=2)
  params = _init(cls(**cfg), IDS, MASK)
  ref = _loss_and_grads(cls(**cfg), params, IDS, MASK, jit=False)
  for policy in sorted(set(REMAT_POLICIES) - {"none"}):
    got = _loss_and_grads(cls(**cfg, remat_policy=policy), params, IDS, MASK, jit=False)
    _assert_same_loss_and_grads(got, ref, rel=1e-6)
  with pytest.raises(ValueError, match="remat_policy 'fastest' is not one of"):
    cls(**cfg, remat_policy="fastest")


class _LMWithXattn(nn.Module):
  """Flamingo's LM part given its media: a scanned LM with a gated xattn block before every layer
  (groups of 1 keep the compile small; the 2-layer interleave is checked against Flamingo above)."""

  remat_policy: str = "none"

  @nn.compact
  def __call__(self, ids, media, text_time, mask):
    lm = llama.Model(**dict(TINY, num_layers=2), scan_layers=True, remat_policy=self.remat_policy,
                     name="lm")
    block = functools.partial(GatedCrossAttentionBlock, heads=2, dim_head=8)
    return lm(ids, mask, layer_group=llama.LayerGroup(1, block, (media, text_time)))


def test_remat_inside_scans_gives_the_same_loss_and_gradients():
  """Compiled, XLA may fuse the recomputation differently: float32 roundings (the norms compute in
  float32 even in float64 mode) of a few ulp; a wrong policy or a lost gradient is off by O(1)."""
  cls, cfg = DECODERS["llama"]
  params = _stacked(cls(**cfg, scan_layers=True), _init(cls(**cfg), IDS, MASK))
  ref = _loss_and_grads(cls(**cfg, scan_layers=True), params, IDS, MASK)
  got = _loss_and_grads(cls(**cfg, scan_layers=True, remat_policy="dots_with_no_batch_dims_saveable"),
                        params, IDS, MASK)
  _assert_same_loss_and_grads(got, ref, rel=1e-5)
  # The grouped scan (decoder layers + xattn block per step) rematerialises both.
  media = jnp.asarray(np.random.default_rng(2).normal(size=(2, 2, 3, 16)), jnp.float32)
  inputs = (IDS, media, media_text_time(IDS == 3), MASK)
  params = _init(_LMWithXattn(), *inputs)
  ref = _loss_and_grads(_LMWithXattn(), params, *inputs)
  got = _loss_and_grads(_LMWithXattn("save_qkv_proj"), params, *inputs)
  assert float(jnp.abs(ref[1]["lm"]["layers"]["xattn"]["attn_gate"]).max()) > 0
  _assert_same_loss_and_grads(got, ref, rel=1e-5)


def test_hf_llama_into_scanned_model_export_and_init_restore(tmp_path):
  pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  from tests.convert.test_hf_lm import INPUTS, MASK as HF_MASK, _hf_logits, _tiny_llama
  from vlm_jax import converted
  from vlm_jax.convert import load_hf_lm, save_hf_lm
  from vlm_jax.train import init as init_lib
  from vlm_jax.train.state import TrainState

  hf_model = _tiny_llama(str(tmp_path / "hf"))
  model, params = load_hf_lm(str(tmp_path / "hf"), scan_layers=True)
  assert model.scan_layers and params["layers"]["attn"]["q"]["kernel"].shape[0] == 2
  ref = _hf_logits(hf_model)
  real = HF_MASK.astype(bool)
  logits, _ = _apply(model, params, jnp.asarray(INPUTS, jnp.int32), jnp.asarray(HF_MASK))
  np.testing.assert_allclose(np.asarray(logits)[real], ref[real], atol=1e-4, rtol=1e-4)
  # Export writes per-layer HF keys again.
  save_hf_lm(model, params, str(tmp_path / "export"))
  reloaded = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "export")).eval()
  np.testing.assert_allclose(_hf_logits(reloaded)[real], ref[real], atol=1e-4, rtol=1e-4)

  # config.init.checkpoint: a per-layer converted directory restored into the scanned model.
  per_layer_model, per_layer = load_hf_lm(str(tmp_path / "hf"))
  out = str(tmp_path / "converted")
  converted.save_converted(out, "llama", {}, per_layer)
  zeros = jax.tree.map(jnp.zeros_like, params)
  state = TrainState(jnp.zeros((), jnp.int32), zeros, {}, None)
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                          state)
  restored = init_lib.load_converted_checkpoint(out, "", state, abstract, model.layer_stacks())
  jax.tree.map(np.testing.assert_array_equal, restored.trainable, params)
  assert per_layer_model.layer_stacks() == ()
  with pytest.raises(KeyError, match="needs all 2 layers"):
    init_lib.stack_rows({"layers_0/input_norm/scale": jnp.ones(32)}, flatten(abstract.trainable),
                        {f"layers_{i}/input_norm/scale": ("layers/input_norm/scale", i)
                         for i in range(2)}, source="test")
