r"""Build a TFDS ArrayRecord dataset of finished records from a local corpus.

  python -m vlm_jax.data.tfds.build --source mmc4 \
      --paths 'train=/data/mmc4/*.jsonl' --paths 'eval=/data/mmc4/val_0.jsonl' \
      --set image_dir=/data/mmc4/images --out /data/tfds --workers 16
  python -m vlm_jax.data.tfds.build --source webdataset --kind pairs \
      --paths 'train=/data/laion/*.tar' --out /data/tfds        # -> /data/tfds/webdataset_pairs
  python -m vlm_jax.data.tfds.build --source llava --paths train=/data/llava_v1_5_mix665k.json \
      --set image_dir=/data/llava_images --out /data/tfds

--paths SPLIT=GLOB (repeatable; a bare GLOB is the train split) becomes config.data.paths (for
llava config.data.path: one file per split); --set KEY=VALUE sets any other config.data field the
reader takes (JSON values: sim_threshold=0.24, min_image_bytes=11000, max_images=6,
matching=hungarian, single_image_keep_prob=0.5, on_bad_image=drop_image, seed=0, image_dir=...).

Train from it with config.data.source="tfds" and config.data.tfds_dir=OUT/NAME/VERSION (or
tfds_name=NAME, tfds_data_dir=OUT); see vlm_jax.data.tfds.source.
"""

from __future__ import annotations

import argparse
import collections
import json
import logging
import re
import sys

import tqdm

from vlm_jax import paths as paths_lib
from vlm_jax.data.tfds import builder as builder_lib
from vlm_jax.data.tfds import schema


def _paths(items: list[str]) -> dict[str, list[str]]:
  out: dict[str, list[str]] = {}
  for item in items:
    match = re.fullmatch(r"([A-Za-z0-9_]+)=(.+)", item)
    split, pattern = match.groups() if match else ("train", item)
    out.setdefault(split, []).append(pattern)
  return out


def _value(text: str):
  try:
    return json.loads(text)
  except ValueError:
    return text


def data_config(args: argparse.Namespace) -> dict:
  """The config.data mapping the reader gets, from --paths, --kind and --set."""
  config = {}
  for item in args.set or []:
    key, sep, value = item.partition("=")
    if not sep or not key:
      raise SystemExit(f"--set {item!r}: expected KEY=VALUE")
    config[key] = _value(value)
  paths = _paths(args.paths)
  if args.source == "llava":
    many = {s: p for s, p in paths.items() if len(p) != 1}
    if many:
      raise SystemExit(f"--paths: llava takes one JSON file per split, got {many}")
    config["path"] = {s: p[0] for s, p in paths.items()}
  else:
    config["paths"] = paths
  if args.kind:
    config["kind"] = args.kind
  # Local paths absolute (logged), URLs kept: the build's worker processes must find the same files.
  for key in config:
    if paths_lib.is_path_key(key):
      config[key] = paths_lib.resolve_all(config[key])
      logging.info("path: %s = %s", key, config[key])
  return config


def parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog="python -m vlm_jax.data.tfds.build",
                              description=__doc__.split("\n")[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
  p.add_argument("--source", required=True, choices=builder_lib.SOURCES)
  p.add_argument("--paths", required=True, action="append", metavar="[SPLIT=]GLOB")
  p.add_argument("--out", required=True,
                 help="TFDS data dir (the dataset goes to OUT/NAME/VERSION)")
  p.add_argument("--kind", choices=("pairs", "interleaved"), help="webdataset sample kind")
  p.add_argument("--set", action="append", metavar="KEY=VALUE", help="another config.data field")
  p.add_argument("--name", help="dataset name (default: the source, webdataset_<kind> for tars)")
  p.add_argument("--version", default=schema.VERSION)
  p.add_argument("--shard_size", type=int, default=builder_lib.DEFAULT_SHARD_SIZE,
                 help="source records per output shard")
  p.add_argument("--workers", type=int, default=1, help="processes building records")
  p.add_argument("--overwrite", action="store_true", help="replace an existing dataset version")
  return p


class _Bar:
  """tqdm over all splits' source records: rate and ETA from tqdm, written/skipped as postfix."""

  def __init__(self, total: int, name: str):
    self.bar = tqdm.tqdm(total=total, desc=name, unit="rec", mininterval=1.0, file=sys.stderr)
    self.written, self.skipped = 0, collections.Counter()

  def __call__(self, split: str, written: int, skipped) -> None:
    del split
    self.written += written
    self.skipped.update(skipped)
    self.bar.set_postfix_str(
      f"written={self.written} skipped=" + (",".join(f"{k}:{v}" for k, v in
                                                      sorted(self.skipped.items())) or "0"),
      refresh=False)
    self.bar.update(written + sum(skipped.values()))

  def close(self):
    self.bar.close()


def main(argv: list[str] | None = None) -> int:
  args = parser().parse_args(argv)
  logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
  builder = builder_lib.RecordsBuilder(
    args.source, data_config(args), paths_lib.resolve(args.out), name=args.name, version=args.version,
    shard_size=args.shard_size, workers=args.workers)
  sizes = builder.source_sizes()
  logging.info("tfds build %s -> %s: %s source records, %s records", args.source,
               builder.dataset_dir, sizes, builder.kind)
  bar = _Bar(sum(sizes.values()), builder.name)
  try:
    metadata = builder.build(overwrite=args.overwrite, progress=bar)
  finally:
    bar.close()
  print(json.dumps({"dataset_dir": builder.dataset_dir, "kind": builder.kind,
                    "splits": {s: {k: c[k] for k in ("source_records", "written", "skipped")}
                               for s, c in metadata["splits"].items()}}))
  return 0


if __name__ == "__main__":
  sys.exit(main())
