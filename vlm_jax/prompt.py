r"""Attention Prompting on Image from the command line: query-guided heatmaps from an auxiliary CLIP
or LLaVA, multiplied into the images (`vlm_jax.prompting`).

  python -m vlm_jax.prompt --model clip --checkpoint hf/clip-vit-large-patch14-336 \
    --image cat.jpg dog.jpg --query "what is on the mat?" --out out/ --preset mmvet
  python -m vlm_jax.prompt --model llava --checkpoint hf/llava-1.5-7b-hf --layer 20 \
    --image cat.jpg --query "what is on the mat?" --out out/

--checkpoint is an HF directory as `save_pretrained` writes it: a `CLIPModel` (both towers and the
projections) for --model clip, a LLaVA-1.5 checkpoint for --model llava (llava-hf, or the original
layout with --vision CLIP_DIR); its `tokenizer.json` tokenizes the query. One --query for all images,
or one per image. Settings: --preset mmvet (enhance 1, kernel 3, bicubic, gray 0) or llava_wild
(10, 7, lanczos, 200); without one the authors' defaults (5, 3, lanczos; gray 0 for CLIP, 200 for
LLaVA); any flag given explicitly wins over the preset. CLIP's block defaults to -2 (22 of
ViT-L/14@336's 24), LLaVA's decoder layer to 20 (the authors', for the 40-layer 13B).

For each image (file stem S) --out gets S_api.png (the prompted image, original size), S_heatmap.png
(the mask as a heat overlay), S_map.npy (the token-grid map float32[G, G] in [0, 1] that was
resized), and prompt.json lists them with the settings (and, for LLaVA, the greedy answer whose
attention made the map).
"""

import argparse
import json
import logging
import os
import sys

_PRESET_FIELDS = ("enhance_coe", "kernel_size", "interpolation", "gray")
SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. The assistant "
          "gives helpful, detailed, and polite answers to the user's questions.")


def parser() -> argparse.ArgumentParser:
  from vlm_jax.prompting import maps  # pylint: disable=g-import-not-at-top

  p = argparse.ArgumentParser(prog="python -m vlm_jax.prompt", description=__doc__.split("\n")[0])
  p.add_argument("--model", required=True, choices=("clip", "llava"), help="auxiliary model")
  p.add_argument("--checkpoint", required=True, help="HF CLIPModel / LLaVA-1.5 directory")
  p.add_argument("--vision", default=None, help="HF CLIP directory (original LLaVA layout only)")
  p.add_argument("--image", required=True, nargs="+", help="image files")
  p.add_argument("--query", required=True, nargs="+", help="one query, or one per image")
  p.add_argument("--out", required=True, help="output directory")
  p.add_argument("--preset", choices=("mmvet", "llava_wild"), default=None)
  p.add_argument("--layer", type=int, nargs="+", default=None,
                 help="CLIP block(s) L' (summed) / LLaVA decoder layer; negative counts from the end")
  p.add_argument("--enhance-coe", "--enhance_coe", dest="enhance_coe", type=float, default=None)
  p.add_argument("--kernel-size", "--kernel_size", dest="kernel_size", type=int, default=None)
  p.add_argument("--interpolation", choices=sorted(maps.PIL_FILTERS), default=None)
  p.add_argument("--gray", type=float, default=None, help="background level, 0 = multiplication")
  p.add_argument("--floor", type=float, default=0.0, help="least mask value (0 = reference)")
  p.add_argument("--geometry", choices=maps.GEOMETRIES, default="reference",
                 help="reference: map stretched over the image; aligned: through the crop/pad box")
  p.add_argument("--max-new-tokens", "--max_new_tokens", dest="max_new_tokens", type=int,
                 default=20, help="LLaVA: answer tokens whose attention is averaged")
  p.add_argument("--batch-size", "--batch_size", dest="batch_size", type=int, default=8)
  return p


def settings(args) -> dict:
  """Preset (or defaults), then explicit flags."""
  from vlm_jax.prompting import api  # pylint: disable=g-import-not-at-top

  base = api.PRESETS[args.preset] if args.preset else api.DEFAULTS[args.model]
  out = {f: getattr(args, f) if getattr(args, f) is not None else getattr(base, f)
         for f in _PRESET_FIELDS}
  layers = args.layer if args.layer is not None else [api.DEFAULT_LAYERS[args.model]]
  if args.model == "llava" and len(layers) != 1:
    raise SystemExit("--layer: LLaVA attribution reads one decoder layer")
  return {**out, "layers": layers, "floor": args.floor, "geometry": args.geometry}


def _tokenizer(checkpoint: str):
  from vlm_jax.data.tokenizer import load_tokenizer  # pylint: disable=g-import-not-at-top

  if not os.path.isfile(os.path.join(checkpoint, "tokenizer.json")):
    raise SystemExit(f"--checkpoint {checkpoint}: no tokenizer.json (save the processor or "
                     "tokenizer there too: processor.save_pretrained(DIR))")
  tok = load_tokenizer(checkpoint)
  tok.no_truncation()
  tok.no_padding()
  return tok


def _token_id(tok, token: str, checkpoint: str) -> int:
  i = tok.token_to_id(token)
  if i is None:
    raise SystemExit(f"--checkpoint {checkpoint}: tokenizer.json has no {token!r} token")
  return int(i)


def clip_ids(tok, model, queries, checkpoint: str):
  """Queries -> int32[B, max_len]: BOS q EOS as the tokenizer's post-processor writes them, cut to
  the context keeping the EOS (open_clip's truncation), padded with 0 after it."""
  import numpy as np  # pylint: disable=g-import-not-at-top

  text = dict(model.text)
  ctx, eos = text["max_len"], text["eos_token_id"]
  if eos == 2:  # legacy configs: the EOS is the largest id, CLIP's <|endoftext|>
    eos = _token_id(tok, "<|endoftext|>", checkpoint)
  out = np.zeros((len(queries), ctx), np.int32)
  for i, q in enumerate(queries):
    ids = tok.encode(q, add_special_tokens=True).ids
    if not ids or ids[-1] != eos:
      raise SystemExit(f"--checkpoint {checkpoint}: tokenizer.json does not end queries with the "
                       f"EOS token {eos} (no CLIP post-processor?)")
    ids = ids if len(ids) <= ctx else ids[:ctx - 1] + [eos]
    out[i, :len(ids)] = ids
  return out


def llava_ids(tok, model, queries, checkpoint: str):
  """vicuna_v1 prompts "<s>{system} USER: <image>\\n{q} ASSISTANT:", each piece tokenized on its own
  (as `data.llava.LlavaTransform`), left-padded -> (ids, mask) int32[B, T]."""
  import numpy as np  # pylint: disable=g-import-not-at-top

  bos = _token_id(tok, "<s>", checkpoint)
  rows = []
  for q in queries:
    rows.append([bos] + tok.encode(f"{SYSTEM} USER: ", add_special_tokens=False).ids
                + [model.image_token_id] * model.num_image_tokens
                + tok.encode(f"\n{q} ASSISTANT:", add_special_tokens=False).ids)
  t = max(len(r) for r in rows)
  ids, mask = np.zeros((len(rows), t), np.int32), np.zeros((len(rows), t), np.int32)
  for i, r in enumerate(rows):
    ids[i, t - len(r):], mask[i, t - len(r):] = r, 1
  return ids, mask


def _load(args):
  """(model, params) from --checkpoint; a checkpoint of the wrong kind fails naming the flag."""
  from vlm_jax.convert import load_hf_llava  # pylint: disable=g-import-not-at-top
  from vlm_jax.prompting import api  # pylint: disable=g-import-not-at-top
  from vlm_jax.prompting.clip_model import load_hf_clip  # pylint: disable=g-import-not-at-top

  try:
    if args.model == "clip":
      return load_hf_clip(args.checkpoint)
    model, params = load_hf_llava(args.checkpoint, vision=args.vision)
    api.check_llava(model, None)
    return model, params
  except (FileNotFoundError, KeyError, ValueError, TypeError, NotImplementedError) as e:
    raise SystemExit(f"--checkpoint {args.checkpoint} (--model {args.model}): {e}") from None


def _stems(images: list[str]) -> list[str]:
  seen, out = {}, []
  for path in images:
    stem = os.path.splitext(os.path.basename(path))[0]
    n = seen.get(stem, 0)
    seen[stem] = n + 1
    out.append(stem if n == 0 else f"{stem}_{n}")
  return out


def run(args) -> list[dict]:
  """Everything after parsing; returns the records written to prompt.json."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  from PIL import Image  # pylint: disable=g-import-not-at-top
  from tqdm import tqdm  # pylint: disable=g-import-not-at-top

  from vlm_jax.data.images import clip_preprocess, decode_image  # pylint: disable=g-import-not-at-top
  from vlm_jax.data.llava import preprocess_image  # pylint: disable=g-import-not-at-top
  from vlm_jax.data.records import BadRecord  # pylint: disable=g-import-not-at-top
  from vlm_jax.prompting import api, maps  # pylint: disable=g-import-not-at-top

  cfg = settings(args)
  if len(args.query) not in (1, len(args.image)):
    raise SystemExit(f"--query: give one query or one per --image ({len(args.image)}), got "
                     f"{len(args.query)}")
  queries = args.query * len(args.image) if len(args.query) == 1 else args.query
  if not os.path.isdir(args.checkpoint):
    raise SystemExit(f"--checkpoint {args.checkpoint}: no such directory")
  if args.vision is not None and args.model != "llava":
    raise SystemExit("--vision is for --model llava (an original LLaVA checkpoint)")
  rgbs = []
  for path in args.image:
    try:
      rgbs.append(decode_image(path, max_pixels=None))
    except BadRecord as e:
      raise SystemExit(f"--image {path}: {e}") from None
  tok = _tokenizer(args.checkpoint)
  model, params = _load(args)
  size = model.vision["image_size"]
  if args.model == "llava":
    stop = tok.token_to_id("</s>")
    pad = next((tok.token_to_id(t) for t in ("<pad>", "<unk>") if tok.token_to_id(t) is not None),
               0)
  os.makedirs(args.out, exist_ok=True)
  records, stems = [], _stems(args.image)
  for start in tqdm(range(0, len(rgbs), args.batch_size), desc="prompting", unit="batch",
                    disable=None):
    part = slice(start, start + args.batch_size)
    batch_rgb, batch_q = rgbs[part], queries[part]
    answers = [None] * len(batch_rgb)
    if args.model == "clip":
      pixels = np.stack([clip_preprocess(x, size, normalize=False) for x in batch_rgb])
      out = api.clip_attribution(model, params, pixels, clip_ids(tok, model, batch_q,
                                                                 args.checkpoint),
                                 layers=cfg["layers"], enhance_coe=cfg["enhance_coe"],
                                 kernel_size=cfg["kernel_size"])
      boxes = [maps.crop_box(x.shape[1], x.shape[0], size) for x in batch_rgb]
    else:
      pixels = np.stack([preprocess_image(x, size) for x in batch_rgb])
      ids, mask = llava_ids(tok, model, batch_q, args.checkpoint)
      out = api.llava_attribution(model, params, pixels, ids, mask, layer=cfg["layers"][0],
                                  max_new_tokens=args.max_new_tokens,
                                  stop_token_ids=() if stop is None else (stop,), pad_token_id=pad,
                                  enhance_coe=cfg["enhance_coe"], kernel_size=cfg["kernel_size"])
      tokens = np.asarray(out["tokens"])
      answers = [tok.decode([int(t) for t in row[:n]], skip_special_tokens=True)
                 for row, n in zip(tokens, np.asarray(out["steps"]))]
      boxes = [maps.pad_box(x.shape[1], x.shape[0]) for x in batch_rgb]
    psi = np.asarray(out["map"], np.float32)
    for j, (rgb, box) in enumerate(zip(batch_rgb, boxes)):
      stem = stems[start + j]
      h, w = rgb.shape[:2]
      mask_u8 = maps.mask_for_image(psi[j], w, h, method=cfg["interpolation"],
                                    geometry=cfg["geometry"], box=box)
      prompted = np.asarray(maps.blend(rgb, mask_u8 / 255.0, gray=cfg["gray"],
                                       floor=cfg["floor"]))
      files = {"prompted": f"{stem}_api.png", "heatmap": f"{stem}_heatmap.png",
               "map": f"{stem}_map.npy"}
      Image.fromarray(prompted).save(os.path.join(args.out, files["prompted"]))
      Image.fromarray(maps.overlay(rgb, mask_u8)).save(os.path.join(args.out, files["heatmap"]))
      np.save(os.path.join(args.out, files["map"]), psi[j])
      rec = {"image": args.image[start + j], "query": batch_q[j], "size": [w, h], **files}
      if answers[j] is not None:
        rec["answer"] = answers[j]
      records.append(rec)
  with open(os.path.join(args.out, "prompt.json"), "w") as f:
    json.dump({"model": args.model, "checkpoint": args.checkpoint, "settings": cfg,
               "images": records}, f, indent=2)
  return records


def main(argv=None) -> None:
  from vlm_jax import paths  # pylint: disable=g-import-not-at-top

  logging.basicConfig(level=logging.INFO, format="%(message)s")
  args = parser().parse_args(argv)
  for name in ("checkpoint", "vision", "out"):
    setattr(args, name, paths.resolve(getattr(args, name)))
  args.image = [paths.resolve(p) for p in args.image]
  records = run(args)
  print(f"prompted {len(records)} image(s) -> {args.out}")


if __name__ == "__main__":
  main(sys.argv[1:])
