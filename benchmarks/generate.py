"""Generation benchmark: greedy decoding tokens/s of `vlm_jax.eval.generate` beside PyTorch on the
same weights, and the time per decode step against the memory-bandwidth (and compute) floor.

  python benchmarks/generate.py                          # mid LLaMA + mid Flamingo, batch 1 and 16
  python benchmarks/generate.py --models=llama --batches=1 --new_tokens=16              # quicker

Models (random weights, float32): a mid LLaMA (768 wide, 8 layers, 8k vocab, ~69M params) built as a
transformers `LlamaForCausalLM` and converted with `load_hf_lm`; and a mid OpenFlamingo on that LM
(open_clip ViT 384x6 at 112 px, OpenFlamingo's 6-layer resampler with 64 latents, xattn every 2nd
layer) built with the `open_flamingo` package and converted with `load_openflamingo`. The PyTorch
references are transformers' `generate` and OpenFlamingo's `generate` (both with their KV caches,
OpenFlamingo with its cached media); every row is forced to the full length (min_new_tokens) so
both sides make the same number of tokens, and the ids are compared.

Per decode step (what a token costs once the prompt is in): each side is timed as
(t(N) - t(N/2)) / (N/2), so prefill and launch cancel out. Times are the best of --reps runs, as
the host's cores are shared; PyTorch runs with 1 thread and with all, and the faster counts (under
contention OpenMP's spinning threads can be several times slower with all cores). The floor is the
larger of (a) the bytes one step must read (the decoder's params, the lm_head included, the
embedding table only for its B rows; the KV cache at its mean length; for Flamingo the xattn blocks
without their media k/v projections and the cached media keys/values) over this host's read
bandwidth, measured as the best of several reductions over a 256 MiB array (`--bandwidth_gbs`
overrides it), and (b) the step's FLOPs over the measured 2048^2 float32 matmul rate
(`benchmarks/train_step.py`; skinny [B, D] matmuls do not reach it, so (b) is loose).
Writes benchmarks/results/generate_<platform>.json and prints a one-line summary last.
"""

import argparse
import json
import os
import platform
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
from timing import best_time
from train_step import matmul_peak_flops

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from vlm_jax.convert import load_hf_lm, load_openflamingo  # noqa: E402
from vlm_jax.eval import generate  # noqa: E402

MID_LLAMA = dict(vocab_size=8192, hidden_size=768, intermediate_size=2048, num_hidden_layers=8,
                 num_attention_heads=12, num_key_value_heads=12, rms_norm_eps=1e-5,
                 initializer_range=0.05, bos_token_id=None, eos_token_id=None, pad_token_id=None)
MID_VIT = {"embed_dim": 384, "quick_gelu": True,
           "vision_cfg": {"image_size": 112, "layers": 6, "width": 384, "head_width": 64,
                          "patch_size": 14},
           "text_cfg": {"context_length": 8, "vocab_size": 50, "width": 16, "heads": 2,
                        "layers": 1}}
PROMPT_LEN = 32


def measure_bandwidth(mib: int = 256, reps: int = 8) -> float:
  """Bytes/s of a jitted reduction over a `mib` MiB float32 array (read-bound), best of `reps`."""
  x = jnp.ones((mib * 2**20 // 4,), jnp.float32)
  return x.nbytes / best_time(jax.jit(jnp.sum), x, reps=reps)


def _nbytes(tree) -> int:
  return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))


def _timed_torch(make, n: int, reps: int) -> tuple[float, float, int]:
  """PyTorch at its best thread count: (best s for n tokens, for n // 2 tokens, threads). On a
  host whose cores other processes share, OpenMP's spinning threads can be several times slower
  with all cores than with one, so both are tried."""
  import torch
  default = torch.get_num_threads()
  best = None
  for threads in sorted({1, default}):
    torch.set_num_threads(threads)
    full, half = best_time(make(n), reps=reps), best_time(make(n // 2), reps=reps)
    if best is None or full < best[0]:
      best = (full, half, threads)
  torch.set_num_threads(default)
  return best


def _build_llama(root: str):
  import openflamingo_ref as ref  # imports torch
  import torch
  import transformers
  torch.manual_seed(0)
  hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**MID_LLAMA)).eval()
  hf.generation_config.eos_token_id = hf.generation_config.bos_token_id = None
  hf.save_pretrained(root)
  # A word-level tokenizer over the whole vocabulary, for OpenFlamingo (which adds its 3 tokens).
  ref.word_tokenizer(root, MID_LLAMA["vocab_size"])
  return hf


def _build_openflamingo(root: str, lm_dir: str):
  import openflamingo_ref as ref
  import torch
  from open_flamingo.src import flamingo_lm
  # transformers 5's generate leaves attention_mask out of some forward calls; OpenFlamingo's
  # forward(input_ids, attention_mask, **kw) requires it positionally.
  flamingo_lm.FlamingoLMMixin.forward.__defaults__ = (None,)
  model, tok, cfg_json = ref.openflamingo_model(root, lm_dir, "mid-vit", MID_VIT, every=2, gate=0.5)
  model.eval()
  full = os.path.join(root, "openflamingo.pt")
  torch.save(model.state_dict(), full)
  ids = {t: tok.encode(t)[-1] for t in ("<image>", "<|endofchunk|>", "<PAD>")}
  ours, params = load_openflamingo(full, lm=lm_dir, vision=cfg_json, cross_attn_every_n_layers=2,
                                   vision_tokens="post_ln_post")
  return model, ours, params, ids


def _prompts(batch: int, vocab: int, media_id: int | None, seed: int = 0):
  """Left-padded prompts int[B, PROMPT_LEN] (row i has i % 4 padding tokens), mask, pad id 0."""
  rng = np.random.default_rng(seed)
  ids = rng.integers(3, vocab, (batch, PROMPT_LEN))
  mask = np.ones_like(ids)
  for i in range(batch):
    pad = i % 4
    ids[i, :pad], mask[i, :pad] = 0, 0
    if media_id is not None:
      ids[i, pad] = media_id
  return ids.astype(np.int32), mask.astype(np.int32)


def _decode_floors(weight_bytes: int, cache_bytes_per_token: int, attn_flops_per_key: int,
                   media_bytes: int, media_flops: int, batch: int, n: int, bandwidth: float,
                   peak: float) -> tuple[float, float]:
  """Seconds one decode step needs at least: (bytes read / bandwidth, FLOPs / matmul peak).

  weight_bytes: the float32 weights a step reads (each weight is one multiply-add per row);
  the KV cache at its mean length, read once, and attention's q.k and p.v (2 x 2 FLOPs per key,
  head dim and head); the cached media keys/values and their attention.
  """
  keys = PROMPT_LEN + n / 2
  read = weight_bytes + cache_bytes_per_token * batch * keys + media_bytes
  flops = 2 * batch * weight_bytes / 4 + attn_flops_per_key * batch * keys + media_flops
  return read / bandwidth, flops / peak


def bench_llama(hf, model, params, batch: int, n: int, reps: int, bandwidth: float,
                peak: float) -> dict:
  import torch
  ids, mask = _prompts(batch, MID_LLAMA["vocab_size"], None)

  def ours(k):
    return lambda: np.asarray(generate(model, params, ids, mask, max_new_tokens=k))
  t0 = time.perf_counter()
  out = ours(n)()
  compile_s = time.perf_counter() - t0
  ours(n // 2)()  # compile the half-length program too
  t_full, t_half = best_time(ours(n), reps=reps), best_time(ours(n // 2), reps=reps)

  def theirs(k):
    def run():
      with torch.no_grad():
        return hf.generate(input_ids=torch.tensor(ids, dtype=torch.long),
                           attention_mask=torch.tensor(mask, dtype=torch.long), max_new_tokens=k,
                           min_new_tokens=k, do_sample=False, pad_token_id=0)
    return run
  t_torch, t_torch_half, threads = _timed_torch(theirs, n, reps)
  ref = theirs(n)()[:, PROMPT_LEN:].numpy()
  weights = _nbytes(params) - _nbytes(params["embed"])  # the embedding: B rows only
  kv_width = model.num_layers * model.kv_heads * model.dim_per_head
  floors = _decode_floors(weights, 2 * kv_width * 4, 4 * model.num_layers * model.hidden_size,
                          0, 0, batch, n, bandwidth, peak)
  return _row("llama_mid", batch, n, out, ref, compile_s, (t_full, t_half),
              (t_torch, t_torch_half, threads), floors, _nbytes(params))


def bench_flamingo(of, model, params, tok_ids, batch: int, n: int, reps: int,
                   bandwidth: float, peak: float) -> dict:
  import torch
  media, eoc = tok_ids["<image>"], tok_ids["<|endofchunk|>"]
  ids, mask = _prompts(batch, MID_LLAMA["vocab_size"], media)
  s = MID_VIT["vision_cfg"]["image_size"]
  vx = np.random.default_rng(1).normal(size=(batch, 1, s, s, 3)).astype(np.float32)
  kw = dict(max_new_tokens=n, min_new_tokens=n, stop_token_ids=(eoc,))

  def ours(k):
    return lambda: np.asarray(generate(model, params, ids, mask, vision_x=vx,
                                       **{**kw, "max_new_tokens": k, "min_new_tokens": k}))
  t0 = time.perf_counter()
  out = ours(n)()
  compile_s = time.perf_counter() - t0
  ours(n // 2)()
  t_full, t_half = best_time(ours(n), reps=reps), best_time(ours(n // 2), reps=reps)
  vision_x = torch.tensor(vx).permute(0, 1, 4, 2, 3).unsqueeze(2)  # [B, T_img, F, C, H, W]

  def theirs(k):
    def run():
      with torch.no_grad():
        return of.generate(vision_x=vision_x, lang_x=torch.tensor(ids, dtype=torch.long),
                           attention_mask=torch.tensor(mask, dtype=torch.long), max_new_tokens=k,
                           min_new_tokens=k, do_sample=False, num_beams=1, pad_token_id=0,
                           eos_token_id=eoc)
    return run
  try:
    t_torch, t_torch_half, threads = _timed_torch(theirs, n, reps)
    ref = theirs(n)()[:, PROMPT_LEN:].numpy()
  except Exception as e:  # noqa: BLE001 - report, do not fail the run
    print(f"OpenFlamingo generate failed: {type(e).__name__}: {e}")
    t_torch, t_torch_half, threads, ref = float("nan"), float("nan"), 0, None
  # Decode steps read the LM (its embedding: B rows only) and the xattn blocks but for their
  # media k/v projections, which ran once at the prefill.
  xattn = {k: v for k, v in params.items() if k.startswith("xattn")}
  weights = (_nbytes(params["lm"]) - _nbytes(params["lm"]["embed"]) + _nbytes(xattn)
             - sum(_nbytes(x["attn"][p]) for x in xattn.values() for p in ("k", "v")))
  lm_cfg, xcfg = dict(model.lm), dict(model.xattn or {})
  head_dim = lm_cfg["hidden_size"] // lm_cfg["num_heads"]
  kv_width = lm_cfg["num_layers"] * (lm_cfg.get("num_kv_heads") or lm_cfg["num_heads"]) * head_dim
  media_keys = len(xattn) * dict(model.resampler or {}).get("num_latents", 64) * vx.shape[1]
  media_width = media_keys * xcfg.get("heads", 8) * xcfg.get("dim_head", 64)
  attn_flops = 4 * lm_cfg["num_layers"] * lm_cfg["hidden_size"]
  floors = _decode_floors(weights, 2 * kv_width * 4, attn_flops, 2 * batch * media_width * 4,
                          4 * batch * media_width, batch, n, bandwidth, peak)
  return _row("flamingo_mid", batch, n, out, ref, compile_s, (t_full, t_half),
              (t_torch, t_torch_half, threads), floors, _nbytes(params))


def _row(name, batch, n, out, ref, compile_s, ours, torch_, floors, n_bytes) -> dict:
  (t_full, t_half), (t_torch, t_torch_half, threads) = ours, torch_
  step = (t_full - t_half) / (n - n // 2)
  floor = max(floors)
  return {
    "model": name, "batch": batch, "prompt_len": PROMPT_LEN, "new_tokens": n,
    "param_bytes": n_bytes, "first_call_s": compile_s,
    "ours_s": t_full, "ours_tokens_per_s": batch * n / t_full,
    "torch_s": t_torch, "torch_tokens_per_s": batch * n / t_torch, "torch_threads": threads,
    "speedup_vs_torch": t_torch / t_full,
    "ours_decode_step_ms": 1e3 * step,
    "torch_decode_step_ms": 1e3 * (t_torch - t_torch_half) / (n - n // 2),
    "bandwidth_floor_step_ms": 1e3 * floors[0], "compute_floor_step_ms": 1e3 * floors[1],
    "floor_step_ms": 1e3 * floor,
    "floor_fraction": floor / step if step > 0 else float("nan"),
    "ids_equal_torch": None if ref is None else bool(np.array_equal(out, ref)),
    "ids_match_fraction": None if ref is None else float(np.mean(out == ref)),
  }


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--models", default="llama,flamingo")
  p.add_argument("--batches", default="1,16")
  p.add_argument("--new_tokens", type=int, default=32)
  p.add_argument("--reps", type=int, default=3)
  p.add_argument("--bandwidth_gbs", type=float, default=0.0,
                 help="host memory read bandwidth in GB/s (default: measured)")
  p.add_argument("--out", default="")
  args = p.parse_args()
  import torch  # the references; the library itself never imports torch
  from tests.torch_compat import ensure_torchvision_importable  # open_clip imports torchvision
  ensure_torchvision_importable()
  # XLA's CPU runtime flushes denormals to zero; let PyTorch do the same so that neither side pays
  # for the denormal arithmetic small random weights can produce.
  torch.set_flush_denormal(True)
  dev = jax.devices()[0]
  measured = measure_bandwidth()
  bandwidth = args.bandwidth_gbs * 1e9 if args.bandwidth_gbs else measured
  peak = matmul_peak_flops(jnp.float32)
  models = args.models.split(",")
  batches = [int(b) for b in args.batches.split(",")]
  rows = []
  with tempfile.TemporaryDirectory() as root:
    lm_dir = os.path.join(root, "llama")
    hf = _build_llama(lm_dir)
    if "llama" in models:
      model, params = load_hf_lm(lm_dir)
      for b in batches:
        rows.append(bench_llama(hf, model, params, b, args.new_tokens, args.reps, bandwidth,
                                peak))
        print(json.dumps(rows[-1]))
    if "flamingo" in models:
      of, model, params, tok_ids = _build_openflamingo(root, lm_dir)
      for b in batches:
        rows.append(bench_flamingo(of, model, params, tok_ids, b, args.new_tokens, args.reps,
                                   bandwidth, peak))
        print(json.dumps(rows[-1]))
  out = {"benchmark": "generate", "machine": {
           "platform": dev.platform, "device_kind": dev.device_kind,
           "num_devices": jax.device_count(),
           "cpu_count": os.cpu_count(), "host": platform.node(), "jax": jax.__version__,
           "torch": torch.__version__, "torch_threads": torch.get_num_threads()},
         "dtype": "float32", "decoding": "greedy",
         "bandwidth_bytes_per_s": bandwidth,
         "bandwidth_source": "stated" if args.bandwidth_gbs else "measured_jax_sum_256MiB",
         "measured_bandwidth_bytes_per_s": measured,
         "matmul_peak_flops_per_s": peak, "peak_source": "measured_matmul_2048_float32",
         "results": rows}
  path = args.out or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                  f"generate_{dev.platform}.json")
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "w") as f:
    json.dump(out, f, indent=2)
  summary = ", ".join(
    f"{r['model']} b{r['batch']}: {r['ours_tokens_per_s']:.0f} tok/s "
    f"({r['speedup_vs_torch']:.2f}x torch), {r['ours_decode_step_ms']:.1f} ms/step "
    f"(torch {r['torch_decode_step_ms']:.1f}) vs {r['floor_step_ms']:.1f} ms floor"
    for r in rows)
  print(f"generate on {dev.device_kind} [float32, {bandwidth / 1e9:.1f} GB/s] -> {path}: {summary}")


if __name__ == "__main__":
  main()
