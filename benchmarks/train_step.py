"""Flamingo train-step benchmark: step time, tokens/s, XLA-counted FLOPs, achieved FLOP/s and "MFU".

  python benchmarks/train_step.py                      # tiny + mid (~100M params) on this machine
  python benchmarks/train_step.py --configs=mid --dtype=bfloat16 --peak_tflops=989   # e.g. on an H200
  python benchmarks/train_step.py --configs=of3b --dtype=bfloat16 --batch=16 --peak_tflops=989  # MFU
  python benchmarks/train_step.py --against=open_flamingo   # beside open_flamingo's step, same weights
  python benchmarks/train_step.py --against=open_flamingo --profile_dir=runs/profile_of  # + a trace

FLOPs come from XLA's cost analysis of the compiled step, so frozen towers count forward only (their
backward is never computed). On CPU the reference peak is this machine's measured dense matmul rate
(a 2048^2 float32 matmul, best of several), so "mfu" there means "fraction of what XLA's own matmul
reaches here". Writes benchmarks/results/train_step_<platform>.json and prints a one-line summary last.
"""

import argparse
import json
import os
import platform
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from timing import best_time, time_steps

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from vlm_jax import sharding  # noqa: E402
from vlm_jax.config_base import load_config  # noqa: E402
from vlm_jax.data import tokenizer as tok  # noqa: E402
from vlm_jax.models import build_model  # noqa: E402
from vlm_jax.train.losses import get_loss  # noqa: E402
from vlm_jax.train.trainer import build_state  # noqa: E402
from vlm_jax.train.step import make_train_step  # noqa: E402

MID = dict(  # ~107M params: LLaMA 768x8 with an 8k vocab, ViT 384x6, xattn every 2nd layer
  lm=dict(vocab_size=8192, hidden_size=768, num_layers=8, num_heads=12, mlp_dim=2048),
  vision=dict(image_size=112, patch_size=14, width=384, depth=6, heads=6),
  resampler=dict(depth=2, heads=8, dim_head=64, num_latents=64),
  xattn=dict(heads=8, dim_head=64), cross_attn_every_n_layers=2, batch=8, text_len=128)


def matmul_peak_flops(dtype, n: int = 2048, reps: int = 10) -> float:
  return 2 * n**3 / best_time(jax.jit(lambda x: x @ x), jnp.ones((n, n), dtype), reps=reps)


def openflamingo_config(name: str, batch: int, remat: str, shrink: bool):
  """An OpenFlamingo preset as one MMC4 batch (6 images, 256 tokens): frozen towers in the compute
  dtype, trainable params and Adam in float32, scanned towers with `remat` rematerialisation.
  `shrink` keeps the widths but cuts every stack to 2 layers (a CPU smoke test of the same code)."""
  config = load_config(os.path.join(ROOT, "configs", "flamingo.py"), name)
  config.model.lm.update(scan_layers=True, remat_policy=remat)
  config.model.vision.update(scan_layers=True, remat_policy=remat)
  if shrink:
    config.model.lm.num_layers = 2 * config.model.cross_attn_every_n_layers
    config.model.vision.depth, config.model.resampler.depth = 2, 1
  mmc4 = config.data.mixture.mmc4
  config.data = load_config(os.path.join(ROOT, "configs", "flamingo.py"), "tiny").data
  config.data.update(image_size=mmc4.image_size, max_images=mmc4.max_images,
                     max_text_len=mmc4.max_text_len)
  config.batch_size = batch
  return config


def mid_config():
  """The default Flamingo config with the MID sizes (no earlier stage)."""
  config = load_config(os.path.join(ROOT, "configs", "flamingo.py"))
  config.init.stage = None
  for part in ("lm", "vision", "resampler", "xattn"):
    config.model[part].update(MID[part])
  config.model.cross_attn_every_n_layers = MID["cross_attn_every_n_layers"]
  config.batch_size, config.data.max_text_len = MID["batch"], MID["text_len"]
  config.data.image_size = MID["vision"]["image_size"]
  return config


def random_batch(config) -> dict:
  """A random Flamingo batch of `config`'s shapes (numpy), every image slot used."""
  b, t = config.batch_size, config.data.max_text_len
  ti, s = config.data.max_images, config.data.image_size
  rng = np.random.default_rng(0)
  vocab = min(config.model.lm.vocab_size, tok.synthetic_vocab_size())
  ids = rng.integers(5, vocab, (b, t)).astype(np.int32)
  ids[:, np.linspace(0, t, ti, endpoint=False).astype(int)] = config.model.media_token_id
  return {"inputs": {"vision_x": rng.normal(size=(b, ti, s, s, 3)).astype(np.float32),
                     "input_ids": ids, "attention_mask": np.ones((b, t), np.int32)},
          "labels": ids}


def init_state(config, model, batch: dict, mesh, rules):
  """The trainer's state for `config` on `mesh` -> (tx, abstract state, initialised state)."""
  example = jax.tree.map(lambda x: jnp.asarray(x[:1]), batch["inputs"])
  tx, init_fn, abstract = build_state(config, model, example, mesh, rules)
  return tx, abstract, init_fn(jax.random.PRNGKey(0))


def bench_config(name: str, dtype: str, steps: int, batch: int = 0, remat: str = "full",
                 shrink: bool = False) -> dict:
  if name.startswith("of"):
    config = openflamingo_config(name, batch or 4, remat, shrink)
  elif name == "mid":
    config = mid_config()
  else:
    config = load_config(os.path.join(ROOT, "configs", "flamingo.py"),
                         "tiny" if name == "tiny" else None)
  config.init.stage = None
  config.model.dtype = dtype
  config.frozen_param_dtype = "" if dtype == "float32" else dtype
  mesh = sharding.make_mesh(config.mesh)
  rules = sharding.logical_rules(None)
  model = build_model(config.model_name, config.model)
  b, t, ti, s = config.batch_size, config.data.max_text_len, config.data.max_images, config.data.image_size
  batch = random_batch(config)
  tx, abstract, state = init_state(config, model, batch, mesh, rules)
  n_params = sum(x.size for x in jax.tree.leaves(abstract.trainable)) + sum(
    x.size for x in jax.tree.leaves(abstract.frozen))
  n_trainable = sum(x.size for x in jax.tree.leaves(abstract.trainable))
  step = jax.jit(make_train_step(model, tx, get_loss(config.loss)), donate_argnums=(0,))
  gbatch = sharding.global_batch(batch, mesh)
  key = jax.random.PRNGKey(1)
  t0 = time.perf_counter()
  compiled = step.lower(state, gbatch, key).compile()
  compile_s = time.perf_counter() - t0
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  flops = float(cost.get("flops", 0.0))
  step_s, min_s, m = time_steps(compiled, state, gbatch, key, steps=steps, warmup=2)
  if name.startswith("of") and remat != "none":
    # Model FLOPs exclude rematerialisation (MaxText's MFU convention): count them on the same step
    # compiled without remat, which is never run.
    plain = build_model(config.model_name, {**config.model.to_dict(), "lm": {
      **config.model.lm.to_dict(), "remat_policy": "none"}, "vision": {
      **config.model.vision.to_dict(), "remat_policy": "none"}})
    cost = jax.jit(make_train_step(plain, tx, get_loss(config.loss))).lower(
      abstract, gbatch, key).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    executed_flops, flops = flops, float(cost.get("flops", 0.0))
  else:
    executed_flops = flops
  return {"config": name + ("_shrunk" if shrink else ""), "dtype": dtype, "remat": remat,
          "executed_flops_per_step": executed_flops,
          "params": int(n_params), "trainable_params": int(n_trainable),
          "batch_size": b, "text_len": t, "images_per_row": ti, "image_size": s,
          "compile_s": compile_s, "step_time_s": step_s, "step_time_min_s": min_s,
          "tokens_per_s": b * t / step_s, "flops_per_step": flops, "achieved_flops_per_s": flops / step_s}


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--configs", default="tiny,mid",
                 help="tiny, mid, or an OpenFlamingo preset (of3b, of4b, of9b) as one MMC4 batch")
  p.add_argument("--batch", type=int, default=0, help="OpenFlamingo presets: global batch (default 4)")
  p.add_argument("--remat", default="full", help="OpenFlamingo presets: towers' remat_policy")
  p.add_argument("--shrink", action="store_true",
                 help="OpenFlamingo presets: 2 layers per stack at full width (CPU smoke test)")
  p.add_argument("--dtype", default="float32")
  p.add_argument("--steps", type=int, default=5)
  p.add_argument("--peak_tflops", type=float, default=0.0,
                 help="vendor peak for MFU (e.g. 989 for H100/H200 bf16); default: measured matmul rate")
  p.add_argument("--out", default="")
  p.add_argument("--against", default="", choices=["", "open_flamingo"],
                 help="time the OpenFlamingo-shaped model beside open_flamingo's own train step "
                      "(benchmarks/against_open_flamingo.py; needs torch and open_flamingo)")
  p.add_argument("--repeats", type=int, default=5, help="--against: best of this many calls")
  p.add_argument("--profile_dir", default="",
                 help="--against: trace two of our train steps there (jax.profiler; Perfetto JSON too)")
  args = p.parse_args()
  if args.against:
    import against_open_flamingo  # imports torch: only for this mode
    result = against_open_flamingo.run(repeats=args.repeats, profile_dir=args.profile_dir)
    path = against_open_flamingo.write(result, args.out)
    print(f"{against_open_flamingo.summary(result)} -> {path}")
    return
  dev = jax.devices()[0]
  measured = matmul_peak_flops(jnp.dtype(args.dtype))
  peak = args.peak_tflops * 1e12 if args.peak_tflops else measured
  rows = []
  for name in args.configs.split(","):
    r = bench_config(name, args.dtype, args.steps, args.batch, args.remat, args.shrink)
    r["mfu"] = r["achieved_flops_per_s"] / peak
    r["fraction_of_measured_matmul"] = r["achieved_flops_per_s"] / measured
    rows.append(r)
    print(json.dumps(r))
  out = {"benchmark": "train_step", "machine": {
           "platform": dev.platform, "device_kind": dev.device_kind, "num_devices": jax.device_count(),
           "cpu_count": os.cpu_count(), "host": platform.node(), "jax": jax.__version__},
         "peak_flops_per_s": peak, "peak_source": "vendor" if args.peak_tflops else "measured_matmul",
         "measured_matmul_flops_per_s": measured, "results": rows}
  path = args.out or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                  f"train_step_{dev.platform}.json")
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "w") as f:
    json.dump(out, f, indent=2)
  summary = ", ".join(f"{r['config']}: {r['step_time_s'] * 1e3:.1f} ms/step, {r['tokens_per_s']:.0f} tok/s, "
                      f"{r['achieved_flops_per_s'] / 1e9:.1f} GFLOP/s ({100 * r['mfu']:.1f}% of peak)"
                      for r in rows)
  print(f"train_step on {dev.device_kind} [{args.dtype}] -> {path}: {summary}")


if __name__ == "__main__":
  main()
