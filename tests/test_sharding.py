"""Mesh from config, logical names on every param, and sharded steps equal to the 1-device step."""

import json
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import pytest
from flax import linen as nn

from tests.train.configs_loader import ROOT, load_config
from vlm_jax import sharding
from vlm_jax.models import build_model


def test_mesh_shape_resolution_and_errors():
  assert sharding.mesh_shape({"data": -1, "fsdp": 1, "tensor": 1}, 8) == {"data": 8, "fsdp": 1,
                                                                           "tensor": 1}
  assert sharding.mesh_shape({"data": 2, "fsdp": -1, "tensor": 2}, 8) == {"data": 2, "fsdp": 2,
                                                                          "tensor": 2}
  with pytest.raises(ValueError, match="needs 16 devices but 8 are available"):
    sharding.mesh_shape({"data": 16, "fsdp": 1, "tensor": 1}, 8)
  with pytest.raises(ValueError, match="at most one"):
    sharding.mesh_shape({"data": -1, "fsdp": -1}, 8)
  with pytest.raises(ValueError, match="unknown axes"):
    sharding.mesh_shape({"pipeline": 2}, 8)
  with pytest.raises(ValueError, match="does not divide"):
    sharding.mesh_shape({"data": -1, "tensor": 3}, 8)


class _FakeDevice:
  """Just what the mesh layout reads: an id, a platform, and its process (GPU node) or slice."""

  def __init__(self, i: int, process: int, slice_index: int | None = None):
    self.id, self.process_index, self.device_kind = i, process, "fake"
    self.platform = "cpu" if slice_index is None else "tpu"
    self.slice_index = slice_index or 0

  def __repr__(self):
    return f"D{self.id}"


def test_dcn_mesh_keeps_each_node_inside_its_block():
  # 4 nodes (processes) x 4 devices; data across nodes (DCN), fsdp x tensor inside a node.
  devices = [_FakeDevice(i, i // 4) for i in range(16)]
  arr = sharding.device_array({"data": 1, "fsdp": -1, "tensor": 2}, devices,
                              {"data": -1, "fsdp": 1, "tensor": 1})
  assert arr.shape == (4, 2, 2)
  for d in range(4):  # every data row is exactly one node, so fsdp/tensor traffic stays inside it
    assert {x.process_index for x in arr[d].ravel()} == {d}
  # DCN fsdp=2 x data=2: each node is one contiguous (data, fsdp) block of the mesh.
  arr = sharding.device_array({"data": 1, "fsdp": 2, "tensor": 2}, devices,
                              {"data": 2, "fsdp": 2, "tensor": 1})
  assert arr.shape == (2, 4, 2)
  for d in range(2):
    for f in range(2):
      block = arr[d, 2 * f:2 * f + 2].ravel()
      assert len({x.process_index for x in block}) == 1
  # TPU multislice: slices (slice_index) are the units, not processes (4 hosts, 2 slices).
  # (The per-slice layout itself is XLA's create_device_mesh, which needs real TPU coordinates.)
  tpus = [_FakeDevice(i, i // 4, slice_index=i // 8) for i in range(16)]
  attr, groups = sharding.granules(tpus)
  assert attr == "slice_index" and [[d.id for d in g] for g in groups] == [
    list(range(8)), list(range(8, 16))]
  # Without a DCN split the old single-pool layout is unchanged.
  assert sharding.device_array({"data": -1}, devices, {"data": 1}).shape == (16, 1, 1)
  assert sharding.combined_sizes({"data": 1, "fsdp": -1, "tensor": 2}, {"data": 4}) == {
    "data": 4, "fsdp": -1, "tensor": 2}
  with pytest.raises(ValueError, match=r"config.dcn_mesh .* needs 4 processes \(nodes\) but 2 "):
    sharding.device_array({"data": -1}, devices[:8], {"data": 4})
  with pytest.raises(ValueError, match="same number of devices"):
    sharding.device_array({"data": -1}, devices[:10], {"data": -1})


def test_every_flamingo_param_has_logical_axis_names():
  config = load_config("flamingo", "tiny")
  model = build_model(config.model_name, config.model)
  vx = jnp.zeros((1, 3, 32, 32, 3))
  ids = jnp.zeros((1, 8), jnp.int32)
  boxed = jax.eval_shape(model.init, jax.random.PRNGKey(0), vx, ids)["params"]
  leaves = jax.tree_util.tree_leaves_with_path(
    boxed, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))
  bare = [jax.tree_util.keystr(p) for p, v in leaves if not isinstance(v, nn.LogicallyPartitioned)]
  assert not bare, f"params without logical axis names: {bare}"
  for _, v in leaves:
    assert len(v.names) == len(v.value.shape)


SCRIPT = textwrap.dedent("""
  import json, sys
  import jax, jax.numpy as jnp, numpy as np
  from flax import linen as nn
  sys.path.insert(0, ".")
  from tests.train.configs_loader import load_config
  from vlm_jax import sharding
  from vlm_jax.data.pipeline import make_dataset
  from vlm_jax.models import build_model
  from vlm_jax.train.losses import get_loss
  from vlm_jax.train.step import make_train_step
  from vlm_jax.train.trainer import build_state
  out, ref = {}, None
  for mesh_cfg in [{"data": 1}, {"data": 8}, {"data": 2, "fsdp": 4, "tensor": 1},
                   {"data": 2, "fsdp": 2, "tensor": 2}, {"data": 1, "fsdp": 4, "tensor": 2}]:
    c = load_config("flamingo", "tiny"); c.init.stage = None
    c.model.lm.num_heads = 2; c.model.lm.num_kv_heads = 2
    devices = jax.devices()[: int(np.prod(list(mesh_cfg.values())))]
    mesh = sharding.make_mesh(mesh_cfg, devices)
    rules = sharding.logical_rules(None)
    model = build_model(c.model_name, c.model)
    batch = next(iter(make_dataset(c.data, split="train", batch_size=8)))
    ex = jax.tree.map(lambda x: jnp.asarray(x[:1]), batch["inputs"])
    tx, init_fn, abstract = build_state(c, model, ex, mesh, rules)
    state = init_fn(jax.random.PRNGKey(0))
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
      step = jax.jit(make_train_step(model, tx, get_loss(c.loss)))
      losses = []
      for _ in range(2):
        state, m = step(state, sharding.global_batch(batch, mesh), jax.random.PRNGKey(1))
        losses.append(float(m["loss"]))
    gate = float(state.trainable["xattn_0"]["attn_gate"][0])
    params = [np.asarray(x) for x in jax.tree.leaves(state.params)]
    ref = params if ref is None else ref
    diff = max(float(np.max(np.abs(a - b))) for a, b in zip(params, ref))
    q = state.trainable["xattn_0"]["attn"]["q"]["kernel"]
    out[json.dumps(mesh_cfg)] = {"losses": losses, "gate": gate, "params_max_abs_diff": diff,
                                 "q_shards": len(q.addressable_shards),
                                 "q_shard_shape": list(q.addressable_shards[0].data.shape)}
  print("RESULT" + json.dumps(out))
""")


@pytest.mark.slow
def test_sharded_steps_match_single_device():
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8",
         "JAX_PLATFORMS": "cpu"}
  proc = subprocess.run([sys.executable, "-c", SCRIPT], cwd=ROOT, env=env, capture_output=True,
                        text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  res = json.loads(proc.stdout.split("RESULT", 1)[1])
  ref = res['{"data": 1}']
  for name, r in res.items():
    for a, b in zip(r["losses"], ref["losses"]):
      assert abs(a - b) < 1e-5, (name, r["losses"], ref["losses"])
    assert abs(r["gate"] - ref["gate"]) < 1e-6, name
    # Every param (trained and frozen) after two steps, within float32 reduction-order noise.
    assert r["params_max_abs_diff"] < 1e-5, (name, r["params_max_abs_diff"])
  # Under (1, 4, 2) the q kernel [embed=32, heads=2, kv=16] is split 4-way on embed (fsdp) and 2-way on
  # heads (tensor).
  assert res['{"data": 1, "fsdp": 4, "tensor": 2}']["q_shard_shape"] == [8, 1, 16]


PER_ROW_SCRIPT = textwrap.dedent("""
  import json, sys
  import jax, jax.numpy as jnp, numpy as np
  from flax import linen as nn
  from jax.sharding import NamedSharding, PartitionSpec as P
  sys.path.insert(0, ".")
  from tests.train.configs_loader import load_config
  from vlm_jax import sharding
  from vlm_jax.data.pipeline import make_dataset
  from vlm_jax.models import build_model
  from vlm_jax.train.trainer import build_state
  out = {}
  # The XLA case: o-projection [B, T, H, D] x [H, D, E] with the kernel on (tensor, fsdp) and the
  # output constrained to batch over the two batch axes, at 4 tokens per row.
  mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  rng = np.random.default_rng(0)
  x = rng.normal(size=(8, 4, 4, 8)).astype(np.float32)
  w = rng.normal(size=(4, 8, 32)).astype(np.float32)
  ref = np.einsum("bthd,hde->bte", x, w)
  for name, axes in [("ours", sharding.BATCH_AXES), ("data_major", ("data", "fsdp"))]:
    f = jax.jit(lambda x, w: jax.lax.with_sharding_constraint(
      jnp.einsum("bthd,hde->bte", x, w), NamedSharding(mesh, P(axes, None, "tensor"))))
    got = f(jax.device_put(x, NamedSharding(mesh, P(axes, None, "tensor", None))),
            jax.device_put(w, NamedSharding(mesh, P("tensor", None, "fsdp"))))
    out["einsum_" + name] = np.abs(np.asarray(got) - ref).max(axis=(1, 2)).tolist()
  # The model: per-row logits of the tiny Flamingo at 4 tokens per row, on each mesh vs 1 device.
  c = load_config("flamingo", "tiny"); c.init.stage = None
  model = build_model(c.model_name, c.model)
  batch = next(iter(make_dataset(c.data, split="train", batch_size=8)))["inputs"]
  batch = {**batch, "input_ids": batch["input_ids"][:, :4], "attention_mask":
           batch["attention_mask"][:, :4]}
  rules = sharding.logical_rules(None)
  logits = {}
  for cfg in [{"data": 1}, {"data": 2, "fsdp": 2, "tensor": 2}, {"data": 2, "fsdp": 4},
              {"fsdp": 4, "tensor": 2}]:
    mesh = sharding.make_mesh(cfg, jax.devices()[: int(np.prod(list(cfg.values())))])
    ex = jax.tree.map(lambda a: jnp.asarray(a[:1]), batch)
    _, init_fn, _ = build_state(c, model, ex, mesh, rules)
    params = init_fn(jax.random.PRNGKey(0)).params
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
      fwd = jax.jit(lambda p, b: model.apply({"params": p}, **b)[0])
      logits[json.dumps(cfg)] = np.asarray(fwd(params, sharding.global_batch(batch, mesh)))
  ref = logits.pop('{"data": 1}')
  out["model"] = {k: np.abs(v - ref).max(axis=(1, 2)).tolist() for k, v in logits.items()}
  print("RESULT" + json.dumps(out))
""")


@pytest.mark.slow
def test_batch_rows_stay_in_place_on_a_data_fsdp_tensor_mesh():
  """Guards the batch-axis order against the XLA partitioner bug described at BATCH_AXES."""
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8",
         "JAX_PLATFORMS": "cpu"}
  proc = subprocess.run([sys.executable, "-c", PER_ROW_SCRIPT], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  res = json.loads(proc.stdout.split("RESULT", 1)[1])
  assert max(res["einsum_ours"]) < 1e-4, res["einsum_ours"]
  for mesh, per_row in res["model"].items():
    assert max(per_row) < 1e-4, (mesh, per_row)
  # The data-major order still trips XLA here; when this starts passing, the bug is fixed and
  # BATCH_AXES may follow MaxText again.
  if max(res["einsum_data_major"]) < 1e-4:
    pytest.skip("XLA no longer permutes rows for the data-major batch order")
