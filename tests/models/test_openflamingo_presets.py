"""The five OpenFlamingo presets have the released models' shapes (counted without allocating)."""

import jax
import numpy as np
import jax.numpy as jnp
import pytest
from flax import linen as nn

from tests.train.configs_loader import load_config
from vlm_jax.models import build_model
from vlm_jax.param_paths import flatten


def _counts(preset):
  c = load_config("flamingo", preset)
  model = build_model(c.model_name, c.model)
  abstract = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, 1, 224, 224, 3)),
                            jnp.zeros((1, 4), jnp.int32))["params"]
  flat = {k: v.size for k, v in flatten(nn.unbox(abstract)).items()}
  return c, {top: sum(n for k, n in flat.items() if k.split("/")[0] == top)
             for top in {k.split("/")[0] for k in flat}}


# (LM width, xattn blocks, LM params). The LMs' published sizes at their 50432-token vocabulary are
# MPT-7B 6,649,286,656 and RedPajama-INCITE-3B 2,775,864,320; OpenFlamingo resizes to 50280 rows
# (152 fewer per embedding matrix: tied in MPT, untied in GPT-NeoX).
# MPT-1B (MosaicGPT, no_bias, qk LayerNorm) counted from its shapes: 24 x (Wqkv 3D^2 + out D^2 + up/down
# 2 x 4D^2) + the tied 50280 x D wte + 24 x 4 bias-free LayerNorms (ln_1, q_ln, k_ln, ln_2) + ln_f.
_MPT_1B = 24 * 12 * 2048**2 + 50280 * 2048 + 24 * 4 * 2048 + 2048


@pytest.mark.parametrize("preset,width,blocks,lm_params", [
  ("of3b", 2048, 24, _MPT_1B), ("of4b", 2560, 16, 2_775_864_320 - 2 * 152 * 2560), ("of9b", 4096, 8, 6_649_286_656 - 152 * 4096)])
def test_shapes_match_the_released_models(preset, width, blocks, lm_params):
  c, counts = _counts(preset)
  xattn = {k: n for k, n in counts.items() if k.startswith("xattn_")}
  assert len(xattn) == blocks
  # One GatedCrossAttentionBlock (OpenFlamingo helpers.py): LN(D) + to_q D->512 + to_kv 1024->1024 +
  # to_out 512->D + LN(D) + D->4D->D + two gates = 8 D^2 + 1028 D + 1048578.
  assert set(xattn.values()) == {8 * width**2 + 1028 * width + 1_048_578}
  # PerceiverResampler(dim=1024): 64 latents, 6 layers, final LN = 63,019,008 (OpenFlamingo "~63M").
  assert counts["resampler"] == 63_019_008
  assert counts["vision"] == 303_179_776  # HF CLIPVisionModel ViT-L/14 (no projection)
  assert counts["lm"] == lm_params
  assert c.model.lm["vocab_size"] == 50280 and c.model.media_token_id == 50278


def test_presets_train_on_openflamingos_data_mixture(tmp_path):
  """The presets' data is OpenFlamingo's LAION + MMC4 concat mixture; the shared tokenizer and path
  overrides reach both components, and the pipeline builds from WebDataset shards."""
  from tests.data.web_fixtures import noise_png, write_tar
  from vlm_jax.data.pipeline import make_dataset
  c = load_config("flamingo", "of9b")
  mix = c.data.mixture
  assert (mix.laion.weight, mix.mmc4.weight) == (0.2, 1.0)
  assert (mix.laion.max_text_len, mix.mmc4.max_text_len, mix.mmc4.max_images) == (32, 256, 6)
  assert (mix.laion.batch_size, mix.mmc4.batch_size) == (4096, 2048)
  shard = str(tmp_path / "laion-00000.tar")
  write_tar(shard, [m for i in range(4) for m in ((f"{i}.png", noise_png(i, 16)), (f"{i}.txt", b"a cat"))])
  c.data.tokenizer = "synthetic"
  c.data.mixture.laion.paths = shard
  assert c.data.mixture.laion.paths == shard and c.data.mixture.mmc4.tokenizer == "synthetic"
  laion = {k: v for k, v in c.data.mixture.laion.items() if k not in ("batch_size", "weight")}
  batch = next(iter(make_dataset({**laion, "image_size": 16}, split="train", batch_size=2,
                                 process_index=0, process_count=1)))
  assert batch["inputs"]["vision_x"].dtype == np.uint8 and batch["inputs"]["input_ids"].shape == (2, 32)


@pytest.mark.parametrize("preset", ["default", "of3b"])
def test_scale_knobs_are_command_line_overridable(preset):
  """The config flag is locked (no new keys), so every preset declares the dtype / scan / remat
  fields; overriding them through absl's config flags builds the scaled model."""
  from absl import flags
  from ml_collections import config_flags

  from tests.train.configs_loader import ROOT
  argv = ["prog", f"--config={ROOT}/configs/flamingo.py:{preset}", "--config.model.dtype=bfloat16",
          "--config.model.lm.scan_layers=True", "--config.model.lm.remat_policy=full",
          "--config.model.vision.scan_layers=True", "--config.model.vision.remat_policy=full"]
  fv = flags.FlagValues()
  config_flags.DEFINE_config_file("config", None, "", flag_values=fv, lock_config=True,
                                  sys_argv=argv)
  fv(argv)
  c = fv.config
  model = build_model(c.model_name, c.model)
  assert model.dtype == "bfloat16" and c.model.lm.scan_layers and c.model.vision.remat_policy == "full"
  size = c.model.vision["image_size"]
  abstract = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, 1, size, size, 3)),
                            jnp.zeros((1, 4), jnp.int32))["params"]
  flat = flatten(nn.unbox(abstract))
  layers = c.model.lm["num_layers"]
  assert flat["lm/layers/attn/q/kernel"].shape[0] == layers  # scanned: a leading layer axis
  assert flat["lm/layers/xattn/attn_gate"].shape[0] == layers // c.model.cross_attn_every_n_layers
  assert flat["vision/layers/attn/q/kernel"].shape[0] == c.model.vision["depth"]
