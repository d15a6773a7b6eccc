"""`python -m vlm_jax.convert`: HF -> checkpoint directory -> HF round trip with the same logits,
sharded placement on a mesh of 8 fake CPU devices, and training from `config.init.checkpoint`."""

import copy
import json
import os
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from tests.train.configs_loader import ROOT, load_config  # noqa: E402
from vlm_jax import converted  # noqa: E402
from vlm_jax.convert import load_hf_lm  # noqa: E402
from vlm_jax.convert.__main__ import main  # noqa: E402
from vlm_jax.data.tokenizer import synthetic_vocab_size  # noqa: E402
from vlm_jax.param_paths import flatten  # noqa: E402


@pytest.fixture(scope="module")
def hf_lm(tmp_path_factory):
  """A tiny LLaMA over the synthetic corpus vocabulary, so the converted model can be trained."""
  path = str(tmp_path_factory.mktemp("hf_llama"))
  torch.manual_seed(0)
  cfg = transformers.LlamaConfig(vocab_size=synthetic_vocab_size(), hidden_size=32, intermediate_size=64,
                                 num_hidden_layers=2, num_attention_heads=2, initializer_range=0.2,
                                 rms_norm_eps=1e-5)
  model = transformers.LlamaForCausalLM(cfg).eval()
  model.save_pretrained(path)
  return path, model


@pytest.fixture(scope="module")
def converted_dir(hf_lm, tmp_path_factory):
  out = str(tmp_path_factory.mktemp("conv") / "llama")
  main(["lm", hf_lm[0], "--out", out])
  return out


def test_cli_round_trip_to_transformers(hf_lm, converted_dir, tmp_path):
  path, hf_model = hf_lm
  config = converted.read_model_config(converted_dir)
  assert config["model_name"] == "llama" and config["model"]["num_layers"] == 2
  assert config["source"] == {"command": "lm", "path": path}
  back = str(tmp_path / "hf")
  main(["to-hf", converted_dir, "--out", back])
  again = transformers.AutoModelForCausalLM.from_pretrained(back).eval()
  ids = torch.tensor([[5, 17, 33, 2, 40, 41, 8, 50]])
  with torch.no_grad():
    np.testing.assert_allclose(again(input_ids=ids).logits.numpy(), hf_model(input_ids=ids).logits.numpy(),
                               atol=1e-5, rtol=1e-5)
  with pytest.raises(FileExistsError, match="params exists"):
    main(["lm", path, "--out", converted_dir])


def test_dtype_bfloat16_converts_and_stores_in_bfloat16(hf_lm, converted_dir, tmp_path):
  """--dtype bfloat16: every stored param is bf16, equal to the float32 conversion rounded once
  (cast per tensor, not a different computation), the same for scanned (stacked) params; and the
  logits stay within bf16 rounding of the HF model's."""
  import jax.numpy as jnp
  out = str(tmp_path / "bf16")
  main(["lm", hf_lm[0], "--out", out, "--dtype", "bfloat16"])
  assert converted.read_model_config(out)["param_dtypes"] == ["bfloat16"]
  assert converted.read_model_config(converted_dir)["param_dtypes"] == ["float32"]
  assert {str(d) for _, d in converted.stored_shapes(out).values()} == {"bfloat16"}
  f32, bf16 = flatten(converted.load_converted(converted_dir)), flatten(converted.load_converted(out))
  assert set(f32) == set(bf16)
  for k in f32:
    np.testing.assert_array_equal(np.asarray(bf16[k]), np.asarray(f32[k].astype(jnp.bfloat16)), k)
  _, scanned = load_hf_lm(hf_lm[0], scan_layers=True, param_dtype="bfloat16")
  q = flatten(scanned)["layers/attn/q/kernel"]
  assert q.dtype == jnp.bfloat16
  np.testing.assert_array_equal(np.asarray(q[1]), np.asarray(bf16["layers_1/attn/q/kernel"]))
  model, _ = load_hf_lm(hf_lm[0])
  ids = np.asarray([[5, 17, 33, 2, 40, 41, 8, 50]], np.int32)
  logits, _ = model.apply({"params": converted.load_converted(out)}, ids, np.ones_like(ids))
  # The model computes in float32 from the bf16 weights, so it equals the HF model whose weights
  # were rounded to bf16 once (float32 arithmetic), and differs from the unrounded one.
  rounded = copy.deepcopy(hf_lm[1])
  with torch.no_grad():
    for p in rounded.parameters():
      p.copy_(p.to(torch.bfloat16).to(torch.float32))
    x = torch.tensor(ids, dtype=torch.long)
    want, unrounded = rounded(input_ids=x).logits.numpy(), hf_lm[1](input_ids=x).logits.numpy()
  np.testing.assert_allclose(np.asarray(logits, np.float32), want, atol=2e-5, rtol=0)
  assert np.abs(np.asarray(logits, np.float32) - unrounded).max() > 1e-3  # really rounded
  # Training starts from it: the trainer upcasts to its own param dtype (float32 here).
  from vlm_jax.train.trainer import train_and_evaluate
  config = load_config("flamingo", "tiny").init.stage
  config.model_name, config.model, config.init.checkpoint = "", {}, out
  config.total_steps, config.optimizer.learning_rate, config.evals = 1, 0.0, {}
  _, params = train_and_evaluate(config, str(tmp_path / "run"))
  for k, v in flatten(params).items():
    assert v.dtype == jnp.float32, k
    np.testing.assert_array_equal(np.asarray(v), np.asarray(bf16[k], np.float32), k)


def test_training_starts_from_the_converted_checkpoint(converted_dir, tmp_path):
  """`config.model_name = ""` + `config.init.checkpoint`: the model config comes from model.json and the
  params from the checkpoint (with lr 0 they are unchanged after a step)."""
  from vlm_jax.train.trainer import train_and_evaluate
  config = load_config("flamingo", "tiny").init.stage
  config.model_name = ""
  config.model = {}
  config.init.checkpoint = converted_dir
  config.total_steps = 1
  config.optimizer.learning_rate = 0.0
  config.evals = {}
  _, params = train_and_evaluate(config, str(tmp_path / "run"))
  stored = flatten(converted.load_converted(converted_dir))
  got = flatten(params)
  assert set(got) == set(stored)
  for k, v in stored.items():
    np.testing.assert_array_equal(np.asarray(got[k]), np.asarray(v), err_msg=k)
  # A checkpoint that does not fit the configured model fails naming the params.
  config = load_config("flamingo", "tiny").init.stage
  config.init.checkpoint = converted_dir
  config.model.hidden_size = 48
  with pytest.raises(ValueError, match="shapes differ"):
    train_and_evaluate(config, str(tmp_path / "run2"))


SHARDED = textwrap.dedent("""
  import json, sys
  sys.path.insert(0, ".")
  import jax, numpy as np
  from vlm_jax import sharding
  from vlm_jax.convert import load_hf_lm
  from vlm_jax.convert.__main__ import main
  path, out = sys.argv[1], sys.argv[2]
  mesh = sharding.make_mesh({"data": 1, "fsdp": 4, "tensor": 2})
  model, params = load_hf_lm(path, mesh=mesh)
  q = params["layers_0"]["attn"]["q"]["kernel"]
  main(["lm", path, "--out", out, "--mesh", "data=1,fsdp=4,tensor=2"])
  print(json.dumps({"spec": str(q.sharding.spec), "shard_shape": list(q.addressable_shards[0].data.shape),
                    "devices": len(q.sharding.device_set)}))
""")


@pytest.mark.slow
def test_loading_onto_a_mesh_places_each_param_on_its_shards(hf_lm, tmp_path):
  out = str(tmp_path / "sharded")
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
  res = subprocess.run([sys.executable, "-c", SHARDED, hf_lm[0], out], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=300)
  assert res.returncode == 0, res.stderr[-3000:]
  info = json.loads(res.stdout.strip().splitlines()[-1])
  # q kernel [embed 32, heads 2, head_dim 16]: embed over fsdp (4), heads over tensor (2).
  assert info == {"spec": "P('fsdp', 'tensor', None)", "shard_shape": [8, 1, 16],
                  "devices": 8}
  _, ref = load_hf_lm(hf_lm[0])
  got = flatten(converted.load_converted(out))
  for k, v in flatten(ref).items():
    np.testing.assert_array_equal(np.asarray(jax.device_get(got[k])), np.asarray(v), err_msg=k)
