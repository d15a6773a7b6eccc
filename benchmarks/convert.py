r"""Conversion cost: seconds and peak host memory to convert a synthetic LLaMA checkpoint.

  python benchmarks/convert.py                 # ~1B params (bfloat16 on disk, 2 GB), this machine
  python benchmarks/convert.py --size tiny     # seconds, for a smoke run

A random-weight HF LLaMA checkpoint (sharded safetensors in bfloat16, as hub checkpoints are stored) is
written to a temp directory; then each measured step runs in a fresh subprocess so its peak RSS
(`VmHWM`) is its own:
  baseline  import jax + build the model abstractly (the fixed cost every step pays),
  load      `load_hf_lm` -> float32 jax Arrays on the default device,
  cli       `python -m vlm_jax.convert lm` (load + orbax save),
  load_bf16, cli_bf16   the same with `param_dtype="bfloat16"` / `--dtype bfloat16` (the frozen
            towers' storage dtype),
and reports seconds and peak memory as ratios to the checkpoint's size on disk and to the params in the
target dtype (peak <= baseline + params + one tensor is the design goal: never two full copies, never
a float32 copy of a bfloat16 conversion). Writes
benchmarks/results/convert_<platform>.json and prints a one-line summary last.
"""

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

SIZES = {  # LLaMA shapes; "1b" is TinyLlama-1.1B-like
  "1b": dict(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
             num_attention_heads=32, num_key_value_heads=4),
  "tiny": dict(vocab_size=1000, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
               num_attention_heads=8, num_key_value_heads=4),
}

STEP = r"""
import json, sys, time
t0 = time.perf_counter()
import jax, jax.numpy as jnp
sys.path.insert(0, {root!r})
from vlm_jax.convert import hf
step, path, out = sys.argv[1], sys.argv[2], sys.argv[3]
if step == "baseline":
  from vlm_jax.convert.loading import abstract_params
  conf = hf.read_hf_config(path)
  conv, fam = hf.family(conf, path)
  abstract_params(fam.Model(**conv.model_kwargs_from_hf(conf)), jnp.zeros((1, 1), jnp.int32))
elif step.startswith("load"):
  model, params = hf.load_hf_lm(path, param_dtype="bfloat16" if step.endswith("bf16") else None)
  jax.block_until_ready(params)
else:
  from vlm_jax.convert.__main__ import main
  main(["lm", path, "--out", out, "--dtype", "bfloat16" if step.endswith("bf16") else "float32"])
# VmHWM is this process image's own peak; ru_maxrss would carry over the parent's across exec.
hwm = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM:"))
print(json.dumps({{"seconds": time.perf_counter() - t0, "peak_rss_bytes": hwm * 1024}}))
"""


def write_synthetic_checkpoint(directory: str, cfg: dict) -> tuple[int, int]:
  """-> (bytes on disk, number of params). Weights are random bfloat16, written shard by shard."""
  import ml_dtypes

  from vlm_jax.convert.safetensors_io import write_checkpoint
  h, f, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
  kv = h // cfg["num_attention_heads"] * cfg["num_key_value_heads"]
  shapes = {"model.embed_tokens.weight": (v, h), "model.norm.weight": (h,), "lm_head.weight": (v, h)}
  for i in range(cfg["num_hidden_layers"]):
    p = f"model.layers.{i}"
    shapes.update({f"{p}.self_attn.q_proj.weight": (h, h), f"{p}.self_attn.k_proj.weight": (kv, h),
                   f"{p}.self_attn.v_proj.weight": (kv, h), f"{p}.self_attn.o_proj.weight": (h, h),
                   f"{p}.mlp.gate_proj.weight": (f, h), f"{p}.mlp.up_proj.weight": (f, h),
                   f"{p}.mlp.down_proj.weight": (h, f), f"{p}.input_layernorm.weight": (h,),
                   f"{p}.post_attention_layernorm.weight": (h,)})
  rng = np.random.default_rng(0)
  tensors = {k: (rng.standard_normal(s, np.float32) * 0.02).astype(ml_dtypes.bfloat16)
             for k, s in shapes.items()}
  write_checkpoint(directory, tensors, max_shard_bytes=512 * 2**20)
  config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "rms_norm_eps": 1e-5,
            "rope_theta": 10000.0, "tie_word_embeddings": False, "hidden_act": "silu", **cfg}
  with open(os.path.join(directory, "config.json"), "w") as fh:
    json.dump(config, fh)
  disk = sum(os.path.getsize(os.path.join(directory, n)) for n in os.listdir(directory))
  return disk, sum(int(np.prod(s)) for s in shapes.values())


def run_step(step: str, path: str, out: str) -> dict:
  env = dict(os.environ, JAX_PLATFORMS=os.environ.get("JAX_PLATFORMS", "cpu"))
  res = subprocess.run([sys.executable, "-c", STEP.format(root=ROOT), step, path, out], env=env,
                       capture_output=True, text=True, check=False)
  if res.returncode:
    raise RuntimeError(f"{step} failed:\n{res.stderr[-3000:]}")
  return json.loads(res.stdout.strip().splitlines()[-1])


def main() -> None:
  ap = argparse.ArgumentParser()
  ap.add_argument("--size", default="1b", choices=sorted(SIZES))
  ap.add_argument("--out", default=None, help="JSON path (default benchmarks/results/convert_cpu.json)")
  args = ap.parse_args()
  with tempfile.TemporaryDirectory() as tmp:
    ckpt = os.path.join(tmp, "hf")
    t0 = time.perf_counter()
    disk, n_params = write_synthetic_checkpoint(ckpt, SIZES[args.size])
    write_s = time.perf_counter() - t0
    steps = {s: run_step(s, ckpt, os.path.join(tmp, f"out_{s}"))
             for s in ("baseline", "load", "cli", "load_bf16", "cli_bf16")}
  f32, bf16 = 4 * n_params, 2 * n_params
  base = steps["baseline"]["peak_rss_bytes"]
  result = {
    "benchmark": "convert", "size": args.size, "params": n_params, "checkpoint_bytes_on_disk": disk,
    "checkpoint_dtype": "bfloat16", "param_bytes_float32": f32, "write_synthetic_seconds": write_s,
    "steps": steps,
    "load_seconds": steps["load"]["seconds"], "cli_seconds": steps["cli"]["seconds"],
    "load_peak_rss_over_disk": steps["load"]["peak_rss_bytes"] / disk,
    "load_peak_rss_minus_baseline_over_float32_params": (steps["load"]["peak_rss_bytes"] - base) / f32,
    "cli_peak_rss_minus_baseline_over_float32_params": (steps["cli"]["peak_rss_bytes"] - base) / f32,
    "param_bytes_bfloat16": bf16,
    "load_bf16_seconds": steps["load_bf16"]["seconds"], "cli_bf16_seconds": steps["cli_bf16"]["seconds"],
    "load_bf16_peak_rss_over_bfloat16_params": steps["load_bf16"]["peak_rss_bytes"] / bf16,
    "load_bf16_peak_rss_minus_baseline_over_bfloat16_params":
      (steps["load_bf16"]["peak_rss_bytes"] - base) / bf16,
    "cli_bf16_peak_rss_over_bfloat16_params": steps["cli_bf16"]["peak_rss_bytes"] / bf16,
    "cli_bf16_peak_rss_minus_baseline_over_bfloat16_params":
      (steps["cli_bf16"]["peak_rss_bytes"] - base) / bf16,
    "load_seconds_per_gb_on_disk": steps["load"]["seconds"] / (disk / 1e9),
    "machine": {"platform": "cpu", "cpu_count": os.cpu_count(), "host": platform.node(),
                "python": platform.python_version()},
  }
  out = args.out or os.path.join(ROOT, "benchmarks", "results", f"convert_cpu{'' if args.size == '1b' else '_' + args.size}.json")
  os.makedirs(os.path.dirname(out), exist_ok=True)
  with open(out, "w") as fh:
    json.dump(result, fh, indent=2)
  print(f"convert {args.size}: {n_params / 1e6:.0f}M params, {disk / 1e9:.2f} GB on disk; load "
        f"{result['load_seconds']:.1f}s, peak RSS {steps['load']['peak_rss_bytes'] / 1e9:.2f} GB "
        f"(baseline {base / 1e9:.2f} GB; (peak - baseline) / float32 params = "
        f"{result['load_peak_rss_minus_baseline_over_float32_params']:.2f}); CLI with orbax save "
        f"{result['cli_seconds']:.1f}s ((peak - baseline) / float32 params = "
        f"{result['cli_peak_rss_minus_baseline_over_float32_params']:.2f}); bfloat16: load "
        f"{result['load_bf16_seconds']:.1f}s, CLI {result['cli_bf16_seconds']:.1f}s, CLI peak RSS "
        f"{steps['cli_bf16']['peak_rss_bytes'] / 1e9:.2f} GB = "
        f"{result['cli_bf16_peak_rss_over_bfloat16_params']:.2f}x the bfloat16 params -> {out}")


if __name__ == "__main__":
  main()
