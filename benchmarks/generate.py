"""Generation benchmark: greedy decoding tokens/s of `vlm_jax.eval.generate` beside PyTorch on the
same weights, and the time per decode step against the memory-bandwidth (and compute) floor.

  python benchmarks/generate.py                # 3 models at batch 1, 16 and 32, LLaMA in bf16 too
  python benchmarks/generate.py --models=llama --batches=1 --new_tokens=16              # quicker

Models (random weights, float32): a mid LLaMA (768 wide, 8 layers, 8k vocab, ~69M params) built as a
transformers `LlamaForCausalLM` and converted with `load_hf_lm`; a mid OpenFlamingo on that LM
(open_clip ViT 384x6 at 112 px, OpenFlamingo's 6-layer resampler with 64 latents, xattn every 2nd
layer) built with the `open_flamingo` package and converted with `load_openflamingo`; and the
OpenFlamingo-shaped model `train_step.py --against=open_flamingo` trains (`flamingo_train`: ViT
224/16 384x6, LLaMA 512x8 with 8/4 heads). With --bf16=1 the LLaMA also decodes with bf16 weights
and KV cache (`vlm_jax.eval.cast_for_decoding`); its rows report that speed, its bandwidth floor
(half the bytes) and how many ids equal the float32 run's. The PyTorch
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

from vlm_jax import host_malloc  # noqa: E402
from vlm_jax.convert import load_hf_lm  # noqa: E402
from vlm_jax.eval import cast_for_decoding, generate  # noqa: E402

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


def _generate_ready(model, tok):
  """An open_flamingo model in eval mode, able to `generate` under transformers 5, and the ids of
  its special tokens."""
  from open_flamingo.src import flamingo_lm
  # transformers 5's generate leaves attention_mask out of some forward calls; OpenFlamingo's
  # forward(input_ids, attention_mask, **kw) requires it positionally.
  flamingo_lm.FlamingoLMMixin.forward.__defaults__ = (None,)
  model.eval()
  return model, {t: tok.encode(t)[-1] for t in ("<image>", "<|endofchunk|>", "<PAD>")}


def _build_openflamingo(root: str, lm_dir: str):
  """The mid OpenFlamingo on the mid LLaMA in `lm_dir`."""
  import openflamingo_ref as ref
  model, tok, cfg_json = ref.openflamingo_model(root, lm_dir, "mid-vit", MID_VIT, every=2, gate=0.5)
  model, ids = _generate_ready(model, tok)
  ours, params = ref.convert(model, root, lm_dir, cfg_json, every=2)
  return model, ours, params, ids


def _build_train_shaped(root: str):
  """The model `benchmarks/train_step.py --against=open_flamingo` trains (openflamingo_ref.SIZES)."""
  import openflamingo_ref as ref
  model, tok, lm_dir, cfg_json = ref.build(root)
  model, ids = _generate_ready(model, tok)
  ours, params = ref.convert(model, root, lm_dir, cfg_json, ref.SIZES["every"])
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


def _timed_ours(run, n: int, reps: int):
  """run(k) -> ids of k new tokens: (ids of n, first call s, best s for n tokens, for n // 2)."""
  t0 = time.perf_counter()
  out = run(n)
  compile_s = time.perf_counter() - t0
  run(n // 2)  # compile the half-length program too
  return (out, compile_s, best_time(lambda: run(n), reps=reps),
          best_time(lambda: run(n // 2), reps=reps))


def bench_llama(hf, model, params, batch: int, n: int, reps: int, bandwidth: float,
                peak: float, bf16: bool) -> dict:
  import torch
  ids, mask = _prompts(batch, MID_LLAMA["vocab_size"], None)

  def ours(m, p):
    return lambda k: np.asarray(generate(m, p, ids, mask, max_new_tokens=k))
  out, compile_s, t_full, t_half = _timed_ours(ours(model, params), n, reps)

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
  row = _row("llama_mid", batch, n, out, ref, compile_s, (t_full, t_half),
             (t_torch, t_torch_half, threads), floors, _nbytes(params))
  if bf16:
    out16, _, t16_full, t16_half = _timed_ours(ours(*cast_for_decoding(model, params)), n, reps)
    step16 = (t16_full - t16_half) / (n - n // 2)
    floor16 = _decode_floors(weights // 2, 2 * kv_width * 2, 0, 0, 0, batch, n, bandwidth, peak)[0]
    row.update({
      "bf16_tokens_per_s": batch * n / t16_full, "bf16_speedup_vs_torch": t_torch / t16_full,
      "bf16_decode_step_ms": 1e3 * step16, "bf16_bandwidth_floor_step_ms": 1e3 * floor16,
      # Per position, and per row up to its first difference (a flip changes what follows).
      "bf16_ids_match_fp32_fraction": float(np.mean(out16 == out)),
      "bf16_first_token_match_fp32_fraction": float(np.mean(out16[:, 0] == out[:, 0])),
      "bf16_agreeing_prefix_mean_tokens": float(np.mean(np.argmin(
        np.concatenate([out16 == out, np.zeros((batch, 1), bool)], 1), axis=1))),
    })
  return row


def bench_flamingo(name, of, model, params, tok_ids, batch: int, n: int, reps: int,
                   bandwidth: float, peak: float, *, vocab: int, image_size: int) -> dict:
  import torch
  media, eoc = tok_ids["<image>"], tok_ids["<|endofchunk|>"]
  ids, mask = _prompts(batch, vocab, media)
  s = image_size
  vx = np.random.default_rng(1).normal(size=(batch, 1, s, s, 3)).astype(np.float32)

  def ours(k):
    return np.asarray(generate(model, params, ids, mask, vision_x=vx, max_new_tokens=k,
                               min_new_tokens=k, stop_token_ids=(eoc,)))
  out, compile_s, t_full, t_half = _timed_ours(ours, n, reps)
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
  return _row(name, batch, n, out, ref, compile_s, (t_full, t_half),
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
  p.add_argument("--models", default="llama,flamingo,flamingo_train",
                 help="llama: the mid LLaMA; flamingo: the mid OpenFlamingo on it; flamingo_train: "
                      "the OpenFlamingo-shaped model of train_step.py --against=open_flamingo")
  p.add_argument("--batches", default="1,16,32")
  p.add_argument("--bf16", type=int, default=1,
                 help="1: also time the LLaMA with bf16 weights (eval.cast_for_decoding) beside float32")
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
                                peak, bool(args.bf16)))
        print(json.dumps(rows[-1]))
    import openflamingo_ref as ref
    flamingos = {
      "flamingo": ("flamingo_mid", lambda: _build_openflamingo(root, lm_dir),
                   MID_LLAMA["vocab_size"], MID_VIT["vision_cfg"]["image_size"]),
      "flamingo_train": ("flamingo_train_shapes",
                         lambda: _build_train_shaped(os.path.join(root, "train_shapes")),
                         ref.SIZES["vocab_size"], ref.SIZES["image_size"])}
    for key, (name, build, vocab, image_size) in flamingos.items():
      if key not in models:
        continue
      of, model, params, tok_ids = build()
      for b in batches:
        rows.append(bench_flamingo(name, of, model, params, tok_ids, b, args.new_tokens,
                                   args.reps, bandwidth, peak, vocab=vocab, image_size=image_size))
        print(json.dumps(rows[-1]))
  out = {"benchmark": "generate", "machine": {
           "platform": dev.platform, "device_kind": dev.device_kind,
           "num_devices": jax.device_count(),
           "cpu_count": os.cpu_count(), "host": platform.node(), "jax": jax.__version__,
           "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
           "host_malloc_tuned": host_malloc.configure()},
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
    + (f"; bf16 {r['bf16_decode_step_ms']:.1f} ms/step ({r['bf16_speedup_vs_torch']:.2f}x torch, "
       f"{r['bf16_ids_match_fp32_fraction']:.2f} of ids = fp32)" if "bf16_decode_step_ms" in r else "")
    for r in rows)
  print(f"generate on {dev.device_kind} [float32, {bandwidth / 1e9:.1f} GB/s] -> {path}: {summary}")


if __name__ == "__main__":
  main()
