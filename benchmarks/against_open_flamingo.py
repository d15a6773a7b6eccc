"""Our Flamingo train step against open_flamingo's on the same weights and batch (issue 14).

  python benchmarks/train_step.py --against=open_flamingo      # -> results/train_step_against_open_flamingo_<platform>.json

One OpenFlamingo-shaped model (ViT 224/16 width 384 depth 6, LLaMA 512 x 8 layers, 8 heads / 4 KV
heads, xattn every 2 layers, OpenFlamingo's default Perceiver and xattn) is made by open_flamingo's own
factory (`openflamingo_ref.build`) and converted with our loader; the batch is 4 rows x 2 images x 128
tokens, both images used. Both sides train the same set (Perceiver, gated xattn blocks, the LM input
embedding with its gradient masked to the `<image>` / `<|endofchunk|>` rows) with AdamW (wd 0.1 on the
xattn blocks, clip 1.0), PyTorch with `torch.set_num_threads(cores)`. Timed in one process, best of
`--repeats`: forward (the loss, no autograd), the train step (forward + backward + AdamW), and each
part's forward (vision, resampler, one xattn block, the LM without xattn), with XLA's FLOP count of
each. The first losses must agree within 1e-4. The floor is the step's FLOPs at this machine's best
dense matmul rate: on a 2-core CPU it caps any speedup over open_flamingo near 1.7x.
"""

import functools
import json
import os
import platform
import tempfile

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import openflamingo_ref as ref
import torch
from timing import best_time
from train_step import matmul_peak_flops

from vlm_jax import host_malloc
from vlm_jax.layers.gated_xattn import GatedCrossAttentionBlock, media_text_time
from vlm_jax.layers.resampler import PerceiverResampler
from vlm_jax.models import model_class
from vlm_jax.train.losses import batch_loss, get_loss
from vlm_jax.train.optimizer import make_optimizer
from vlm_jax.train.state import TrainState, merge_params, split_params
from vlm_jax.train.step import make_train_step

XATTN = r"(xattn_\d+|lm/layers/xattn)/"
TRAINABLE = rf"^(resampler/|{XATTN})|^lm/embed/embedding$"  # configs/flamingo.py FLAMINGO_TRAINABLE
BATCH = dict(rows=4, images=2, text_len=128)
LOSS_ATOL = 1e-4


def make_batch(media_id: int, image_size: int, vocab: int, rows: int, images: int, text_len: int,
               seed: int = 0) -> dict:
  """Random ids with `images` <image> tokens per row (evenly spaced, the first at 0), labels = ids with
  the <image> positions ignored (OpenFlamingo's train loop), CLIP-scale random pixels."""
  rng = np.random.default_rng(seed)
  ids = rng.integers(5, vocab, (rows, text_len)).astype(np.int32)
  ids[:, np.linspace(0, text_len, images, endpoint=False).astype(int)] = media_id
  labels = np.where(ids == media_id, -100, ids).astype(np.int32)
  return {"inputs": {"vision_x": rng.normal(size=(rows, images, image_size, image_size, 3)).astype(
            np.float32), "input_ids": ids, "attention_mask": np.ones((rows, text_len), np.int32)},
          "labels": labels}


def optimizer_config(media_id: int, eoc_id: int, lr: float, weight_decay: float):
  """OpenFlamingo's recipe as our config.optimizer (constant lr, no warm-up in a benchmark)."""
  return ml_collections.ConfigDict(dict(
    name="adamw", learning_rate=lr, schedule="constant", warmup_steps=0, total_steps=1_000_000,
    b1=0.9, b2=0.999, eps=1e-8, weight_decay=weight_decay, weight_decay_regex=rf"^{XATTN}",
    grad_clip_norm=1.0, trainable_rows={"lm/embed/embedding": [media_id, eoc_id]}))


def flops_of(compiled) -> float:
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return float(cost.get("flops", 0.0))


def compile_timed(fn, *args, repeats: int, donate: bool = False, profile_dir: str = "") -> dict:
  """jit + compile `fn(*args)` -> {"time_s": best of `repeats`, "flops": XLA's count}. A donated
  first argument (the train state) is threaded through the calls; with `profile_dir` two calls
  after the timing are traced there."""
  compiled = jax.jit(fn, donate_argnums=(0,) if donate else ()).lower(*args).compile()
  if donate:
    box = [args[0]]

    def call(*rest):
      box[0], metrics = compiled(box[0], *rest)
      return metrics
    seconds = best_time(call, *args[1:], reps=repeats)
  else:
    seconds = best_time(compiled, *args, reps=repeats)
  if profile_dir:
    run_once = call if donate else compiled
    with jax.profiler.trace(profile_dir, create_perfetto_trace=True):
      for _ in range(2):
        jax.block_until_ready(run_once(*(args[1:] if donate else args)))
  return {"time_s": seconds, "flops": flops_of(compiled)}


def our_parts(ours, params: dict, batch: dict) -> dict:
  """name -> (fn, args): the forward of each part of `ours` on `batch` as the model runs it."""
  kw = dict(dtype=ours.dtype, param_dtype=ours.param_dtype)
  x = batch["inputs"]
  b, t_img = x["vision_x"].shape[:2]
  pixels = jnp.asarray(x["vision_x"]).reshape((b * t_img,) + x["vision_x"].shape[2:])
  tower = ours._tower(parent=None, **kw)

  def vision(p, pixels):
    last, aux = tower.apply({"params": p}, pixels)
    tokens = last if ours.vision_tokens == "pre_ln_post" else aux["post_norm_tokens"]
    return tokens[:, 1:]
  tokens = vision(params["vision"], pixels)
  tokens = tokens.reshape(b, t_img, 1, *tokens.shape[1:])
  resampler = PerceiverResampler(**kw, **dict(ours.resampler))
  media, _ = resampler.apply({"params": params["resampler"]}, tokens)
  block = GatedCrossAttentionBlock(only_attend_immediate_media=ours.only_attend_immediate_media,
                                   **kw, **dict(ours.xattn))
  ids = jnp.asarray(x["input_ids"])
  text_time = media_text_time(ids == ours.media_token_id)
  hidden = jnp.take(params["lm"]["embed"]["embedding"], ids, axis=0)
  lm = model_class(ours.lm_family, "lm_family")(**kw, **dict(ours.lm))
  mask = jnp.asarray(x["attention_mask"])
  first_block = min((k for k in params if k.startswith("xattn_")), key=lambda k: int(k[6:]))
  return {
    "vision": (vision, (params["vision"], pixels)),
    "resampler": (lambda p, t: resampler.apply({"params": p}, t)[0], (params["resampler"], tokens)),
    "xattn_block": (lambda p, h, m, tt: block.apply({"params": p}, h, m, tt)[0],
                    (params[first_block], hidden, media, text_time)),
    "lm_without_xattn": (lambda p, i, m: lm.apply({"params": p}, i, m)[0], (params["lm"], ids, mask)),
  }


def our_part_grads(parts: dict) -> dict:
  """name -> (fn, args): forward + backward of the trainable parts as the train step needs them: the
  resampler's params, one xattn block's params and input, the LM's input embedding (the other LM
  params frozen). The loss is sum(out * 0.01), the same on both sides."""
  def grad_of(fn, argnums):
    return jax.grad(lambda *a: jnp.sum(fn(*a) * 0.01), argnums=argnums)
  resampler, r_args = parts["resampler"]
  block, b_args = parts["xattn_block"]
  lm, (lm_params, ids, mask) = parts["lm_without_xattn"]
  rest = {k: v for k, v in lm_params.items() if k != "embed"}
  return {
    "resampler_fwd_bwd": (grad_of(resampler, (0,)), r_args),
    "xattn_block_fwd_bwd": (grad_of(block, (0, 1)), b_args),
    "lm_fwd_bwd_to_embedding": (grad_of(lambda e, r, i, m: lm({**r, "embed": e}, i, m), (0,)),
                                (lm_params["embed"], rest, ids, mask)),
  }


def run(repeats: int = 5, lr: float = 1e-4, weight_decay: float = 0.1, profile_dir: str = "") -> dict:
  """Builds both models, checks the first losses agree, times everything -> the JSON's dict. With
  `profile_dir`, two more calls of our train step are traced there (`jax.profiler`, TensorBoard's
  profile plugin or Perfetto) after the timing."""
  torch.set_num_threads(os.cpu_count())
  root = tempfile.mkdtemp(prefix="of_bench_")
  model, _, lm_dir, cfg_json = ref.build(root)
  ours, params = ref.convert(model, root, lm_dir, cfg_json, ref.SIZES["every"])
  media_id, eoc_id = int(model.media_token_id), int(model.eoc_token_id)
  batch = make_batch(media_id, ref.SIZES["image_size"], ref.SIZES["vocab_size"], **BATCH)
  trainer = ref.TorchTrainer(model, ref.torch_inputs(batch), media_id, eoc_id, lr=lr,
                             weight_decay=weight_decay)

  loss_fn = batch_loss(get_loss("next_token_ce"))
  forward = jax.jit(lambda p, bt: loss_fn(functools.partial(ours.apply, {"params": p}), bt)[0])
  jax_loss, torch_loss = float(forward(params, batch)), trainer.loss()
  if abs(jax_loss - torch_loss) > LOSS_ATOL:
    raise AssertionError(f"first losses differ: vlm_jax {jax_loss:.6f} vs open_flamingo "
                         f"{torch_loss:.6f} (atol {LOSS_ATOL})")

  trainable, frozen = split_params(params, TRAINABLE)
  tx = make_optimizer(optimizer_config(media_id, eoc_id, lr, weight_decay), trainable)
  state = TrainState(jnp.zeros((), jnp.int32), trainable, frozen, tx.init(trainable))
  step = make_train_step(ours, tx, get_loss("next_token_ce"))
  key = jax.random.PRNGKey(0)
  n_trainable = sum(x.size for x in jax.tree.leaves(trainable))
  n_torch = sum(p.numel() for p in trainer.params)
  del params  # the state holds them; the step donates it

  def jax_forward(state, bt):
    return loss_fn(functools.partial(ours.apply, {"params": merge_params(state.trainable,
                                                                           state.frozen)}), bt)[0]
  ours_t = {"forward": compile_timed(jax_forward, state, batch, repeats=repeats)}
  parts = our_parts(ours, merge_params(state.trainable, state.frozen), batch)
  for name, (fn, args) in parts.items():
    ours_t[name] = compile_timed(fn, *args, repeats=repeats)
  for name, (fn, args) in our_part_grads(parts).items():
    ours_t[name] = compile_timed(fn, *args, repeats=repeats)
  ours_t["train_step"] = compile_timed(step, state, batch, key, repeats=repeats, donate=True,
                                       profile_dir=profile_dir)

  theirs = {"forward": {"time_s": best_time(trainer.loss, reps=repeats)}}
  for name, fn in trainer.part_fns().items():
    theirs[name] = {"time_s": best_time(fn, reps=repeats)}
  for name, fn in trainer.part_grads().items():
    theirs[name] = {"time_s": best_time(fn, reps=repeats)}
  theirs["train_step"] = {"time_s": best_time(trainer.step, reps=repeats)}

  tokens = BATCH["rows"] * BATCH["text_len"]
  images = BATCH["rows"] * BATCH["images"]
  rows = {}
  for name in ours_t:
    o, t = ours_t[name], theirs[name]
    rows[name] = {"vlm_jax_s": o["time_s"], "open_flamingo_s": t["time_s"], "xla_flops": o["flops"],
                  "speedup": t["time_s"] / o["time_s"],
                  "vlm_jax_gflops_per_s": o["flops"] / o["time_s"] / 1e9}
  for name in ("forward", "train_step"):
    for side, key_ in (("vlm_jax", "vlm_jax_s"), ("open_flamingo", "open_flamingo_s")):
      rows[name][f"{side}_tokens_per_s"] = tokens / rows[name][key_]
      rows[name][f"{side}_images_per_s"] = images / rows[name][key_]
  # The floor: the step's XLA-counted FLOPs at this machine's best dense matmul rate. No reordering
  # of the same math runs faster than that.
  matmul = matmul_peak_flops(jnp.float32, reps=repeats)
  floor_s = rows["train_step"]["xla_flops"] / matmul
  dev = jax.devices()[0]
  return {
    "benchmark": "train_step_against_open_flamingo",
    "machine": {"platform": dev.platform, "device_kind": dev.device_kind, "cpu_count": os.cpu_count(),
                "host": platform.node(), "jax": jax.__version__, "torch": torch.__version__,
                "torch_threads": torch.get_num_threads(),
                "host_malloc_tuned": host_malloc.configure()},
    "sizes": ref.SIZES, "batch": BATCH, "repeats": repeats, "timing": "best of repeats",
    "trainable_params": {"vlm_jax": int(n_trainable), "open_flamingo": int(n_torch)},
    "first_loss": {"vlm_jax": jax_loss, "open_flamingo": torch_loss, "atol": LOSS_ATOL},
    "results": rows,
    "measured_matmul_flops_per_s": matmul,
    "train_step_floor_s": floor_s,
    "max_speedup_at_floor": rows["train_step"]["open_flamingo_s"] / floor_s,
  }


def write(result: dict, out: str = "") -> str:
  path = out or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                             f"train_step_against_open_flamingo_{result['machine']['platform']}.json")
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "w") as f:
    json.dump(result, f, indent=2)
  return path


def summary(result: dict) -> str:
  r = result["results"]
  parts = ", ".join(f"{k} {v['speedup']:.2f}x" for k, v in r.items())
  return (f"vlm_jax vs open_flamingo on {result['machine']['device_kind']}: train step "
          f"{r['train_step']['vlm_jax_s'] * 1e3:.0f} ms vs {r['train_step']['open_flamingo_s'] * 1e3:.0f} ms "
          f"({r['train_step']['speedup']:.2f}x; at the matmul floor it would be "
          f"{result['max_speedup_at_floor']:.2f}x); {parts}")
