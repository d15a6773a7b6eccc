"""Sharded generation: on 8 fake CPU devices, `generate(..., mesh=...)` with params on their
logical shardings gives the same ids as the unsharded call (greedy and beam search, a LLaMA LM and
a Flamingo), for a data-parallel mesh whose size does not divide the batch (inputs replicated) and
for data x tensor, fsdp x tensor and data x fsdp meshes (inputs split over data and fsdp)."""

import json
import os
import subprocess
import sys
import textwrap

import pytest

from tests.train.configs_loader import ROOT

SCRIPT = textwrap.dedent("""
  import json, sys
  import jax, jax.numpy as jnp, numpy as np
  from flax import linen as nn
  sys.path.insert(0, ".")
  from tests.models.test_scan_remat import _init
  from vlm_jax import sharding
  from vlm_jax.eval import generate
  from vlm_jax.models import flamingo, llama

  assert jax.device_count() == 8
  rules = sharding.logical_rules(None)
  ids = np.array([[5, 9, 14, 3, 22, 7, 31, 8], [0, 0, 11, 4, 19, 6, 27, 2],
                  [0, 0, 0, 0, 12, 13, 3, 17], [21, 3, 9, 9, 1, 5, 6, 7]])
  mask = (ids != 0).astype(np.int32)
  lm = llama.Model(vocab_size=50, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                   mlp_dim=48)
  fl = flamingo.Model(vision=dict(image_size=16, patch_size=8, width=16, depth=1, heads=2),
                      lm=dict(vocab_size=50, hidden_size=32, num_layers=2, num_heads=4,
                              num_kv_heads=2, mlp_dim=48),
                      resampler=dict(depth=1, heads=2, dim_head=8, num_latents=3),
                      xattn=dict(heads=2, dim_head=8), media_token_id=3)
  vx = np.random.default_rng(0).normal(size=(4, 1, 16, 16, 3)).astype(np.float32)
  cases = {"lm": (lm, (ids, mask), {}), "flamingo": (fl, (vx, ids, mask), {"vision_x": vx})}

  def run(model, params, inputs, mesh):
    out = {}
    for name, kw in [("greedy", {}), ("beam", dict(num_beams=3, length_penalty=0.0,
                                                   stop_token_ids=(4, 7)))]:
      out[name] = np.asarray(generate(model, params, ids, mask, max_new_tokens=5, pad_token_id=1,
                                      mesh=mesh, **kw, **inputs)).tolist()
    return out

  res = {}
  for case, (model, init_inputs, inputs) in cases.items():
    params = _init(model, *init_inputs)
    res[case] = {"none": run(model, params, inputs, None)}
    # data x fsdp x tensor all > 1 is the mesh where a data-major batch order made XLA swap rows
    # (see sharding.BATCH_AXES); every decode step runs one token per row.
    for cfg in [{"data": 8}, {"data": 4, "tensor": 2}, {"fsdp": 4, "tensor": 2},
                {"data": 2, "fsdp": 4}, {"data": 2, "fsdp": 2, "tensor": 2}]:
      mesh = sharding.make_mesh(cfg)
      with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        boxed = jax.eval_shape(model.init, jax.random.PRNGKey(0), *init_inputs)["params"]
      shardings = sharding.logical_shardings(boxed, mesh, rules)
      placed = jax.device_put(params, shardings)
      res[case][json.dumps(cfg)] = run(model, placed, inputs, mesh)
  print("RESULT" + json.dumps(res))
""")


@pytest.mark.slow
def test_sharded_generation_equals_unsharded():
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8",
         "JAX_PLATFORMS": "cpu"}
  proc = subprocess.run([sys.executable, "-c", SCRIPT], cwd=ROOT, env=env, capture_output=True,
                        text=True, timeout=900)
  assert proc.returncode == 0, proc.stderr[-3000:]
  res = json.loads(proc.stdout.split("RESULT", 1)[1])
  for case, by_mesh in res.items():
    ref = by_mesh.pop("none")
    assert len(by_mesh) == 5
    for mesh, got in by_mesh.items():
      assert got == ref, (case, mesh, got, ref)
