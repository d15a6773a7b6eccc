"""Scaling benchmark: the mid-size Flamingo train step on 1, 2, 4, 8 fake CPU devices (FSDP mesh).

  python benchmarks/scaling.py                          # weak + strong scaling and the memory table
  python benchmarks/scaling.py --devices=1,2 --steps=2  # quicker

Each device count runs in its own subprocess with XLA_FLAGS=--xla_force_host_platform_device_count=N
(the flag is read once, when JAX starts) and the mesh {data: 1, fsdp: N, tensor: 1}, the presets'
layout. Weak scaling keeps the per-device batch fixed (global batch grows with N), strong scaling
keeps the global batch fixed. Each run also reports the compile-only memory plan of its step
(`vlm_jax.compile_only.plan`): per-device params / optimizer state exact from the shardings,
temporaries from XLA:CPU's buffer assignment.

On one machine the fake devices share its cores, so the step times measure the overhead of the
sharded program (collectives, partitioning) and that it runs at all, not a speedup: ideal weak
scaling on real devices keeps the step time flat, here it grows with N.

`--presets=of3b,of4b,of9b --targets=v5e-8,v5e-16,v5p-8,8xh100,8xh200` adds the compile-only memory
plan of the OpenFlamingo presets (README "Scaling and memory planning"; about an hour on 2 cores):
`vlm_jax.compile_only` per (preset, target), in a process each, with PRESET_OVERRIDES (frozen
towers and compute in bf16, scanned + fully rematerialised layers), PRESET_BATCH examples per
device and pure FSDP over the target's devices. TPU targets need libtpu (`pip install 'jax[tpu]'`);
the GPU targets compile once on 8 fake CPU devices and are judged against each budget.
`--skip_timing` runs only that part.

Writes benchmarks/results/scaling_cpu.json (sections this run did not compute are kept from the
existing file) and prints a one-line summary last.
"""

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from timing import time_steps

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HERE = os.path.dirname(os.path.abspath(__file__))


def mid_config(global_batch: int, num_devices: int):
  """benchmarks/train_step.py's MID Flamingo (~107M params), FSDP over `num_devices`."""
  import train_step  # pylint: disable=g-import-not-at-top

  config = train_step.mid_config()
  config.batch_size = global_batch
  config.mesh.update(data=1, fsdp=num_devices, tensor=1)
  return config


def worker(num_devices: int, global_batch: int, steps: int) -> dict:
  """One device count, in a process whose XLA_FLAGS gave it `num_devices` CPU devices."""
  import jax  # pylint: disable=g-import-not-at-top
  import train_step  # pylint: disable=g-import-not-at-top
  from flax import linen as nn  # pylint: disable=g-import-not-at-top

  from vlm_jax import compile_only, sharding  # pylint: disable=g-import-not-at-top
  from vlm_jax.models import build_model  # pylint: disable=g-import-not-at-top
  from vlm_jax.train.trainer import jit_train_step  # pylint: disable=g-import-not-at-top

  jax.config.update("jax_threefry_partitionable", True)
  assert jax.device_count() == num_devices, (jax.device_count(), num_devices)
  config = mid_config(global_batch, num_devices)
  memory = compile_only.plan(config, jax.devices())

  mesh = sharding.make_mesh(config.mesh)
  rules = sharding.logical_rules(None)
  model = build_model(config.model_name, config.model)
  b, t = config.batch_size, config.data.max_text_len
  batch = train_step.random_batch(config)
  tx, abstract, state = train_step.init_state(config, model, batch, mesh, rules)
  key = jax.random.PRNGKey(1)
  gbatch = sharding.global_batch(batch, mesh)
  t0 = time.perf_counter()
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    compiled = jit_train_step(config, model, tx, abstract, mesh).lower(state, gbatch, key).compile()
  compile_s = time.perf_counter() - t0
  step_s, min_s, m = time_steps(compiled, state, gbatch, key, steps=steps, warmup=1)
  per_device = memory["per_device_bytes"]
  return {"devices": num_devices, "mesh": memory["mesh"], "global_batch": b,
          "per_device_batch": b // num_devices, "compile_s": compile_s, "step_time_s": step_s,
          "step_time_min_s": min_s, "tokens_per_s": b * t / step_s,
          "loss": float(m["loss"]), "params": memory["params"],
          "per_device_bytes": {k: per_device[k] for k in (
            "params", "params_trainable", "params_frozen", "opt_state", "batch", "activations_temp",
            "total")},
          "replicated_fraction": memory["replicated_fraction"]}


# Per-device examples for the preset plan: 1/8 of OpenFlamingo's per-GPU 32 MMC4 + 64 LAION.
PRESET_BATCH = {"mmc4": 4, "laion": 8}
# On top of the preset: bf16 frozen towers and compute; scanned, fully rematerialised layers.
PRESET_OVERRIDES = {"frozen_param_dtype": "bfloat16", "model.dtype": "bfloat16",
                    "model.lm.scan_layers": True, "model.vision.scan_layers": True,
                    "model.lm.remat_policy": "full", "model.vision.remat_policy": "full"}


def preset_config(preset: str, num_devices: int):
  from vlm_jax.config_base import load_config  # pylint: disable=g-import-not-at-top

  config = load_config(os.path.join(ROOT, "configs", "flamingo.py"), preset)
  for key, value in PRESET_OVERRIDES.items():
    *parents, leaf = key.split(".")
    node = config
    for name in parents:
      node = node[name]
    node[leaf] = value
  config.mesh.update(data=1, fsdp=-1, tensor=1)
  for name, per_device in PRESET_BATCH.items():
    config.data.mixture[name].batch_size = per_device * num_devices
  return config


def plan_worker(preset: str, target: str, workdir: str) -> None:
  """One compile-only plan, in a process of its own (the device kind is a per-process choice)."""
  from vlm_jax import compile_only  # pylint: disable=g-import-not-at-top

  tgt = compile_only.resolve_target(target)
  config = preset_config(preset, tgt.num_devices)
  compile_only.setup_host_devices(config, None, target)
  compile_only.run(config, workdir, target=target)


def plan_preset(preset: str, target: str, workdir: str) -> dict:
  from vlm_jax import compile_only  # pylint: disable=g-import-not-at-top

  cmd = [sys.executable, os.path.abspath(__file__), "--plan_worker", f"--presets={preset}",
         f"--targets={target}", f"--out={workdir}"]
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""}
  t0 = time.perf_counter()
  proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
  if proc.returncode:
    raise RuntimeError(f"{preset} on {target} failed:\n{proc.stderr[-3000:]}")
  with open(os.path.join(workdir, compile_only.RESULTS_FILE)) as f:
    report = json.load(f)
  report["wall_s"] = time.perf_counter() - t0
  return report


def plan_presets(presets: list[str], targets: list[str]) -> list[dict]:
  import tempfile  # pylint: disable=g-import-not-at-top

  from vlm_jax import compile_only  # pylint: disable=g-import-not-at-top

  rows, done = [], {}
  for preset in presets:
    for name in targets:
      target = compile_only.resolve_target(name)
      key = (preset, target.platform, target.num_devices, target.topology)
      if key not in done:  # the GPU targets share one CPU compile; only the budget differs
        done[key] = plan_preset(preset, name, tempfile.mkdtemp())
      report = dict(done[key], target=name, device_memory_bytes=target.memory_gb * 1e9)
      report["fits"] = report["per_device_bytes"]["total"] <= report["device_memory_bytes"]
      rows.append(report)
      b = report["per_device_bytes"]
      print(f"{preset} {name}: params {b['params'] / 1e9:.2f} GB, opt {b['opt_state'] / 1e9:.2f}"
            f" GB, temp {b['activations_temp'] / 1e9:.2f} GB, total {b['total'] / 1e9:.2f} GB "
            f"of {target.memory_gb} GB", flush=True)
  return rows


def run_in_subprocess(num_devices: int, global_batch: int, steps: int) -> dict:
  env = {**os.environ, "JAX_PLATFORMS": "cpu",
         "XLA_FLAGS": f"--xla_force_host_platform_device_count={num_devices}"}
  cmd = [sys.executable, os.path.abspath(__file__), "--worker", f"--devices={num_devices}",
         f"--global_batch={global_batch}", f"--steps={steps}"]
  proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
  if proc.returncode:
    raise RuntimeError(f"{num_devices} devices failed:\n{proc.stderr[-3000:]}")
  return json.loads(proc.stdout.rsplit("RESULT ", 1)[1])


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--devices", default="1,2,4,8")
  p.add_argument("--per_device_batch", type=int, default=2, help="weak scaling")
  p.add_argument("--global_batch", type=int, default=8, help="strong scaling")
  p.add_argument("--steps", type=int, default=3, help="timed steps per run (after one warm-up)")
  p.add_argument("--presets", default="", help="e.g. of3b,of4b,of9b: add their memory plans")
  p.add_argument("--targets", default="v5e-8,v5e-16,v5p-8,8xh100,8xh200")
  p.add_argument("--skip_timing", action="store_true", help="only the preset memory plans")
  p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
  p.add_argument("--plan_worker", action="store_true", help=argparse.SUPPRESS)
  p.add_argument("--out", default=os.path.join(HERE, "results", "scaling_cpu.json"))
  args = p.parse_args()
  sys.path[:0] = [ROOT, HERE]
  if args.worker:
    print("RESULT " + json.dumps(worker(int(args.devices), args.global_batch, args.steps)))
    return
  if args.plan_worker:
    plan_worker(args.presets, args.targets, args.out)
    return

  out = {"benchmark": "scaling", "config": "mid (benchmarks/train_step.py MID), float32",
         "mesh": "data=1, fsdp=N, tensor=1",
         "machine": {"platform": "cpu", "fake_devices": True, "cpu_count": os.cpu_count(),
                     "host": platform.node(), "processor": platform.processor()},
         "note": "fake CPU devices sharing the host's cores: overhead and sharding correctness, "
                 "not speedup"}
  if os.path.exists(args.out):  # keep the sections this run does not recompute
    with open(args.out) as f:
      out = {**json.load(f), **out}
  summary = []
  if not args.skip_timing:
    counts = [int(n) for n in args.devices.split(",")]
    weak = [run_in_subprocess(n, args.per_device_batch * n, args.steps) for n in counts]
    strong = [run_in_subprocess(n, args.global_batch, args.steps) for n in counts]
    for rows in (weak, strong):
      for r in rows:  # ideal on real devices: 1.0 for weak scaling, N for strong scaling
        r["relative_throughput"] = r["tokens_per_s"] / rows[0]["tokens_per_s"]
      for r in rows:
        print(json.dumps(r))
    out.update(weak=weak, strong=strong)
    fmt = lambda rows: ", ".join(  # noqa: E731
      f"{r['devices']}: {r['step_time_s']:.2f}s" for r in rows)
    mem = ", ".join(f"{r['devices']}: {r['per_device_bytes']['params'] / 1e6:.0f}+"
                    f"{r['per_device_bytes']['opt_state'] / 1e6:.0f}+"
                    f"{r['per_device_bytes']['activations_temp'] / 1e6:.0f}" for r in strong)
    summary.append(f"weak (per-device batch {args.per_device_batch}) {fmt(weak)}; strong (global "
                   f"batch {args.global_batch}) {fmt(strong)}; per-device MB params+opt+temp "
                   f"(strong) {mem}")
  if args.presets:
    rows = plan_presets(args.presets.split(","), args.targets.split(","))
    out["presets_memory"] = {"per_device_batch": PRESET_BATCH, "overrides": PRESET_OVERRIDES,
                             "mesh": "data=1, fsdp=all devices, tensor=1", "rows": rows}
    summary.append("presets (total GB / budget): " + ", ".join(
      f"{r['config']}@{r['target']} {r['per_device_bytes']['total'] / 1e9:.1f}/"
      f"{r['device_memory_bytes'] / 1e9:.0f}" for r in rows))
  os.makedirs(os.path.dirname(args.out), exist_ok=True)
  with open(args.out, "w") as f:
    json.dump(out, f, indent=2)
  print(f"scaling, mid Flamingo on {os.cpu_count()}-core CPU, fake devices -> {args.out}: "
        + "; ".join(summary))


if __name__ == "__main__":
  main()
