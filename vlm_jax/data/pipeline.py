"""grain input pipelines: config -> a checkpointable iterator of fixed-shape numpy batches.

`config.data.source` picks the reader (each a random-access source of records, see `records.py`):
  synthetic   the built-in corpus (kinds interleaved / text / pairs / vqa)
  mmc4        MMC4 jsonl shards            -> OpenFlamingo MMC4 transform (6 images, 256 tokens)
  obelics     OBELICS parquet              -> the same interleaved transform
  webdataset  tar shards, kind "pairs" (LAION: 1 image, 32 tokens) or "interleaved" (MMC4 json)
  llava       LLaVA conversation JSON      -> vicuna_v1 template, image-token runs, answer-only labels
  tfds        ArrayRecord datasets built from any of the above by `python -m vlm_jax.data.tfds.build`
              (the production path: formats parsed and OpenFlamingo matching done once, at build time)
  shapes | image_folder | tfds_classification   image -> class index (`vlm_jax.data.classification`)
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

import functools
from typing import Any

import grain

from vlm_jax.data import classification, interleaved, packing, streams, synthetic
from vlm_jax.data import llava as llava_data
from vlm_jax.data.augment import JointFlip
from vlm_jax.data.counting import CountingBatch, StatsCollector
from vlm_jax.data.data_config import DataConfig, parse
from vlm_jax.data.formats import llava_json, mmc4, obelics, webdataset
from vlm_jax.data.formats import transforms as web_transforms
from vlm_jax.data.records import BadRecord, Skip, skip_for_error, skipping
from vlm_jax.data.tfds import source as tfds_source
from vlm_jax.data.tokenizer import load_tokenizer

SOURCES = ("synthetic", "mmc4", "obelics", "webdataset", "llava", "tfds", *classification.SOURCES)
KINDS = ("interleaved", "text", "pairs", "vqa")
SPLITS = synthetic.SPLITS

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


def _image_checks(data: DataConfig) -> dict[str, Any]:
  return {"min_image_side": data.min_image_side, "max_image_pixels": data.max_image_pixels,
          "image_dtype": data.image_dtype}


def _synthetic(data: DataConfig, split: str, tokenizer):
  kind = data.require("kind", "synthetic")
  if kind not in KINDS:
    raise ValueError(f"config.data.kind={kind!r} is not supported; expected one of {KINDS}.")
  image_size = data.require("image_size", "synthetic")
  max_images = data.require("max_images", "synthetic")
  max_text_len = data.require("max_text_len", "synthetic")
  source = synthetic.SyntheticSource(
    "interleaved" if kind == "text" else kind, split=split, num_records=data.num_records,
    image_size=image_size, max_images=max_images, seed=data.seed)
  if kind == "text":
    return source, interleaved.TextOnlyTransform(tokenizer, max_text_len), streams.collate
  return source, interleaved.InterleavedTransform(
    tokenizer, max_text_len=max_text_len, max_images=max_images, image_size=image_size,
    label_rule="pairs" if kind == "pairs" else "interleaved",
    image_dtype=data.image_dtype), streams.collate


def _documents(data: DataConfig, split: str, tokenizer, module, source=None):
  """MMC4 jsonl / OBELICS parquet / WebDataset tars: OpenFlamingo's MMC4 or LAION transform."""
  source = module.make_source(data, split) if source is None else source
  image_size = data.require("image_size", data.source)
  if getattr(source, "kind", "interleaved") == "pairs":
    transform = web_transforms.laion_transform(
      tokenizer, image_size, data.get("max_text_len", web_transforms.LAION_MAX_TEXT_LEN),
      **_image_checks(data))
  else:
    transform = web_transforms.InterleavedDocTransform(
      tokenizer, image_size,
      max_text_len=data.get("max_text_len", web_transforms.MMC4_MAX_TEXT_LEN),
      max_images=data.get("max_images", web_transforms.MMC4_MAX_IMAGES),
      **_image_checks(data))
  return source, transform, streams.collate


def _llava(data: DataConfig, split: str, tokenizer, source=None):
  """LLaVA conversations (a conversation file, TFDS records, or the synthetic corpus as
  conversations) -> the template's ids, image runs and answer-only labels."""
  source = llava_json.make_source(data, split) if source is None else source
  optional = {name: getattr(data, name) for name in ("image_token_id", "system", "eos_token",
                                                     "pad_token")
              if getattr(data, name) is not None}
  if data.bos_token is not None:
    optional["bos_token"] = data.bos_token or None
  transform = llava_data.LlavaTransform(
    tokenizer, max_text_len=data.require("max_text_len", "llava"),
    image_size=data.require("image_size", "llava"),
    num_image_tokens=data.require("num_image_tokens", "llava"),
    template=data.get("template", "vicuna_v1"), **optional,
    min_image_side=data.min_image_side, max_image_pixels=data.max_image_pixels)
  collate = functools.partial(llava_data.collate, ori_sizes=data.ori_sizes,
                              with_answer_rows=data.answer_rows)
  return source, transform, collate


def _source_transform_collate(data: DataConfig, split: str):
  """config.data.source -> (random-access source of records, example transform, batch collate)."""
  name = data.source
  if name not in SOURCES:
    raise ValueError(f"config.data.source={name!r} is not supported; expected one of {SOURCES}.")
  if name in classification.SOURCES:  # images and class ids: no tokenizer
    return classification.source_transform_collate(data, split)
  tokenizer = load_tokenizer(data.require("tokenizer", name))
  if name == "synthetic" and data.template is not None:
    return _llava(data, split, tokenizer, synthetic.ConversationSource(
      data.require("kind", "synthetic"), split=split, num_records=data.num_records,
      image_size=data.require("image_size", "synthetic"), hires_size=data.hires_size,
      hires_target_frac=tuple(data.hires_target_frac), seed=data.seed))
  if name == "synthetic":
    return _synthetic(data, split, tokenizer)
  if name == "llava":
    return _llava(data, split, tokenizer)
  if name == "tfds":  # records built by vlm_jax.data.tfds: the transform of the kind they were built as
    source = tfds_source.make_source(data, split)
    if source.kind == "llava":
      return _llava(data, split, tokenizer, source)
    return _documents(data, split, tokenizer, None, source)
  return _documents(data, split, tokenizer, {"mmc4": mmc4, "obelics": obelics,
                                              "webdataset": webdataset}[name])


def source_and_transform(data_config: Any, split: str):
  """(random-access source, per-record transform, batch collate) of `config.data` for `split`,
  the pieces `make_dataset` chains; evaluators that need whole examples use them directly."""
  return _source_transform_collate(parse(data_config), split)


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
    data_config: `config.data` (ConfigDict, mapping or `DataConfig`; fields in
      `vlm_jax.data.data_config`), parsed here once: an unknown key fails now, naming it.
    split: "train" or "eval".
    batch_size: PER-PROCESS batch size.
    process_index, process_count: this process's shard; default to jax's.
    repeat: loop forever, reshuffling each epoch; False gives one pass over this process's shard
      (with worker processes each worker drops its own partial last batch).

  Returns:
    A `grain.IterDataset` of batches (layout in the module docstring); deterministic for a config.
  """
  data = parse(data_config)
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
  if data.mixture:
    from vlm_jax.data.mixture import make_mixture  # pylint: disable=g-import-not-at-top
    return make_mixture(data, split=split, batch_size=batch_size, process_index=process_index,
                        process_count=process_count, repeat=repeat)
  # Packing (vlm_jax.data.packing) takes this pipeline's examples one at a time and batches its rows.
  pack = packing.packer(data, batch_size=batch_size) if data.packing_bins else None
  example_batch = 1 if pack else batch_size

  source, transform, collate = _source_transform_collate(data, split)
  seed = data.seed
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
  flip = data.random_flip
  if flip and split == "train":  # after repeat: each epoch draws new flips, restores replay them
    ds = ds.random_map(JointFlip(flip), seed=(seed + 1) % 2**32)
  if data.random_resized_crop is not None and split == "train":  # classification's crop draws
    ds = ds.random_map(classification.CropSeed(), seed=(seed + 2) % 2**32)
  ds = ds.map(skipping(transform))
  read_options = grain.ReadOptions(
    num_threads=data.num_threads, prefetch_buffer_size=data.prefetch_buffer_size,
  )
  # Batching happens before the (optional) worker processes, so only whole batches cross the process
  # boundary; each batch carries its skip counts, which StatsCollector sums in the main process.
  it = CountingBatch(ds.to_iter_dataset(read_options), example_batch, collate, emit_stats=True)
  workers = data.num_workers
  if workers > 0:  # decode/resize in worker processes (the GIL would serialise them in threads)
    from absl import flags  # pylint: disable=g-import-not-at-top
    if not flags.FLAGS.is_parsed():  # grain's workers read absl flags; outside an absl app use defaults
      flags.FLAGS.mark_as_parsed()
    # Several batches in flight per worker hide the per-batch hand-over latency (measured: 16-example
    # float32 224px batches with no work cross at ~410 examples/s with 2 in flight, ~620 with 8).
    it = it.mp_prefetch(grain.MultiprocessingOptions(
      num_workers=workers, per_worker_buffer_size=data.worker_buffer_size))
  it = StatsCollector(it, log_every=data.skip_log_every)
  return pack(it) if pack else it
