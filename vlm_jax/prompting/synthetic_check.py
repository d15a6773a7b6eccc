r"""End-to-end check of Attention Prompting on Image on the synthetic corpus: does a query naming a
shape put the heatmap's mass on that shape?

  python -m vlm_jax.prompting.synthetic_check --workdir=runs/api_check        # a few CPU minutes
  python -m vlm_jax.prompting.synthetic_check --toy --workdir=/tmp/api_toy    # seconds (tests)

A random CLIP gives no meaningful attribution, so the check first trains a tiny CLIP (both towers,
`prompting.clip_model.Model`; 96 px images, 16 px patches -> a 6 x 6 grid) contrastively on the
corpus's caption pairs (one coloured shape per image, "A small red circle on the left.";
`data.synthetic.SyntheticSource("pairs")`), with CLIP's symmetric InfoNCE loss

  L = (CE(s I T^T, diag) + CE(s T I^T, diag)) / 2,   I, T: L2-normalised embeddings float[B, E],
  s = min(exp(log_scale), 100), log_scale learned from log(1 / 0.07)

It then draws held-out images with two shapes in opposite halves (`render_pair_image`: a target and
a distractor of another shape and colour, both boxes known), runs the CLIP attribution of
`prompting.api` (block -2, the authors' post-processing defaults) once with a query naming the
target and once naming the distractor, and scores each map Psi float[G, G] by the fraction of its
mass inside a box,

  mass(Psi, box) = sum_ij Psi_ij w_ij / sum_ij Psi_ij,   w_ij = |cell_ij & box| / |cell_ij|

(w weighs each grid cell by how much of it the pixel box covers, so a constant map scores exactly
the box's area fraction: the chance level). Two query templates (`QUERIES`): the shape alone, and
colour + shape. `<workdir>/results.json` holds, per template and for the API map and its two parts
(Psi_cls min-max normalised; the inverted complementary Psi_comp), the mean mass inside the
target's and the distractor's boxes under both queries, how often the named box gets more mass than
the other, and the boxes' mean area fractions. The trained CLIP is saved in `<workdir>/clip` (a
`converted` checkpoint) and reused when the command runs again with the same training settings.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import os
import sys
import time
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from vlm_jax import converted, paths
from vlm_jax.data import synthetic
from vlm_jax.data.tokenizer import EOC_TOKEN, EOS_ID, MEDIA_TOKEN, PAD_ID, synthetic_tokenizer
from vlm_jax.data.tokenizer import synthetic_vocab_size
from vlm_jax.prompting import api, clip_model, maps

_LOG = logging.getLogger(__name__)
RESULTS_FILE = "results.json"
CLIP_DIR = "clip"
# The query names the shape only (the strict test: shape is not a local feature of a patch), or the
# shape and its colour (a referring expression; colour is local).
QUERIES = {"shape": "What colour is the {shape}?", "colour_shape": "What is the {colour} {shape}?"}


@dataclasses.dataclass(frozen=True)
class Settings:
  """Model shapes, training and evaluation sizes (`DEFAULT`, `TOY`)."""

  image_size: int = 96
  patch_size: int = 16
  width: int = 64
  depth: int = 3
  heads: int = 4
  text_width: int = 64
  text_depth: int = 2
  text_len: int = 16
  projection_dim: int = 64
  steps: int = 1500
  batch_size: int = 64
  learning_rate: float = 2e-3
  eval_images: int = 200
  layer: int = -2
  enhance_coe: float = 5.0
  kernel_size: int = 3
  seed: int = 0


DEFAULT = Settings()
TOY = Settings(image_size=32, patch_size=8, width=32, depth=2, heads=2, text_width=32, text_depth=1,
               projection_dim=32, steps=3, batch_size=8, eval_images=8)


def model_kwargs(s: Settings) -> dict[str, Any]:
  return dict(
    vision=dict(image_size=s.image_size, patch_size=s.patch_size, width=s.width, depth=s.depth,
                heads=s.heads, act="quick_gelu"),
    text=dict(vocab_size=synthetic_vocab_size(), width=s.text_width, depth=s.text_depth,
              heads=s.heads, max_len=s.text_len, act="quick_gelu", eos_token_id=EOS_ID),
    projection_dim=s.projection_dim)


# -------------------------------------------------------------------------------------------------
# Box arithmetic.


def box_weights(box: tuple[float, float, float, float], grid: int, image_size: int) -> np.ndarray:
  """w float64[G, G]: the fraction of each grid cell that the pixel box (x0, y0, x1, y1), x1/y1
  exclusive, covers. Cell (i, j) spans rows [i c, (i + 1) c) and columns [j c, (j + 1) c),
  c = image_size / G."""
  c = image_size / grid
  edges = np.arange(grid + 1) * c

  def overlap(a, b):  # per cell, the covered length of [a, b) / c
    return np.clip(np.minimum(edges[1:], b) - np.maximum(edges[:-1], a), 0.0, None) / c

  x0, y0, x1, y1 = box
  return np.outer(overlap(y0, y1), overlap(x0, x1))


def box_mass_fraction(psi: np.ndarray, box: tuple[float, float, float, float],
                      image_size: int) -> float:
  """The fraction of a non-negative map's mass inside a pixel box.  psi: float[G, G] over the
  image_size x image_size image. A map with no mass scores the box's area fraction (as a constant
  map does: nothing is preferred)."""
  psi = np.asarray(psi, np.float64)
  if psi.ndim != 2 or psi.shape[0] != psi.shape[1]:
    raise ValueError(f"psi must be a square map float[G, G], got shape {psi.shape}")
  if np.any(psi < 0):
    raise ValueError("psi must be non-negative (post-processed maps are in [0, 1])")
  total = psi.sum()
  if total <= 0:
    return box_area_fraction(box, image_size)
  return float((psi * box_weights(box, psi.shape[0], image_size)).sum() / total)


def box_area_fraction(box: tuple[float, float, float, float], image_size: int) -> float:
  """|box & image| / |image|: the mass fraction of a constant map (the chance level)."""
  x0, y0, x1, y1 = (float(np.clip(v, 0, image_size)) for v in box)
  return max(0.0, x1 - x0) * max(0.0, y1 - y0) / image_size**2


# -------------------------------------------------------------------------------------------------
# Data.


def tokenize(tok, texts: list[str], length: int) -> np.ndarray:
  """Texts -> int32[B, length]: the words, then EOS (the text tower pools there), then PAD."""
  out = np.full((len(texts), length), PAD_ID, np.int32)
  for i, text in enumerate(texts):
    ids = tok.encode(text, add_special_tokens=False).ids + [EOS_ID]
    if len(ids) > length:
      raise ValueError(f"{text!r} is {len(ids)} tokens with EOS; text_len is {length}")
    out[i, :len(ids)] = ids
  return out


def caption_batch(source: synthetic.SyntheticSource, tok, step: int, s: Settings):
  """Training batch `step`: (uint8[B, S, S, 3], int32[B, text_len]) of single-shape images and
  their captions, records step * B ... (step + 1) * B - 1 of the pairs source."""
  images, texts = [], []
  for i in range(step * s.batch_size, (step + 1) * s.batch_size):
    rec = source[i % len(source)]
    images.append(rec["images"][0])
    texts.append(rec["text"].replace(MEDIA_TOKEN, "").split(EOC_TOKEN)[0].strip())
  return np.stack(images), tokenize(tok, texts, s.text_len)


def pair_examples(s: Settings) -> list[dict]:
  """The held-out images: a target and a distractor of different shapes and colours each."""
  out = []
  for i in range(s.eval_images):
    rng = np.random.default_rng([s.seed, 7, i])  # 7: apart from the corpus's (seed, split, kind, i)
    shapes = rng.choice(len(synthetic.SHAPES), 2, replace=False)
    colours = rng.choice(len(synthetic.COLOURS), 2, replace=False)
    target = (synthetic.SHAPES[shapes[0]], synthetic.COLOURS[colours[0]])
    distractor = (synthetic.SHAPES[shapes[1]], synthetic.COLOURS[colours[1]])
    image, tbox, dbox = synthetic.render_pair_image(rng, s.image_size, target, distractor)
    out.append(dict(image=image, target=target, distractor=distractor, target_box=tbox,
                    distractor_box=dbox))
  return out


# -------------------------------------------------------------------------------------------------
# Training.


def contrastive_loss(image_embeds: jax.Array, text_embeds: jax.Array, log_scale: jax.Array):
  """CLIP's symmetric InfoNCE over a batch of matching pairs.  embeds: float[B, E] (unnormalised)."""
  i = image_embeds / jnp.linalg.norm(image_embeds, axis=-1, keepdims=True)
  t = text_embeds / jnp.linalg.norm(text_embeds, axis=-1, keepdims=True)
  logits = jnp.minimum(jnp.exp(log_scale), 100.0) * i @ t.T
  labels = jnp.arange(logits.shape[0])
  loss = (optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
          + optax.softmax_cross_entropy_with_integer_labels(logits.T, labels).mean()) / 2
  accuracy = (jnp.argmax(logits, -1) == labels).mean()
  return loss, accuracy


def train(s: Settings) -> tuple[clip_model.Model, Any, dict]:
  """Trains the tiny CLIP; returns (model, params, {"loss", "accuracy": last 10% of steps})."""
  model = clip_model.Model(**model_kwargs(s))
  tok = synthetic_tokenizer()
  source = synthetic.SyntheticSource("pairs", split="train", image_size=s.image_size,
                                     seed=s.seed, num_records=max(1, s.steps * s.batch_size))
  images, ids = caption_batch(source, tok, 0, s)
  variables = {"clip": nn.unbox(model.init(jax.random.key(s.seed), images, ids)["params"]),
               "log_scale": jnp.asarray(math.log(1 / 0.07), jnp.float32)}
  schedule = optax.warmup_cosine_decay_schedule(0.0, s.learning_rate, max(1, s.steps // 20),
                                                s.steps)
  opt = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(schedule, weight_decay=0.05))
  opt_state = opt.init(variables)

  @jax.jit
  def step(variables, opt_state, images, ids):
    def loss_fn(v):
      img, txt, _ = model.apply({"params": v["clip"]}, images, ids)
      return contrastive_loss(img, txt, v["log_scale"])

    (loss, acc), grads = jax.value_and_grad(loss_fn, has_aux=True)(variables)
    updates, opt_state = opt.update(grads, opt_state, variables)
    return optax.apply_updates(variables, updates), opt_state, loss, acc

  tail, start = [], time.time()
  for i in range(s.steps):
    images, ids = caption_batch(source, tok, i, s)
    variables, opt_state, loss, acc = step(variables, opt_state, images, ids)
    if i >= s.steps - max(1, s.steps // 10):
      tail.append((float(loss), float(acc)))
    if (i + 1) % max(1, s.steps // 6) == 0 or i + 1 == s.steps:
      _LOG.info("[api_check] step %d/%d loss %.3f in-batch accuracy %.2f (%.0f s)", i + 1,
                   s.steps, float(loss), float(acc), time.time() - start)
  loss, acc = np.mean(tail, axis=0)
  return model, variables["clip"], {"loss": float(loss), "accuracy": float(acc)}


# -------------------------------------------------------------------------------------------------
# Evaluation.


def attribution_maps(model, params, examples: list[dict], which: str, query: str, s: Settings,
                     batch: int = 50) -> dict[str, np.ndarray]:
  """{"api", "cls", "comp"}: float32[N, G, G] maps for the `query` template filled with each
  example's `which` ("target" or "distractor") shape and colour. api: the authors' post-processing
  (enhance, box filter, soft-OR); cls: minmax(Psi_cls); comp: inverted_minmax(Psi_comp)."""
  tok = synthetic_tokenizer()
  out = {"api": [], "cls": [], "comp": []}
  for start in range(0, len(examples), batch):
    part = examples[start:start + batch]
    images = np.stack([e["image"] for e in part])
    ids = tokenize(tok, [query.format(shape=e[which][0], colour=e[which][1]) for e in part],
                   s.text_len)
    r = api.clip_attribution(model, params, images, ids, layers=s.layer,
                             enhance_coe=s.enhance_coe, kernel_size=s.kernel_size)
    out["api"].append(np.asarray(r["map"]))
    out["cls"].append(np.asarray(maps.minmax(r["cls"])))
    out["comp"].append(np.asarray(maps.inverted_minmax(r["comp"])))
  return {k: np.concatenate(v) for k, v in out.items()}


def evaluate(model, params, s: Settings) -> dict:
  """Mean box masses of each map under queries naming the target and the distractor, per query
  template; `named_box_wins`: the fraction of images whose map puts more mass in the named shape's
  box than in the other shape's."""
  examples = pair_examples(s)
  boxes = ("target", "distractor")
  area = {b: float(np.mean([box_area_fraction(e[f"{b}_box"], s.image_size) for e in examples]))
          for b in boxes}
  out = {"num_images": len(examples), "area_fraction": area, "queries": {}}
  for kind, query in QUERIES.items():
    per_kind = out["queries"][kind] = {"query": query}
    for which in boxes:
      other = boxes[1 - boxes.index(which)]
      for name, psi in attribution_maps(model, params, examples, which, query, s).items():
        mass = {b: np.array([box_mass_fraction(m, e[f"{b}_box"], s.image_size)
                             for m, e in zip(psi, examples)]) for b in boxes}
        per_kind.setdefault(name, {})[f"query_{which}"] = {
          **{f"mass_in_{b}_box": float(v.mean()) for b, v in mass.items()},
          "named_box_wins": float((mass[which] > mass[other]).mean())}
  return out


def _settings_json(s: Settings) -> dict:
  return dataclasses.asdict(s)


def load_or_train(workdir: str, s: Settings) -> tuple[clip_model.Model, Any, dict, str]:
  """The CLIP saved in `<workdir>/clip` by an earlier run with the same settings, else a new one."""
  directory = os.path.join(workdir, CLIP_DIR)
  training = {k: v for k, v in _settings_json(s).items()
              if k not in ("eval_images", "layer", "enhance_coe", "kernel_size")}
  if os.path.exists(os.path.join(directory, converted.MODEL_JSON)):
    saved = converted.read_model_config(directory)
    if saved.get("training") != training:
      raise SystemExit(f"{directory} was trained with {saved.get('training')}, not {training}; "
                       "use another --workdir")
    _LOG.info("[api_check] reusing the CLIP in %s", directory)
    model = clip_model.Model(**saved["model"])
    return model, converted.load_converted(directory), saved["train_metrics"], "reused"
  model, params, metrics = train(s)
  converted.save_converted(directory, "clip", model_kwargs(s), params, training=training,
                           train_metrics=metrics, source="vlm_jax.prompting.synthetic_check")
  return model, params, metrics, "trained"


def run(workdir: str, s: Settings) -> dict:
  workdir = paths.resolve(workdir)
  os.makedirs(workdir, exist_ok=True)
  start = time.time()
  model, params, metrics, how = load_or_train(workdir, s)
  results = {"settings": _settings_json(s), "clip": how, "train": metrics,
             **evaluate(model, params, s), "seconds": round(time.time() - start, 1),
             "device": jax.devices()[0].device_kind}
  with open(os.path.join(workdir, RESULTS_FILE), "w") as f:
    json.dump(results, f, indent=2)
  return results


def summary(r: dict) -> str:
  parts = []
  for kind, q in r["queries"].items():
    m = q["api"]
    parts.append(f"{kind} query: {m['query_target']['mass_in_target_box']:.3f} naming the target, "
                 f"{m['query_distractor']['mass_in_target_box']:.3f} naming the distractor")
  return (f"API map mass in the target's box, {'; '.join(parts)}; box area "
          f"{r['area_fraction']['target']:.3f} (chance)")


def main(argv=None) -> None:
  # Our progress lines only: importing jax / orbax has given the root logger absl's handler, and
  # orbax's INFO lines would drown them.
  if not _LOG.handlers:
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(message)s"))
    _LOG.addHandler(handler)
  _LOG.setLevel(logging.INFO)
  _LOG.propagate = False
  p = argparse.ArgumentParser(prog="python -m vlm_jax.prompting.synthetic_check",
                              description=__doc__.split("\n")[0])
  p.add_argument("--workdir", required=True, help="gets results.json and the trained clip/")
  p.add_argument("--toy", action="store_true", help="toy sizes and 3 steps (tests)")
  p.add_argument("--steps", type=int, default=None, help="training steps")
  p.add_argument("--eval-images", "--eval_images", dest="eval_images", type=int, default=None)
  p.add_argument("--layer", type=int, default=None, help="CLIP block L' (negative from the end)")
  args = p.parse_args(argv)
  s = TOY if args.toy else DEFAULT
  s = dataclasses.replace(s, **{k: v for k, v in (("steps", args.steps),
                                                  ("eval_images", args.eval_images),
                                                  ("layer", args.layer)) if v is not None})
  r = run(args.workdir, s)
  print(summary(r))


if __name__ == "__main__":
  main(sys.argv[1:])
