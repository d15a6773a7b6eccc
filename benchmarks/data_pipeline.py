r"""Input pipeline throughput against the machine's floor: decoding and resizing JPEGs in a bare loop.

  python benchmarks/data_pipeline.py                  # 224 px, 1 and 2 worker processes
  python benchmarks/data_pipeline.py --images 256     # quicker

Writes synthetic web data to a temp dir: LAION-style WebDataset tar shards (one 640x480 JPEG + caption
per sample) and MMC4 jsonl shards (documents of 3 base64 JPEGs and 4 sentences, similarity matrix). Then
measures, in one run:
  bare      decode_image + clip_preprocess(224) over the same JPEG bytes in a plain Python loop, one
            process: the physical floor per core;
  pairs     make_dataset(source="webdataset", kind="pairs") with 1, 2 worker processes and, for
            comparison, 1, 2 threads in the main process (PIL decode/resize release the GIL);
  interleaved make_dataset(source="mmc4"), the same four ways;
each with images leaving the pipeline as float32 (CLIP-normalised) or uint8 (`image_dtype="uint8"`, the
ViT normalises on the device), and reports images/s and examples/s, and each pipeline's images/s per
worker as a fraction of the bare loop (the target is >= 0.85). Writes benchmarks/results/data_pipeline_cpu.json; one-line summary last.
"""

import argparse
import base64
import io
import json
import os
import platform
import sys
import tarfile
import tempfile
import time

import numpy as np
from PIL import Image, ImageDraw

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from vlm_jax.data import images as images_lib  # noqa: E402
from vlm_jax.data.pipeline import make_dataset  # noqa: E402

SIZE = 224


def photo_like_jpeg(rng: np.random.Generator, w: int = 640, h: int = 480) -> bytes:
  """A JPEG with smooth gradients, shapes and mild noise (decodes like a photo, unlike pure noise)."""
  y, x = np.mgrid[0:h, 0:w].astype(np.float32)
  base = np.stack([(x / w) * 255, (y / h) * 255, ((x + y) / (w + h)) * 255], -1)
  base += rng.normal(0, 12, base.shape)
  img = Image.fromarray(np.clip(base, 0, 255).astype(np.uint8))
  draw = ImageDraw.Draw(img)
  for _ in range(6):
    x0, y0 = int(rng.integers(0, w - 60)), int(rng.integers(0, h - 60))
    draw.ellipse([x0, y0, x0 + int(rng.integers(30, 200)), y0 + int(rng.integers(30, 200))],
                 fill=tuple(int(c) for c in rng.integers(0, 256, 3)))
  out = io.BytesIO()
  img.save(out, "JPEG", quality=90)
  return out.getvalue()


def write_data(root: str, jpegs: list[bytes]) -> tuple[list[str], list[str]]:
  tars, shards = [], []
  per_shard = 64
  for s in range(0, len(jpegs), per_shard):
    path = os.path.join(root, f"laion-{s // per_shard:05d}.tar")
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
      for i in range(s, min(s + per_shard, len(jpegs))):
        for name, data in ((f"{i:08d}.jpg", jpegs[i]), (f"{i:08d}.txt", b"a photo of shapes")):
          info = tarfile.TarInfo(name)
          info.size = len(data)
          tar.addfile(info, io.BytesIO(data))
    tars.append(path)
  docs = []
  for d in range(0, len(jpegs) - 2, 3):
    infos = [{"image_name": f"{d + k}.jpg", "matched_text_index": k, "matched_sim": 0.3,
              "image_base64": base64.b64encode(jpegs[d + k]).decode()} for k in range(3)]
    docs.append({"text_list": [f"sentence number {k} about the photo" for k in range(4)],
                 "image_info": infos,
                 "similarity_matrix": [[0.5 if i == k else 0.1 for i in range(4)] for k in range(3)]})
  path = os.path.join(root, "mmc4-00000.jsonl")
  with open(path, "w") as f:
    f.write("\n".join(json.dumps(doc) for doc in docs))
  shards.append(path)
  return tars, shards


def bare_loop(jpegs: list[bytes]) -> float:
  t0 = time.perf_counter()
  for b in jpegs:
    images_lib.clip_preprocess(images_lib.decode_image(b), SIZE)
  return len(jpegs) / (time.perf_counter() - t0)


def pipeline_rate(config: dict, workers: int, images_per_example: int, threads: int = 1) -> dict:
  config = dict(config, num_workers=workers, num_threads=threads, prefetch_buffer_size=16,
                worker_buffer_size=8)
  ds = make_dataset(config, split="train", batch_size=16, process_index=0, process_count=1,
                    repeat=False)
  it = iter(ds)
  first = next(it)  # worker start-up and the first batch are not the steady state
  n, t0 = 0, time.perf_counter()
  for batch in it:
    n += batch["labels"].shape[0]
  dt = time.perf_counter() - t0
  assert first["inputs"]["vision_x"].shape[2] == SIZE
  return {"examples_per_sec": n / dt, "images_per_sec": n * images_per_example / dt,
          "examples": n, "seconds": dt}


def main() -> None:
  ap = argparse.ArgumentParser()
  ap.add_argument("--images", type=int, default=768)
  ap.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results",
                                                "data_pipeline_cpu.json"))
  args = ap.parse_args()
  rng = np.random.default_rng(0)
  jpegs = [photo_like_jpeg(rng) for _ in range(args.images)]
  with tempfile.TemporaryDirectory() as tmp:
    tars, shards = write_data(tmp, jpegs)
    bare = max(bare_loop(jpegs[:128]) for _ in range(2))  # best of two: warm caches
    common = {"tokenizer": "synthetic", "image_size": SIZE, "seed": 0}
    runs = {}
    pairs = {**common, "source": "webdataset", "kind": "pairs", "paths": {"train": tars}}
    docs = {**common, "source": "mmc4", "paths": {"train": shards}, "max_images": 6,
            "max_text_len": 256, "single_image_keep_prob": 1.0}
    for n in (1, 2):  # n worker processes (1 thread each), then n threads in the main process
      for dt in ("float32", "uint8"):
        p, d = dict(pairs, image_dtype=dt), dict(docs, image_dtype=dt)
        runs[f"pairs_{dt}_{n}proc"] = pipeline_rate(p, n, 1)
        runs[f"interleaved_{dt}_{n}proc"] = pipeline_rate(d, n, 3)
        runs[f"pairs_{dt}_{n}thread"] = pipeline_rate(p, 0, 1, threads=n)
        runs[f"interleaved_{dt}_{n}thread"] = pipeline_rate(d, 0, 3, threads=n)
  for name, r in runs.items():
    n = int(name.split("_")[-1][0])
    r["images_per_sec_per_worker_over_bare"] = r["images_per_sec"] / n / bare
  result = {"benchmark": "data_pipeline", "image_size": SIZE, "jpeg": "640x480 q90",
            "bare_loop_images_per_sec": bare, "runs": runs,
            "machine": {"platform": "cpu", "cpu_count": os.cpu_count(), "host": platform.node(),
                        "python": platform.python_version()}}
  os.makedirs(os.path.dirname(args.out), exist_ok=True)
  with open(args.out, "w") as f:
    json.dump(result, f, indent=2)
  print(f"data_pipeline: bare loop {bare:.0f} img/s; " + "; ".join(
    f"{k} {r['images_per_sec']:.0f} img/s ({r['images_per_sec_per_worker_over_bare']:.2f} of bare "
    "per worker)" for k, r in runs.items()) + f" -> {args.out}")


if __name__ == "__main__":
  main()
