"""Where tensors come from: PyTorch pickles (plain and sharded), bfloat16 safetensors, and the errors for
a missing torch or a truncated file."""

import json
import os
import sys

import ml_dtypes
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from vlm_jax.convert import load_hf_lm  # noqa: E402
from vlm_jax.convert.safetensors_io import CheckpointReader, write_checkpoint  # noqa: E402
from vlm_jax.convert.sources import open_state_dict  # noqa: E402
from vlm_jax.param_paths import flatten  # noqa: E402


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
  root = tmp_path_factory.mktemp("sources")
  torch.manual_seed(0)
  model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
    vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2))
  st = str(root / "st")
  model.save_pretrained(st)
  return model, root, st


def _same_params(a, b):
  fa, fb = flatten(a), flatten(b)
  assert set(fa) == set(fb)
  for k in fa:
    np.testing.assert_array_equal(np.asarray(fa[k]), np.asarray(fb[k]), err_msg=k)


def test_pytorch_bin_directories_plain_and_sharded(llama):
  model, root, st = llama
  _, ref = load_hf_lm(st)
  sd = model.state_dict()
  plain = root / "bin"
  plain.mkdir()
  (plain / "config.json").write_text(open(os.path.join(st, "config.json")).read())
  torch.save(sd, plain / "pytorch_model.bin")
  _, got = load_hf_lm(str(plain))
  _same_params(ref, got)

  sharded = root / "bin_sharded"
  sharded.mkdir()
  (sharded / "config.json").write_text(open(os.path.join(st, "config.json")).read())
  keys = sorted(sd)
  halves = {"pytorch_model-00001-of-00002.bin": keys[: len(keys) // 2],
            "pytorch_model-00002-of-00002.bin": keys[len(keys) // 2:]}
  for name, ks in halves.items():
    torch.save({k: sd[k] for k in ks}, sharded / name)
  (sharded / "pytorch_model.bin.index.json").write_text(json.dumps(
    {"weight_map": {k: name for name, ks in halves.items() for k in ks}}))
  _, got = load_hf_lm(str(sharded))
  _same_params(ref, got)


def test_bfloat16_checkpoints_load_exactly(llama, tmp_path):
  """Hub checkpoints are mostly bfloat16, which numpy alone cannot represent: values must arrive
  exactly (bf16 -> f32 is lossless), from safetensors and from a pickle."""
  model, _, st = llama
  bf16 = {k: v.to(torch.bfloat16) for k, v in model.state_dict().items()}
  d = tmp_path / "bf16"
  write_checkpoint(str(d), {k: v.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
                            for k, v in bf16.items()})
  (d / "config.json").write_text(open(os.path.join(st, "config.json")).read())
  reader = CheckpointReader(str(d))
  assert reader["model.norm.weight"].dtype == ml_dtypes.bfloat16
  _, params = load_hf_lm(str(d))
  want = bf16["model.layers.0.mlp.up_proj.weight"].float().numpy().T
  np.testing.assert_array_equal(np.asarray(params["layers_0"]["mlp"]["up"]["kernel"]), want)
  torch.save(bf16, tmp_path / "bf16.pt")
  np.testing.assert_array_equal(open_state_dict(str(tmp_path / "bf16.pt"))["model.norm.weight"],
                                bf16["model.norm.weight"].float().numpy())


def test_pickle_without_torch_and_truncated_safetensors(llama, tmp_path, monkeypatch):
  model, _, st = llama
  torch.save(model.state_dict(), tmp_path / "w.pt")
  monkeypatch.setitem(sys.modules, "torch", None)  # as on a machine without torch
  with pytest.raises(ImportError, match=r"w\.pt is a PyTorch pickle; reading it needs torch"):
    open_state_dict(str(tmp_path / "w.pt"))
  monkeypatch.undo()
  data = open(os.path.join(st, "model.safetensors"), "rb").read()
  cut = tmp_path / "cut.safetensors"
  cut.write_bytes(data[: len(data) - 100])
  with pytest.raises(ValueError, match=r"cut\.safetensors.*truncated"):
    open_state_dict(str(cut))
