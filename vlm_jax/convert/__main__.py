r"""Command line conversion: PyTorch checkpoints -> a vlm_jax checkpoint directory, and back to HF.

  python -m vlm_jax.convert lm PATH --out DIR                  # HF causal LM (llama, mistral, gpt_neox, mpt)
  python -m vlm_jax.convert clip PATH --out DIR                # HF CLIPVisionModel / CLIPModel
  python -m vlm_jax.convert llava PATH [--vision CLIP] --out DIR
  python -m vlm_jax.convert inf-llava PATH --vision CLIP --out DIR   # WeihuangLin/INF-LLaVA-sft
  python -m vlm_jax.convert openflamingo --checkpoint checkpoint.pt --lm LM_DIR --vision CLIP \
      --cross-attn-every-n-layers 1 --out DIR
  python -m vlm_jax.convert to-hf DIR --out HF_DIR             # back to transformers (LMs, LLaVA)

`--dtype bfloat16` converts and stores the params in bfloat16 (cast one tensor at a time; frozen towers
need no more, and training upcasts what it trains), so a 7B LM takes 14 GB instead of 28 GB.

DIR holds `model.json` (model name + kwargs) and `params/` (orbax); train or evaluate from it with
`python -m vlm_jax.main --config=... --config.init.checkpoint=DIR`. With `--mesh fsdp=-1` each param is
placed on its shards as it is read (run the same command on every host of a pod) and saved shard by shard.
"""

import argparse
import logging
import sys
import time


from vlm_jax import converted, paths, sharding
from vlm_jax.convert import hf, inf_llava, llava, openflamingo
from vlm_jax.models import build_model
from vlm_jax.param_paths import flatten


_PATH_ARGS = ("path", "checkpoint", "lm", "vision", "vision_weights", "out")


def _mesh(spec: str | None):
  if not spec:
    return None
  try:
    axes = {k.strip(): int(v) for k, v in (item.split("=") for item in spec.split(","))}
  except ValueError as e:
    raise SystemExit(f"--mesh {spec!r}: expected e.g. 'data=1,fsdp=-1,tensor=1'") from e
  return sharding.make_mesh(axes)


def _model_name(model) -> str:
  return type(model).__module__.rsplit(".", 1)[-1]


def _load(args, mesh):
  kw = dict(mesh=mesh, param_dtype=None if args.dtype == "float32" else args.dtype)
  if args.command == "lm":
    return hf.load_hf_lm(args.path, **kw)
  if args.command == "clip":
    return hf.load_hf_clip_vision(args.path, **kw)
  if args.command == "llava":
    return llava.load_hf_llava(args.path, vision=args.vision, **kw)
  if args.command == "inf-llava":
    return inf_llava.load_inf_llava(args.path, vision=args.vision, **kw)
  return openflamingo.load_openflamingo(
    args.checkpoint, lm=args.lm, vision=args.vision, vision_weights=args.vision_weights,
    cross_attn_every_n_layers=args.cross_attn_every_n_layers, vision_tokens=args.vision_tokens,
    **kw)


def _to_hf(args) -> None:
  config = converted.read_model_config(args.path)
  model = build_model(config["model_name"], config["model"])
  params = converted.load_converted(args.path)
  name = config["model_name"]
  if name == "llava":
    llava.save_hf_llava(model, params, args.out)
  elif name in {m.__name__.rsplit(".", 1)[-1] for _, m in hf.FAMILIES.values()}:
    hf.save_hf_lm(model, params, args.out)
  else:
    raise SystemExit(f"{args.path}: no HF export for model {name!r} (supported: decoder LMs, llava)")


def parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog="python -m vlm_jax.convert", description=__doc__.split("\n")[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
  sub = p.add_subparsers(dest="command", required=True)
  for name, help_ in (("lm", "HF causal-LM directory"), ("clip", "HF CLIP directory"),
                      ("llava", "LLaVA-1.5 directory (liuhaotian or llava-hf layout)"),
                      ("inf-llava", "INF-LLaVA directory (liuhaotian layout + model.spatial_embed)"),
                      ("to-hf", "a directory written by this tool")):
    s = sub.add_parser(name, help=help_)
    s.add_argument("path", help=help_)
  sub.choices["llava"].add_argument("--vision", help="HF CLIP directory when the LLaVA checkpoint "
                                    "has no vision tower weights (liuhaotian releases)")
  sub.choices["inf-llava"].add_argument("--vision", help="HF CLIP directory: the tower's config, "
                                        "and its weights when the checkpoint has none")
  of = sub.add_parser("openflamingo", help="OpenFlamingo checkpoint")
  of.add_argument("--checkpoint", required=True,
                  help="checkpoint.pt, checkpoint_N.pt or a full state dict (.pt / .safetensors)")
  of.add_argument("--lm", required=True, help="HF LM directory (config, tokenizer, base weights)")
  of.add_argument("--vision", required=True, help="HF CLIP directory or open_clip model-config .json")
  of.add_argument("--vision-weights", help="open_clip state dict for a .json --vision")
  of.add_argument("--cross-attn-every-n-layers", type=int, required=True)
  of.add_argument("--vision-tokens", default="pre_ln_post", choices=("pre_ln_post", "post_ln_post"))
  for s in sub.choices.values():
    s.add_argument("--out", required=True, help="output directory")
    if s is not sub.choices["to-hf"]:
      s.add_argument("--mesh", help="place params on a mesh while loading, e.g. 'fsdp=-1'")
      s.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"),
                     help="dtype the params are converted to and stored in (cast tensor by tensor: "
                          "bfloat16 halves a 7B LM to 14 GB, on disk and at peak)")
  return p


def main(argv=None) -> None:
  args = parser().parse_args(argv)
  logging.basicConfig(level=logging.INFO, format="%(message)s")
  for name in _PATH_ARGS:  # absolute from here on (orbax writes only absolute paths); URLs kept
    if getattr(args, name, None) is not None:
      setattr(args, name, paths.resolve(getattr(args, name)))
      logging.info("%s: %s", name, getattr(args, name))
  t0 = time.perf_counter()
  if args.command == "to-hf":
    _to_hf(args)
    logging.info("wrote %s (%.1fs)", args.out, time.perf_counter() - t0)
    return
  model, params = _load(args, _mesh(args.mesh))
  source = {k: getattr(args, k) for k in ("path", "checkpoint", "lm", "vision", "vision_weights",
                                           "cross_attn_every_n_layers", "vision_tokens")
            if getattr(args, k, None) is not None}
  converted.save_converted(args.out, _model_name(model), hf.model_kwargs(model), params,
                           source={"command": args.command, **source})
  flat = flatten(params).values()
  logging.info("wrote %s: %s model, %.1fM params, %.2f GB in %s (%.1fs)", args.out,
               _model_name(model), sum(x.size for x in flat) / 1e6,
               sum(x.nbytes for x in flat) / 1e9, args.dtype, time.perf_counter() - t0)


if __name__ == "__main__":
  sys.exit(main())
