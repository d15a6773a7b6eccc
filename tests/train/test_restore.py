"""Params for evaluation (`vlm_jax.train.restore`): from a converted directory (model from its
model.json, frozen towers cast as training would hold them), and clear errors when there is nothing to
load or the checkpoint lacks params."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from tests.train.configs_loader import load_config
from vlm_jax import converted
from vlm_jax.models import build_model
from vlm_jax.param_paths import flatten, unflatten
from vlm_jax.train import restore


@pytest.fixture(scope="module")
def tiny_converted(tmp_path_factory):
  config = load_config("flamingo", "tiny")
  model = build_model(config.model_name, config.model)
  params = nn.unbox(model.init(jax.random.PRNGKey(3), **restore.example_inputs(model))["params"])
  out = str(tmp_path_factory.mktemp("conv") / "tiny")
  converted.save_converted(out, config.model_name, dict(config.model), params, source="test")
  return config, params, out


def test_converted_directory_gives_the_model_and_its_params(tiny_converted):
  _, params, out = tiny_converted
  config = load_config("flamingo", "tiny")
  config.init.checkpoint = out
  config.model_name = ""  # the model comes from model.json
  config.frozen_param_dtype = "bfloat16"
  loaded = restore.load_for_eval(config, workdir=None)
  assert loaded.step == 0 and loaded.source.endswith("tiny")
  got, want = flatten(loaded.params), flatten(params)
  assert set(got) == set(want)
  np.testing.assert_array_equal(got["xattn_0/attn_gate"], want["xattn_0/attn_gate"])  # trainable
  assert got["vision/pos_embed"].dtype == jnp.bfloat16  # frozen, as training holds it
  np.testing.assert_allclose(np.asarray(got["vision/pos_embed"], np.float32),
                             want["vision/pos_embed"], atol=1e-2)


def test_missing_params_and_nothing_to_load_are_clear_errors(tiny_converted, tmp_path):
  _, params, _ = tiny_converted
  config = load_config("flamingo", "tiny")
  partial = {k: v for k, v in flatten(params).items() if not k.startswith("resampler/")}
  out = str(tmp_path / "partial")
  converted.save_converted(out, config.model_name, dict(config.model), unflatten(partial))
  config.init.checkpoint = out
  with pytest.raises(KeyError, match=r"params of the model are missing, e.g. \['resampler/"):
    restore.load_for_eval(config)
  config.init.checkpoint = None
  with pytest.raises(FileNotFoundError, match="nothing to evaluate"):
    restore.load_for_eval(config, workdir=str(tmp_path))
  with pytest.raises(FileNotFoundError, match="neither a converted checkpoint"):
    restore.load_for_eval(config, checkpoint=str(tmp_path))
