"""Compile-only memory planning: will this config's train step fit on that hardware?

  python -m vlm_jax.main --mode=compile_only --config=configs/flamingo.py:of9b --target=v5e-16 \
    --config.frozen_param_dtype=bfloat16 --config.model.dtype=bfloat16 --workdir=runs/plan
  python -m vlm_jax.main --mode=compile_only --config=configs/flamingo.py:tiny --compile_devices=8 \
    --config.mesh.data=1 --config.mesh.fsdp=8 --device_memory_gb=16 --workdir=runs/plan

The real train step (`train.trainer.jit_train_step`, jitted with donated state and the trainer's
output shardings) is lowered and compiled for the config's mesh from abstract values only: the
state comes from `trainer.build_state` as `ShapeDtypeStruct`s with shardings, the batch from the
shapes the data config implies (`abstract_batch`). No data is read, no param is allocated,
nothing runs on a device (MaxText's `train_compile.py` idea).

Devices:
- `--target` names a TPU slice (`v5e-8`, `v5p-8`, ... or a raw topology like `v5e:2x4`): the step is
  compiled by XLA:TPU for compile-only devices of that topology
  (`jax.experimental.topologies.get_topology_desc`), which needs TPU support installed
  (`pip install 'jax[tpu]'`, i.e. libtpu) but no TPU. Every figure is then XLA:TPU's own.
- Otherwise (and for the GPU targets `8xh100`, `8xh200`, whose topologies JAX cannot mock) the step
  is compiled for N fake devices of this CPU (`--compile_devices=N`, default: the mesh's fixed size
  or the target's device count). Activation/temporary bytes then come from XLA:CPU's buffer
  assignment: an estimate for TPU/GPU, whose compilers fuse, rematerialise and lay out buffers
  differently.

Per-device bytes reported: params (trainable, and frozen in `config.frozen_param_dtype`),
optimizer state and the batch, EXACT from the shardings (the largest per-device share,
`sharding.per_device_bytes`); and from `compiled.memory_analysis()` the argument, output, aliased
(donated state), temporary (activations kept for the backward pass, gradients, workspace) and
generated-code sizes. The total is argument + output - alias + temp (+ generated code for a TPU
target; CPU code lives in host memory), compared with `--device_memory_gb` (GB = 1e9 bytes; default:
the target's HBM). The table is printed and written to `<workdir>/compile_only.json`. Before
compiling, the replication check (`sharding.check_replication`) fails when more than
`config.max_replicated_fraction` of the param bytes would sit whole on every fsdp device.
"""

import dataclasses
import logging
import math
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from vlm_jax import sharding
from vlm_jax.data import files, mixture
from vlm_jax.models import build_model
from vlm_jax.train import init as init_lib
from vlm_jax.train.trainer import build_state, jit_train_step, plain_batches

RESULTS_FILE = "compile_only.json"
GB = 1e9


@dataclasses.dataclass(frozen=True)
class Target:
  name: str
  platform: str               # "tpu": XLA:TPU, compile-only devices; "cpu": fake CPU devices
  num_devices: int
  memory_gb: float | None     # per-device HBM
  topology: str | None = None  # get_topology_desc name (TPU only)


# Cloud TPU slice names count TensorCores on v4/v5p (2 per chip, one JAX device per chip) and
# chips on v5e/v6e. HBM per chip: v4 32 GB, v5e 16 GB, v5p 95 GB, v6e 32 GB; H100 80 GB,
# H200 141 GB.
TARGETS = {t.name: t for t in (
  Target("v4-8", "tpu", 4, 32, "v4:2x2x1"),
  Target("v5e-4", "tpu", 4, 16, "v5e:2x2"),
  Target("v5e-8", "tpu", 8, 16, "v5e:2x4"),
  Target("v5e-16", "tpu", 16, 16, "v5e:4x4"),
  Target("v5e-32", "tpu", 32, 16, "v5e:4x8"),
  Target("v5p-8", "tpu", 4, 95, "v5p:2x2x1"),
  Target("v5p-16", "tpu", 8, 95, "v5p:2x2x2"),
  Target("v5p-32", "tpu", 16, 95, "v5p:2x2x4"),
  Target("v6e-8", "tpu", 8, 32, "v6e:2x4"),
  Target("8xh100", "cpu", 8, 80),
  Target("8xh200", "cpu", 8, 141),
)}


def resolve_target(name: str | None) -> Target | None:
  """A `TARGETS` name, or a raw TPU topology such as `v5e:2x4` (device count from the topology)."""
  if not name:
    return None
  key = name.lower()
  if key in TARGETS:
    return TARGETS[key]
  if ":" in key:
    return Target(name, "tpu", 0, None, name)
  raise ValueError(f"--target={name!r} is neither one of {sorted(TARGETS)} nor a TPU topology "
                   f"like 'v5e:2x4'")


def host_device_count(mesh_config, num_devices: int | None, target: Target | None,
                      dcn_config=None) -> int | None:
  """Fake CPU devices to compile for: --compile_devices, else a GPU target's count (times the nodes
  of `dcn_config`), else the mesh's size when no axis is -1; None = whatever JAX has (TPU targets
  bring their own devices)."""
  if num_devices:
    return int(num_devices)
  nodes = [int(v) for v in dict(dcn_config or {}).values()]
  if target is not None:
    if target.platform != "cpu":
      return None
    return target.num_devices * (math.prod(nodes) if -1 not in nodes else 1)
  sizes = [int(v) for v in dict(mesh_config or {}).values()] + nodes
  return math.prod(sizes) if sizes and -1 not in sizes else None


def setup_host_devices(config, num_devices: int | None = None, target: str | None = None) -> None:
  """Before JAX starts its backends: run on the CPU only (nothing executes on an accelerator in this
  mode), with as many fake host devices as the plan needs (`host_device_count`)."""
  jax.config.update("jax_platforms", "cpu")
  mesh, dcn = (None, None) if config is None else (config.mesh, config.get("dcn_mesh"))
  n = host_device_count(mesh, num_devices, resolve_target(target), dcn)
  if n:
    try:
      jax.config.update("jax_num_cpu_devices", n)
    except RuntimeError as e:  # the backend already started (something ran a JAX op first)
      if jax.device_count() < n:
        raise RuntimeError(
          f"cannot give this process {n} CPU devices because JAX already started with "
          f"{jax.device_count()}; set XLA_FLAGS=--xla_force_host_platform_device_count={n} in "
          f"the environment instead") from e


def num_slices(dcn_config) -> int:
  """Slices of a multi-slice TPU plan: the product of `config.dcn_mesh` (no -1 allowed here)."""
  sizes = [int(v) for v in dict(dcn_config or {}).values()]
  if -1 in sizes:
    raise ValueError("compile_only for a TPU target needs explicit config.dcn_mesh sizes (the "
                     f"number of slices to mock), got {dict(dcn_config)}")
  return math.prod(sizes) if sizes else 1


def compile_devices(target: Target | None, num_devices: int | None, mesh_config,
                    dcn_config=None) -> list:
  """The devices to compile for: a TPU topology's compile-only devices (`target`, times the
  slices of `dcn_config`), or fake CPU devices."""
  if target is not None and target.platform == "tpu":
    from jax.experimental import topologies  # pylint: disable=g-import-not-at-top

    # Compile-only devices never open a TPU, so libtpu's one-process-per-host lock is not needed
    # (without this a second planner, or a run on a TPU VM, would be refused).
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    slices = num_slices(dcn_config)
    extra = {"num_slices": slices} if slices > 1 else {}
    try:
      return list(topologies.get_topology_desc(target.topology, "tpu", **extra).devices)
    except RuntimeError as e:
      raise RuntimeError(f"--target={target.name}: XLA:TPU could not describe topology "
                         f"{target.topology!r}. It needs TPU support installed (pip install "
                         f"'jax[tpu]'), not a TPU. ({e})") from e
  available = jax.devices("cpu")
  n = host_device_count(mesh_config, num_devices, target, dcn_config) or len(available)
  if len(available) < n:
    raise RuntimeError(f"compiling for {n} devices but this process has {len(available)} CPU "
                       f"devices; pass --compile_devices={n} (or set XLA_FLAGS="
                       f"--xla_force_host_platform_device_count={n}) before JAX starts")
  return available[:n]


def _get(cfg: Any, key: str, default: Any = None) -> Any:
  value = cfg.get(key, default) if hasattr(cfg, "get") else default
  return default if value is None else value


def _plain_batch(d: Any, batch_size: int) -> dict:
  """ShapeDtypeStructs of one `make_dataset` batch of data config `d` (data/pipeline.py layout)."""
  source, kind = _get(d, "source", "synthetic"), _get(d, "kind", "interleaved")
  size = int(_get(d, "image_size"))
  if source == "llava":
    text_len = int(_get(d, "max_text_len"))
    images = {"images": jax.ShapeDtypeStruct((batch_size, size, size, 3), jnp.float32)}
  else:
    document = source in ("mmc4", "obelics", "webdataset", "tfds")
    if document and kind == "pairs":  # OpenFlamingo's LAION transform: one image slot
      text_len, num_images = int(_get(d, "max_text_len", 32)), 1
    elif document:                    # OpenFlamingo's MMC4 transform defaults
      text_len, num_images = int(_get(d, "max_text_len", 256)), int(_get(d, "max_images", 6))
    else:
      text_len, num_images = int(_get(d, "max_text_len")), int(_get(d, "max_images"))
    dtype = jnp.dtype(_get(d, "image_dtype", "float32"))
    images = {} if kind == "text" else {
      "vision_x": jax.ShapeDtypeStruct((batch_size, num_images, size, size, 3), dtype)}
  tokens = jax.ShapeDtypeStruct((batch_size, text_len), jnp.int32)
  inputs = {**images, "input_ids": tokens, "attention_mask": tokens}
  if int(_get(d, "packing_bins", 0)):
    inputs["segment_ids"] = tokens
  return {"inputs": inputs, "labels": tokens}


def abstract_batch(data_config: Any, batch_size: int) -> dict:
  """The global batch the trainer would feed, as ShapeDtypeStructs: a plain batch, or for a concat
  mixture {name: batch of that component's own batch size}; a sample mixture pads every component to
  the longest text and the most images."""
  mode = mixture.mixture_mode(data_config)
  if mode is None:
    return _plain_batch(data_config, batch_size)
  components = dict(data_config.mixture.items())
  if mode == "concat":
    return {name: _plain_batch(cfg, int(cfg.batch_size)) for name, cfg in components.items()}
  batches = [_plain_batch(cfg, batch_size) for cfg in components.values()]
  widest = max(batches, key=lambda b: b["labels"].shape[1])
  if "vision_x" in widest["inputs"]:
    most = max(b["inputs"]["vision_x"].shape[1] for b in batches if "vision_x" in b["inputs"])
    vx = widest["inputs"]["vision_x"]
    widest["inputs"]["vision_x"] = jax.ShapeDtypeStruct(vx.shape[:1] + (most,) + vx.shape[2:],
                                                        vx.dtype)
  return widest


def _key(path) -> str:
  return "/".join(str(getattr(k, "key", k)) for k in path)


def plan(config, devices: list, *, memory_bytes: float | None = None) -> dict:
  """Lower + compile the train step of `config` for `devices`; -> the report (module docstring)."""
  platform = devices[0].platform  # "tpu" for a topology's compile-only devices
  dcn = config.get("dcn_mesh")
  if sharding.is_multi_granule(dcn) and platform != "tpu":
    # Fake CPU devices are one process: fold the across-slice sizes into the axes. Per-device
    # shapes, and so every figure below, are the same; only which links carry the traffic differs.
    mesh = sharding.make_mesh(sharding.combined_sizes(config.mesh, dcn), devices)
  else:
    mesh = sharding.config_mesh(config, devices)
  rules = sharding.logical_rules(config.get("sharding_rules"))
  data_shards = sharding.data_shards(mesh)
  batch = abstract_batch(config.data, config.batch_size)
  for plain in plain_batches(batch):
    if plain["labels"].shape[0] % data_shards:
      raise ValueError(f"a batch of {plain['labels'].shape[0]} examples does not split over the "
                       f"data-parallel mesh size config.mesh.data * config.mesh.fsdp = "
                       f"{data_shards}")
  model = build_model(*init_lib.model_config(config))
  # One concrete example row (params do not depend on batch, text length or image count).
  example = jax.tree.map(lambda x: jnp.zeros((1,) + x.shape[1:], x.dtype),
                         plain_batches(batch)[0]["inputs"])
  tx, _, abstract = build_state(config, model, example, mesh, rules)
  fraction = sharding.replicated_fraction(abstract.params, mesh)
  if mesh.shape["fsdp"] > 1:
    sharding.check_replication(abstract.params, mesh, config.get("max_replicated_fraction", 0.05))

  batch_sharding = sharding.batch_sharding(mesh)
  batch = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=batch_sharding),
                       batch)
  rng = jax.ShapeDtypeStruct((2,), jnp.uint32, sharding=sharding.replicated(mesh))
  t0 = time.perf_counter()
  # Traced under the mesh and the logical rules, so the models' activation constraints apply.
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    step = jit_train_step(config, model, tx, abstract, mesh)
    compiled = step.lower(abstract, batch, rng).compile()
  compile_s = time.perf_counter() - t0
  mem = compiled.memory_analysis()

  exact = {
    "params_trainable": sharding.per_device_bytes(abstract.trainable),
    "params_frozen": sharding.per_device_bytes(abstract.frozen),
    "opt_state": sharding.per_device_bytes(abstract.opt_state),
    "batch": sharding.per_device_bytes(batch),
  }
  xla = {k: int(getattr(mem, f"{k}_size_in_bytes", 0) or 0)
         for k in ("argument", "output", "alias", "temp", "generated_code")}
  total = xla["argument"] + xla["output"] - xla["alias"] + xla["temp"]
  if platform == "tpu":
    total += xla["generated_code"]
  count = lambda tree: int(sum(np.prod(x.shape) for x in jax.tree.leaves(tree)))  # noqa: E731
  frozen_dtypes = sorted({str(x.dtype) for x in jax.tree.leaves(abstract.frozen)})
  return {
    "platform": platform,
    "device_kind": devices[0].device_kind,
    "num_devices": len(devices),
    "mesh": dict(mesh.shape),
    "batch_shapes": {_key(p): list(x.shape) for p, x in jax.tree_util.tree_leaves_with_path(batch)},
    "examples_per_device": {(_key(p[:-1]) or "batch"): x.shape[0] // data_shards
                            for p, x in jax.tree_util.tree_leaves_with_path(batch)
                            if _key(p[-1:]) == "labels"},
    "compute_dtype": str(config.model.get("dtype", "float32")),
    "frozen_param_dtypes": frozen_dtypes,
    "params": count(abstract.trainable) + count(abstract.frozen),
    "trainable_params": count(abstract.trainable),
    "replicated_fraction": fraction,
    "replicated_largest": sharding.replicated_params(abstract.params)[:5],
    "per_device_bytes": {**exact, "params": exact["params_trainable"] + exact["params_frozen"],
                         **{f"xla_{k}": v for k, v in xla.items()},
                         "activations_temp": xla["temp"], "total": total},
    "activation_source": ("XLA:TPU buffer assignment" if platform == "tpu" else
                          "XLA:CPU buffer assignment (an estimate for TPU/GPU)"),
    "device_memory_bytes": memory_bytes,
    "fits": None if not memory_bytes else bool(total <= memory_bytes),
    "compile_s": compile_s,
  }


def format_table(report: dict) -> str:
  b = report["per_device_bytes"]
  unit, scale = ("GB", GB) if max(b["total"], report["device_memory_bytes"] or 0) >= 0.1 * GB else (
    "MB", 1e6)
  rows = [
    ("params, trainable (exact)", b["params_trainable"]),
    ("params, frozen (exact)", b["params_frozen"]),
    ("optimizer state (exact)", b["opt_state"]),
    ("batch (exact)", b["batch"]),
    ("XLA arguments", b["xla_argument"]),
    ("XLA outputs", b["xla_output"]),
    ("XLA aliased (donated)", -b["xla_alias"]),
    ("XLA temp (activations etc.)", b["xla_temp"]),
    ("XLA generated code", b["xla_generated_code"]),
    ("total", b["total"]),
  ]
  head = (f"compile-only: {report.get('target') or report['platform']} "
          f"({report['num_devices']} x {report['device_kind']}), mesh {report['mesh']}, "
          f"{report['params'] / 1e9:.3f}B params "
          f"({report['trainable_params'] / 1e9:.3f}B trainable), "
          f"examples/device {report['examples_per_device']}")
  lines = [head, f"{'per device':32s}{unit:>10s}"]
  lines += [f"{name:32s}{v / scale:10.3f}" for name, v in rows]
  if report["device_memory_bytes"]:
    verdict = "fits" if report["fits"] else "DOES NOT FIT"
    lines.append(f"{'budget':32s}{report['device_memory_bytes'] / scale:10.3f}   -> {verdict}")
  lines.append(f"replicated over fsdp: {100 * report['replicated_fraction']:.3f}% of param bytes; "
               f"temp from {report['activation_source']}")
  return "\n".join(lines)


def run(config, workdir: str, *, num_devices: int | None = None, target: str | None = None,
        device_memory_gb: float | None = None) -> dict:
  """`--mode=compile_only`: plan, print the table, write `<workdir>/compile_only.json`.

  `setup_host_devices` must have run before JAX started (main.py does it)."""
  tgt = resolve_target(target)
  devices = compile_devices(tgt, num_devices, config.mesh, config.get("dcn_mesh"))
  memory_gb = device_memory_gb or (tgt.memory_gb if tgt else None)
  report = plan(config, devices, memory_bytes=memory_gb * GB if memory_gb else None)
  report = {"config": config.get("name", ""), "target": tgt.name if tgt else None, **report}
  print(format_table(report), flush=True)
  files.makedirs(workdir)
  path = os.path.join(workdir, RESULTS_FILE)
  files.write_json(path, report)
  logging.info("compile-only report written to %s", path)
  return report
