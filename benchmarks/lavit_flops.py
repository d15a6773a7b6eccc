"""LaViT vs the same-size ViT: params, forward FLOPs, CPU images/s, FLOPs per stage and per layer.

  python benchmarks/lavit_flops.py              # lavit_t_style at 224 px, batch 8 (a few minutes)
  python benchmarks/lavit_flops.py --quick      # the tiny preset at 64 px (seconds)
  python benchmarks/lavit_flops.py --preset=lavit_s_style --batch=4 --reps=3

The ViT is `lavit.vit_baseline(preset)`: the same `Model` with every layer VA and no attention
residual, so stem, widths, depths, MLPs and head are identical and only the LA layers and the AR
differ. FLOPs come from XLA's cost analysis of the compiled forward (logits only) at batch 1:
whole models, each stage alone (`Model.stage(m)`: its merge, AR and blocks, on inputs of the shape
the previous stage gives; also timed on CPU at the run's batch), and one attention module per stage shape, VanillaAttention (Q, K, V, O
projections, Q K^T, softmax, P V) vs LessAttention (V, O, Theta/Psi, softmax, P V), in every stage
whether or not the preset puts LA there: the N x N transforms cost 2 * H * N^3 multiply-adds
against the 2 N C^2 + N^2 C of the Q/K projections and Q K^T they replace, so LA saves compute only
for small N. The images/s of the two models are timed alternately (best of `--reps` calls each,
as other jobs may share the cores). Writes benchmarks/results/lavit_flops_<platform>.json and
prints a one-line summary last.
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

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from flax import linen as nn  # noqa: E402

from vlm_jax.layers.less_attention import LessAttention, VanillaAttention  # noqa: E402
from vlm_jax.models import lavit  # noqa: E402


def _flops(fn, *args) -> dict:
  """XLA's cost analysis of jit(fn) on abstract args -> {"flops", "transcendentals"}."""
  cost = jax.jit(fn).lower(*args).compile().cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return {"flops": float(cost.get("flops", 0.0)),
          "transcendentals": float(cost.get("transcendentals", 0.0))}


def _abstract_params(module, *args):
  return nn.unbox(jax.eval_shape(module.init, jax.random.PRNGKey(0), *args))["params"]


def _count(tree, keep=lambda path: True) -> int:
  leaves = jax.tree_util.tree_leaves_with_path(tree)
  return int(sum(np.prod(x.shape) for path, x in leaves
                 if keep({getattr(k, "key", "") for k in path})))


def _sds(*shape):
  return jax.ShapeDtypeStruct(shape, jnp.float32)


def model_row(kw: dict, size: int) -> dict:
  model = lavit.Model(**kw)
  img = _sds(1, size, size, 3)
  params = _abstract_params(model, img)
  return {"params": _count(params),
          "theta_psi_params": _count(params, lambda names: bool({"theta", "psi"} & names)),
          "attn_residual_params": _count(params, lambda names: "attn_residual" in names),
          "layer_types": ["".join("V" if t == "va" else "L" for t in s)
                          for s in model.layer_types()],
          **_flops(lambda p, x: model.apply({"params": p}, x)[0], params, img)}


def stage_rows(kw_la: dict, kw_vit: dict, size: int, batch: int, reps: int) -> list[dict]:
  """Each stage alone, LaViT vs ViT: FLOPs at batch 1 and CPU seconds at `batch` (random inputs
  of the shapes the previous stage gives, alternating calls, best of `reps`)."""
  la, vit = lavit.Model(**kw_la), lavit.Model(**kw_vit)
  grids = la.stage_grids(size)
  rng = np.random.default_rng(0)
  rows = []
  for m, (gh, gw) in enumerate(grids):
    x_shape = (size, size, 3) if m == 0 else (*grids[m - 1], la.dims[m - 1])
    prev_shape = None
    if m > 0:
      n_prev = grids[m - 1][0] * grids[m - 1][1]
      prev_shape = (la.heads[m - 1], n_prev, n_prev)
    row = {"stage": m, "grid": [gh, gw], "tokens": gh * gw, "dim": la.dims[m],
           "heads": la.heads[m], "layers": "".join("V" if t == "va" else "L"
                                                    for t in la.layer_types()[m])}
    calls = {}
    for name, mdl in (("lavit", la), ("vit", vit)):
      stage = mdl.stage(m, parent=None)
      with_prev = name == "lavit" and prev_shape is not None
      x, s = _sds(1, *x_shape), (_sds(1, *prev_shape) if with_prev else None)
      p = _abstract_params(stage, x, s)
      fwd = jax.jit(lambda p, x, s, stage=stage: stage.apply({"params": p}, x, s)[0])
      row[f"{name}_flops"] = _flops(fwd, p, x, s)["flops"]
      xb = jnp.asarray(rng.normal(size=(batch, *x_shape)), jnp.float32)
      sb = jnp.asarray(rng.normal(size=(batch, *prev_shape)), jnp.float32) if with_prev else None
      params = jax.jit(stage.init)(jax.random.PRNGKey(0), xb[:1], None if sb is None else sb[:1])
      calls[name] = (fwd, (nn.unbox(params["params"]), xb, sb))
    for name, best in _alternate_best(calls, reps).items():
      row[f"{name}_s"] = best
    row["lavit_over_vit"] = row["lavit_flops"] / row["vit_flops"]
    row["lavit_over_vit_time"] = row["lavit_s"] / row["vit_s"]
    rows.append(row)
  return rows


def _alternate_best(calls: dict, reps: int) -> dict:
  """{name: (fn, args)} -> {name: best seconds of `reps` calls}, calls alternating between the
  names after one warm-up call each (so load from other jobs hits both alike)."""
  for fn, args in calls.values():
    jax.block_until_ready(fn(*args))
  best = {name: float("inf") for name in calls}
  for _ in range(reps):
    for name, (fn, args) in calls.items():
      t0 = time.perf_counter()
      jax.block_until_ready(fn(*args))
      best[name] = min(best[name], time.perf_counter() - t0)
  return best


def attention_rows(kw: dict, size: int) -> list[dict]:
  """One attention module per stage shape: VA vs LA FLOPs (XLA) and the analytic MAC counts of
  what LA drops (Q/K projections + Q K^T) and adds (Theta, Psi)."""
  model = lavit.Model(**kw)
  rows = []
  for m, (gh, gw) in enumerate(model.stage_grids(size)):
    n, c, h = gh * gw, model.dims[m], model.heads[m]
    x, s = _sds(1, n, c), _sds(1, h, n, n)
    va, la = VanillaAttention(h), LessAttention(h)
    pv, pl = _abstract_params(va, x), _abstract_params(la, x, s)
    f_va = _flops(lambda p, x: va.apply({"params": p}, x)[0], pv, x)["flops"]
    f_la = _flops(lambda p, x, s: la.apply({"params": p}, x, s)[0], pl, x, s)["flops"]
    dropped = 2 * n * c * c + n * n * c       # Q, K projections + Q K^T, MACs
    added = 2 * h * n**3                      # Theta and Psi on [H, N, N], MACs
    rows.append({"stage": m, "tokens": n, "dim": c, "heads": h, "va_flops": f_va,
                 "la_flops": f_la, "la_over_va": f_la / f_va, "qk_macs_dropped": dropped,
                 "transform_macs_added": added, "la_cheaper": added < dropped,
                 "theta_psi_params": 2 * (n * n + n)})
  return rows


def time_models(kws: dict, size: int, batch: int, reps: int) -> dict:
  """Images/s of each model, calls alternating between the models, best of `reps` each."""
  images = jnp.asarray(np.random.default_rng(0).normal(size=(batch, size, size, 3)), jnp.float32)
  fns, out = {}, {}
  for name, kw in kws.items():
    model = lavit.Model(**kw)
    params = nn.unbox(jax.jit(model.init)(jax.random.PRNGKey(0), images[:1])["params"])
    fwd = jax.jit(lambda p, x, model=model: model.apply({"params": p}, x)[0])
    t0 = time.perf_counter()
    compiled = fwd.lower(params, images).compile()
    out[name] = {"compile_s": time.perf_counter() - t0}
    fns[name] = (compiled, params)
  best = _alternate_best({name: (fn, (p, images)) for name, (fn, p) in fns.items()}, reps)
  for name in fns:
    out[name].update(best_s=best[name], images_per_s=batch / best[name])
  return out


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--preset", default="lavit_t_style", help=f"one of {sorted(lavit.PRESETS)}")
  p.add_argument("--image_size", type=int, default=224)
  p.add_argument("--batch", type=int, default=8)
  p.add_argument("--reps", type=int, default=5)
  p.add_argument("--quick", action="store_true", help="tiny preset at 64 px, batch 4, 3 reps")
  p.add_argument("--out", default="")
  args = p.parse_args()
  if args.quick:
    args.preset, args.image_size, args.batch, args.reps = "tiny", 64, 4, 3
  kw_la = {**lavit.PRESETS[args.preset], "image_size": args.image_size}
  kw_vit = lavit.vit_baseline(kw_la)
  size = args.image_size
  t0 = time.perf_counter()
  models = {"lavit": model_row(kw_la, size), "vit": model_row(kw_vit, size)}
  stages = stage_rows(kw_la, kw_vit, size, args.batch, args.reps)
  attention = attention_rows(kw_la, size)
  timing = time_models({"lavit": kw_la, "vit": kw_vit}, size, args.batch, args.reps)
  for name in models:
    models[name].update(timing[name])
  dev = jax.devices()[0]
  out = {"benchmark": "lavit_flops", "machine": {
           "platform": dev.platform, "device_kind": dev.device_kind, "num_devices": jax.device_count(),
           "cpu_count": os.cpu_count(), "host": platform.node(), "jax": jax.__version__},
         "preset": args.preset, "model_kwargs": {k: list(v) if isinstance(v, tuple) else v
                                                 for k, v in kw_la.items()},
         "image_size": size, "batch_size": args.batch, "reps": args.reps, "dtype": "float32",
         "flops_note": "XLA cost analysis of the forward (logits) at batch 1; per-stage rows are "
                       "each stage alone; attention rows one attention module per stage shape",
         "models": models, "stages": stages, "attention": attention,
         "lavit_over_vit": {"flops": models["lavit"]["flops"] / models["vit"]["flops"],
                            "params": models["lavit"]["params"] / models["vit"]["params"],
                            "images_per_s": models["lavit"]["images_per_s"]
                            / models["vit"]["images_per_s"]},
         "wall_s": time.perf_counter() - t0}
  path = args.out or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                  f"lavit_flops_{dev.platform}.json")
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "w") as f:
    json.dump(out, f, indent=2)
  for r in stages:
    print(json.dumps(r))
  for r in attention:
    print(json.dumps(r))
  la, vit = models["lavit"], models["vit"]
  per_stage = " ".join(f"s{r['stage']}({r['layers']},N={r['tokens']}):{r['lavit_over_vit']:.3f}"
                       f"/{r['lavit_over_vit_time']:.2f}" for r in stages)
  per_attn = " ".join(f"N={r['tokens']}:{r['la_over_va']:.2f}" for r in attention)
  print(f"lavit_flops {args.preset}@{size} on {dev.device_kind} -> {path}: LaViT "
        f"{la['params'] / 1e6:.2f}M params {la['flops'] / 1e9:.2f} GFLOP {la['images_per_s']:.1f} "
        f"img/s vs ViT {vit['params'] / 1e6:.2f}M {vit['flops'] / 1e9:.2f} GFLOP "
        f"{vit['images_per_s']:.1f} img/s; per stage LaViT/ViT FLOPs/time {per_stage}; "
        f"attention LA/VA {per_attn}")


if __name__ == "__main__":
  main()
