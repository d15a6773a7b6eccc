"""grain input pipelines: config -> a checkpointable iterator of fixed-shape numpy batches.

`config.data.source` picks the reader (each a random-access source of records, see `records.py`):
  synthetic   the built-in corpus (kinds interleaved / text / pairs / vqa)
  mmc4        MMC4 jsonl shards            -> OpenFlamingo MMC4 transform (6 images, 256 tokens)
  obelics     OBELICS parquet              -> the same interleaved transform
  webdataset  tar shards, kind "pairs" (LAION: 1 image, 32 tokens) or "interleaved" (MMC4 json)
  llava       LLaVA conversation JSON      -> vicuna_v1 template, image-token runs, answer-only labels
  tfds        ArrayRecord datasets built from any of the above by `python -m vlm_jax.data.tfds.build`
              (the production path: formats parsed and OpenFlamingo matching done once, at build time)
`config.data.mixture` combines several of these (`vlm_jax.data.mixture`).

    source (random access) -> shuffle(seed) -> shard [process_index::process_count] -> repeat
      -> transform (tokenize, images, labels; a bad record becomes a `Skip` marker)
      -> to_iter_dataset(threads) -> CountingBatch (drops and counts `Skip`s, batches exactly
         batch_size good examples) [-> mp_prefetch(num_workers)] -> StatsCollector (sums the counts)

Order matters in grain's MapDataset, where every stage is an index mapping:
  * `shuffle` sees global indices past one epoch (from `repeat` downstream) and reseeds with
    `seed + epoch`, so each epoch is a fresh permutation without a per-epoch rebuild;
  * sharding *after* the shuffle gives each process a disjoint 1/process_count of every epoch (and
    the shuffle is identical on all processes because it only depends on the seed);
  * the shard is trimmed to a multiple of process_count so all processes see the same number of
    batches (a process running out early would hang the collective in the train step).

Batches (per process; B = batch_size):
  {"inputs": {"vision_x": float32[B, T_img, S, S, 3],      # absent for kind "text"
              "input_ids": int32[B, T], "attention_mask": int32[B, T]},
   "labels": int32[B, T]}

`iter(dataset)` returns a grain `DatasetIterator` with `get_state()` / `set_state()`; restoring a state
reproduces the identical continuation (the trainer saves it with grain.checkpoint + orbax), skip counts
included; `iterator.counters()` reports records seen and skipped per reason.
"""

from __future__ import annotations

from typing import Any

import grain

from vlm_jax.data import images, interleaved, packing, streams, synthetic
from vlm_jax.data import llava as llava_data
from vlm_jax.data.augment import JointFlip
from vlm_jax.data.counting import CountingBatch, StatsCollector
from vlm_jax.data.formats import llava_json, mmc4, obelics, webdataset
from vlm_jax.data.formats import transforms as web_transforms
from vlm_jax.data.records import BadRecord, Skip, skip_for_error, skipping
from vlm_jax.data.tfds import source as tfds_source
from vlm_jax.data.tokenizer import load_tokenizer

SOURCES = ("synthetic", "mmc4", "obelics", "webdataset", "llava", "tfds")
KINDS = ("interleaved", "text", "pairs", "vqa")
SPLITS = synthetic.SPLITS

_REQUIRED = object()
# Batch-level prefetching: a few batches ahead is plenty, and each batch holds B * T_img images.
_DEFAULTS = {"num_threads": 8, "prefetch_buffer_size": 16, "seed": 0, "num_records": 100_000,
             "num_workers": 0, "worker_buffer_size": 4, "skip_log_every": 1000, "mixture": None,
             "packing_bins": 0,
             # "uint8": images leave the pipeline resized and cropped, the ViT normalises them on the
             # device; 4x fewer bytes through worker processes and host-to-device copies.
             "image_dtype": "float32",
             # OpenFlamingo: RandomHorizontalFlip(0.5) on all images of a sample together. Off for the
             # synthetic corpus, whose captions say "left" / "right".
             "random_flip": 0.0, "min_image_side": images.DEFAULT_MIN_SIDE,
             "max_image_pixels": images.DEFAULT_MAX_PIXELS}


def _field(config: Any, name: str, default: Any = _REQUIRED) -> Any:
  """Reads config.data.<name> from a ConfigDict or a plain mapping, with a clear error."""
  try:
    return config[name]
  except (KeyError, AttributeError, TypeError):
    pass
  if default is not _REQUIRED:
    return default
  if name in _DEFAULTS:
    return _DEFAULTS[name]
  raise ValueError(f"config.data.{name} is missing; make_dataset needs it.")


class SkippingSource:
  """A random-access source whose bad records come back as `Skip` markers instead of exceptions
  (`BadRecord` with its reason; anything else as "record_error", see `records.skip_for_error`)."""

  def __init__(self, source):
    self.source = source

  def __len__(self) -> int:
    return len(self.source)

  def __getitem__(self, index: int):
    try:
      return self.source[index]
    except BadRecord as e:
      return Skip(e.reason, e.detail, e.dropped_images)
    except Exception as e:  # pylint: disable=broad-except  # one record must never stop a run
      return skip_for_error(e, f"{type(self.source).__name__}[{index}]")

  def __repr__(self) -> str:
    return f"SkippingSource({self.source!r})"


def _image_checks(config: Any) -> dict[str, Any]:
  return {"min_image_side": int(_field(config, "min_image_side")),
          "max_image_pixels": _field(config, "max_image_pixels"),
          "image_dtype": _field(config, "image_dtype")}


def _synthetic(config: Any, split: str, tokenizer):
  kind = _field(config, "kind")
  if kind not in KINDS:
    raise ValueError(f"config.data.kind={kind!r} is not supported; expected one of {KINDS}.")
  image_size, max_images = int(_field(config, "image_size")), int(_field(config, "max_images"))
  max_text_len = int(_field(config, "max_text_len"))
  source = synthetic.SyntheticSource(
    "interleaved" if kind == "text" else kind, split=split,
    num_records=int(_field(config, "num_records")), image_size=image_size, max_images=max_images,
    seed=int(_field(config, "seed")))
  if kind == "text":
    return source, interleaved.TextOnlyTransform(tokenizer, max_text_len), streams.collate
  return source, interleaved.InterleavedTransform(
    tokenizer, max_text_len=max_text_len, max_images=max_images, image_size=image_size,
    label_rule="pairs" if kind == "pairs" else "interleaved",
    image_dtype=_field(config, "image_dtype")), streams.collate


def _documents(config: Any, split: str, tokenizer, module, source=None):
  """MMC4 jsonl / OBELICS parquet / WebDataset tars: OpenFlamingo's MMC4 or LAION transform."""
  source = module.make_source(config, split) if source is None else source
  image_size = int(_field(config, "image_size"))
  if getattr(source, "kind", "interleaved") == "pairs":
    transform = web_transforms.laion_transform(
      tokenizer, image_size, int(_field(config, "max_text_len", web_transforms.LAION_MAX_TEXT_LEN)),
      **_image_checks(config))
  else:
    transform = web_transforms.InterleavedDocTransform(
      tokenizer, image_size,
      max_text_len=int(_field(config, "max_text_len", web_transforms.MMC4_MAX_TEXT_LEN)),
      max_images=int(_field(config, "max_images", web_transforms.MMC4_MAX_IMAGES)),
      **_image_checks(config))
  return source, transform, streams.collate


def _llava(config: Any, split: str, tokenizer, source=None):
  source = llava_json.make_source(config, split) if source is None else source
  transform = llava_data.LlavaTransform(
    tokenizer, max_text_len=int(_field(config, "max_text_len")),
    image_size=int(_field(config, "image_size")),
    num_image_tokens=int(_field(config, "num_image_tokens")),
    min_image_side=int(_field(config, "min_image_side")),
    max_image_pixels=_field(config, "max_image_pixels"))
  return source, transform, llava_data.collate


def _source_transform_collate(config: Any, split: str):
  """config.data.source -> (random-access source of records, example transform, batch collate)."""
  name = _field(config, "source")
  if name not in SOURCES:
    raise ValueError(f"config.data.source={name!r} is not supported; expected one of {SOURCES}.")
  tokenizer = load_tokenizer(_field(config, "tokenizer"))
  if name == "synthetic":
    return _synthetic(config, split, tokenizer)
  if name == "llava":
    return _llava(config, split, tokenizer)
  if name == "tfds":  # records built by vlm_jax.data.tfds: the transform of the kind they were built as
    source = tfds_source.make_source(config, split)
    if source.kind == "llava":
      return _llava(config, split, tokenizer, source)
    return _documents(config, split, tokenizer, None, source)
  return _documents(config, split, tokenizer, {"mmc4": mmc4, "obelics": obelics,
                                                "webdataset": webdataset}[name])


def make_dataset(
  data_config: Any,
  *,
  split: str,
  batch_size: int,
  process_index: int | None = None,
  process_count: int | None = None,
  repeat: bool = True,
) -> grain.IterDataset:
  """Builds the input pipeline described in the module docstring.

  Args:
    data_config: `config.data` (ConfigDict or mapping) with source, kind, tokenizer, image_size,
      max_images, max_text_len, num_records, seed, num_threads, prefetch_buffer_size.
    split: "train" or "eval".
    batch_size: PER-PROCESS batch size.
    process_index, process_count: this process's shard; default to jax's.
    repeat: loop forever, reshuffling each epoch; False gives one pass over this process's shard
      (with worker processes each worker drops its own partial last batch).

  Returns:
    A `grain.IterDataset` of batches (layout in the module docstring); deterministic for a config.
  """
  if split not in SPLITS:
    raise ValueError(f"make_dataset: split={split!r}; expected one of {SPLITS}.")
  if batch_size < 1:
    raise ValueError(f"make_dataset: batch_size must be >= 1, got {batch_size}.")
  if process_index is None or process_count is None:
    import jax  # pylint: disable=g-import-not-at-top  # Only for the defaults; data needs no jax.

    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index={process_index} not in [0, process_count={process_count}).")
  # A mixture builds on make_dataset per component (and imports this module), hence the local import.
  if _field(data_config, "mixture"):
    from vlm_jax.data.mixture import make_mixture  # pylint: disable=g-import-not-at-top
    return make_mixture(data_config, split=split, batch_size=batch_size, process_index=process_index,
                        process_count=process_count, repeat=repeat)
  # Packing (vlm_jax.data.packing) takes this pipeline's examples one at a time and batches its rows.
  pack = packing.packer(data_config, batch_size=batch_size) if int(
    _field(data_config, "packing_bins")) else None
  example_batch = 1 if pack else batch_size

  source, transform, collate = _source_transform_collate(data_config, split)
  seed = int(_field(data_config, "seed"))
  ds = grain.MapDataset.source(SkippingSource(source)).shuffle(seed=seed % 2**32)
  usable = len(source) - len(source) % process_count
  ds = ds[process_index:usable:process_count]
  if len(ds) < example_batch:
    raise ValueError(
      f"Each of {process_count} processes gets {len(ds)} records of config.data.num_records="
      f"{len(source)}, fewer than batch_size={batch_size}."
    )
  if repeat:
    ds = ds.repeat()
  flip = float(_field(data_config, "random_flip"))
  if flip and split == "train":  # after repeat: each epoch draws new flips, restores replay them
    ds = ds.random_map(JointFlip(flip), seed=(seed + 1) % 2**32)
  ds = ds.map(skipping(transform))
  read_options = grain.ReadOptions(
    num_threads=int(_field(data_config, "num_threads")),
    prefetch_buffer_size=int(_field(data_config, "prefetch_buffer_size")),
  )
  # Batching happens before the (optional) worker processes, so only whole batches cross the process
  # boundary; each batch carries its skip counts, which StatsCollector sums in the main process.
  it = CountingBatch(ds.to_iter_dataset(read_options), example_batch, collate, emit_stats=True)
  workers = int(_field(data_config, "num_workers"))
  if workers > 0:  # decode/resize in worker processes (the GIL would serialise them in threads)
    from absl import flags  # pylint: disable=g-import-not-at-top
    if not flags.FLAGS.is_parsed():  # grain's workers read absl flags; outside an absl app use defaults
      flags.FLAGS.mark_as_parsed()
    # Several batches in flight per worker hide the per-batch hand-over latency (measured: 16-example
    # float32 224px batches with no work cross at ~410 examples/s with 2 in flight, ~620 with 8).
    it = it.mp_prefetch(grain.MultiprocessingOptions(
      num_workers=workers, per_worker_buffer_size=int(_field(data_config, "worker_buffer_size"))))
  it = StatsCollector(it, log_every=int(_field(data_config, "skip_log_every")))
  return pack(it) if pack else it
