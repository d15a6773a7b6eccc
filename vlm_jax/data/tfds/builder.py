"""Local corpora -> TFDS ArrayRecord datasets of finished records.

`RecordsBuilder(source, data_config, data_dir)` reads a local format through its existing reader
(`vlm_jax.data.formats.<reader>.make_source(data_config, split)`), so OpenFlamingo's semantics
(Hungarian image-sentence matching, the 0.24 threshold, the 11,000-byte floor, the single-image
coin, the `<image>`/`<|endofchunk|>` layout) are applied once, here, and training reads finished
records:

  source       reader                  kind          splits from
  mmc4         formats.mmc4            interleaved   config.data.paths  {split: glob | list}
  obelics      formats.obelics         interleaved   config.data.paths
  webdataset   formats.webdataset      pairs | interleaved (config.data.kind)   config.data.paths
  llava        formats.llava_json      llava         config.data.path   {split: file}

Output, a TFDS dataset that `tfds.data_source` / `tfds.builder_from_directory` read without
TensorFlow (`vlm_jax.data.tfds.source` wraps them as a record source):

  <data_dir>/<name>/<version>/
    <name>-<split>.array_record-NNNNN-of-MMMMM   examples (`schema.features(kind)`), in source order
    dataset_info.json, features.json             TFDS metadata (tfds.folder_dataset.write_metadata)
    metadata.json                                kind, reader settings, per-split counts and skips

A record whose reader raises `BadRecord` is left out; the skips are counted per reason, with a few
example ids, in metadata.json (`info.metadata["vlm_jax"]["splits"][split]`, a reading source's
`build_metadata`) and logged. Output is deterministic: shard k of a split holds the good records of
source indices [k * n // shards, (k + 1) * n // shards) in order, whatever the number of workers,
and the bytes are the same from build to build.

Why not `tfds.core.GeneratorBasedBuilder`. It does prepare ArrayRecord datasets without TensorFlow
(tensorflow-datasets 4.9.10, checked), but not at this scale: every example goes through one
process, and keeping source order (`disable_shuffling=True`, so tfds index i is the reader's i-th
good record) makes TFDS's shuffler put every integer key in its first bucket and sort that bucket
in memory once a split passes 1 GB (`tensorflow_datasets/core/shuffle.py`), which a split of
encoded images always does. So workers here write their own shards with the ArrayRecord writer
TFDS uses (`group_size:1`, one record per chunk for random access), examples are serialized by
TFDS's feature encoders, and TFDS's `write_metadata` (its documented path for files written by
another pipeline) makes the directory a TFDS dataset. Paths are local (the ArrayRecord writer
writes local files).
"""

from __future__ import annotations

import collections
import concurrent.futures
import copy
import dataclasses
import json
import logging
import multiprocessing
import os
import queue as queue_lib
import re
import shutil
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import tensorflow_datasets as tfds
from array_record.python import array_record_module

from vlm_jax import paths
from vlm_jax.data import files
from vlm_jax.data import data_config as data_config_lib
from vlm_jax.data.data_config import parse
from vlm_jax.data.formats import llava_json, mmc4, obelics, webdataset
from vlm_jax.data.records import DROPPED_KEY, BadRecord, Skip, skip_for_error
from vlm_jax.data.tfds import schema

SOURCES = ("mmc4", "obelics", "webdataset", "llava")
_READERS = {"mmc4": mmc4, "obelics": obelics, "webdataset": webdataset, "llava": llava_json}
DEFAULT_SHARD_SIZE = 4096  # source records per output shard (MMC4 documents: ~1 GB of images)
FILE_SUFFIX = "array_record"
WRITER_OPTIONS = "group_size:1"  # what TFDS writes: each record its own chunk, for random access
SKIP_EXAMPLES = 5  # skipped record details kept per reason in metadata.json
_REPORT_SECONDS = 0.5

# progress(split, records written, {reason: records skipped}) with counts since the last call.
Progress = Callable[[str, int, Mapping[str, int]], None]


def kind_of(source: str, data_config: Any) -> str:
  """The record kind a source's records are (see the module docstring's table)."""
  if source not in SOURCES:
    raise ValueError(f"tfds build: source={source!r}; expected one of {SOURCES}.")
  if source == "llava":
    return "llava"
  if source == "webdataset":
    kind = parse(data_config).require("kind", "webdataset")
    if kind not in webdataset.KINDS:
      raise ValueError(
        f"webdataset: config.data.kind={kind!r}; expected one of {webdataset.KINDS}.")
    return kind
  return "interleaved"


def split_names(source: str, data_config: Any) -> list[str]:
  """The splits config.data.paths (config.data.path for llava) names: a mapping's keys, else
  ["train"] (the readers use a plain glob/list/file for train only)."""
  key = "path" if source == "llava" else "paths"
  paths = parse(data_config).require(key, source)
  if isinstance(paths, (str, os.PathLike, Sequence)):
    return ["train"]
  names = list(paths.keys())
  bad = [n for n in names if not re.fullmatch(r"[A-Za-z0-9_]+", str(n))]
  if bad or not names:
    raise ValueError(f"tfds build: config.data.{key} split names {names} must be non-empty "
                     "letters/digits/underscores (TFDS split names).")
  return [str(n) for n in names]


def _json_safe(value: Any) -> Any:
  if hasattr(value, "to_dict"):  # ml_collections.ConfigDict
    value = value.to_dict()
  return json.loads(json.dumps(value, default=str, sort_keys=True))


@dataclasses.dataclass(frozen=True)
class _ShardTask:
  split: str
  shard: int
  start: int
  stop: int
  path: str


@dataclasses.dataclass
class _ShardResult:
  task: _ShardTask
  written: int = 0
  num_bytes: int = 0
  skipped: collections.Counter = dataclasses.field(default_factory=collections.Counter)
  dropped_images: collections.Counter = dataclasses.field(default_factory=collections.Counter)
  examples: dict[str, list[str]] = dataclasses.field(default_factory=dict)


def _write_shard(task: _ShardTask, source, serializer: schema.Serializer,
                 report: Callable[[tuple], None]) -> _ShardResult:
  """Writes the good records of source[task.start:task.stop] to one ArrayRecord file."""
  result = _ShardResult(task)
  unreported_written, unreported_skipped = 0, collections.Counter()
  last_report = time.monotonic()
  writer = array_record_module.ArrayRecordWriter(task.path, WRITER_OPTIONS)
  try:
    for index in range(task.start, task.stop):
      try:
        record = source[index]
        data = serializer(record)
      except Exception as e:  # pylint: disable=broad-except  # one record must not stop a build
        skip = (Skip(e.reason, e.detail, e.dropped_images) if isinstance(e, BadRecord)
                else skip_for_error(e, f"{task.split} index {index}"))
        result.skipped[skip.reason] += 1
        result.dropped_images.update(skip.dropped_images)
        unreported_skipped[skip.reason] += 1
        kept = result.examples.setdefault(skip.reason, [])
        if len(kept) < SKIP_EXAMPLES:
          kept.append(f"index {index}: {skip.detail}"[:300])
      else:
        result.dropped_images.update(record.get(DROPPED_KEY) or {})
        writer.write(data)
        result.written += 1
        result.num_bytes += len(data)
        unreported_written += 1
      if time.monotonic() - last_report > _REPORT_SECONDS:
        report((task.split, unreported_written, dict(unreported_skipped)))
        unreported_written, unreported_skipped = 0, collections.Counter()
        last_report = time.monotonic()
  finally:
    writer.close()
  report((task.split, unreported_written, dict(unreported_skipped)))
  return result


# Worker-process state: the split sources, the serializer and the progress queue, set once per
# process by the pool initializer (the sources are pickled to each worker, as grain does).
_WORKER: dict[str, Any] = {}


def _init_worker(sources: Mapping[str, Any], kind: str, progress_queue) -> None:
  _WORKER.update(sources=sources, serializer=schema.Serializer(kind), queue=progress_queue)


def _worker_write(task: _ShardTask) -> _ShardResult:
  return _write_shard(task, _WORKER["sources"][task.split], _WORKER["serializer"],
                      _WORKER["queue"].put)


class RecordsBuilder:
  """Builds `<data_dir>/<name>/<version>/`, a TFDS ArrayRecord dataset of one local format.

  Args:
    source: "mmc4", "obelics", "webdataset" or "llava": the reader, configured by `data_config`.
    data_config: the `config.data` fields that reader takes (`paths` / `path`, `kind`, `image_dir`,
      MMC4 options, ...); a mapping or ConfigDict.
    data_dir: where TFDS datasets live (`tfds_data_dir` when reading back).
    name: dataset name (default: the source, plus the kind for webdataset).
    version: dataset version directory.
    shard_size: source records per output shard.
    workers: processes building records (1: in this process).
    splits: splits to build (default: all of config.data.paths's).
  """

  def __init__(self, source: str, data_config: Any, data_dir: str | os.PathLike, *,
               name: str | None = None, version: str = schema.VERSION,
               shard_size: int = DEFAULT_SHARD_SIZE, workers: int = 1,
               splits: Sequence[str] | None = None):
    self.source = source
    data_config = parse(data_config)
    self.kind = kind_of(source, data_config)
    self.data_config = data_config
    data_dir = files.local_path(data_dir)
    self.data_dir = paths.resolve(data_dir)
    self.name = name or (f"{source}_{self.kind}" if source == "webdataset" else source)
    if not re.fullmatch(r"[a-z][a-z0-9_]*", self.name):
      raise ValueError(f"tfds build: dataset name {self.name!r} must be lower_snake_case "
                       "(TFDS names files <name>-<split>.array_record-...).")
    if not tfds.core.Version.is_valid(version):
      raise ValueError(f"tfds build: version {version!r} is not MAJOR.MINOR.PATCH.")
    self.version = version
    if shard_size < 1 or workers < 1:
      raise ValueError(f"tfds build: shard_size={shard_size} and workers={workers} must be >= 1.")
    self.shard_size, self.workers = shard_size, workers
    self.splits = list(splits) if splits else split_names(source, data_config)
    self._sources: dict[str, Any] | None = None

  @property
  def dataset_dir(self) -> str:
    if files.is_url(self.data_dir):
      return f"{self.data_dir.rstrip('/')}/{self.name}/{self.version}"
    return os.path.join(self.data_dir, self.name, self.version)

  def sources(self) -> dict[str, Any]:
    """{split: the reader's random-access source} (built once; indexing the input happens here)."""
    if self._sources is None:
      reader = _READERS[self.source]
      # Readers decode every image to judge it, but the stored record keeps the encoded bytes: no
      # crop at a training size is made (image_size=None).
      config = self.data_config.replace(image_size=None)
      self._sources = {split: reader.make_source(config, split) for split in self.splits}
    return self._sources

  def source_sizes(self) -> dict[str, int]:
    """{split: number of source records}, the totals progress is measured against."""
    return {split: len(source) for split, source in self.sources().items()}

  def _tasks(self, directory: str) -> list[_ShardTask]:
    tasks = []
    for split, n in self.source_sizes().items():
      shards = max(1, -(-n // self.shard_size))
      template = tfds.core.ShardedFileTemplate(
        data_dir=directory, dataset_name=self.name, split=split, filetype_suffix=FILE_SUFFIX)
      for k in range(shards):
        path = os.fspath(template.sharded_filepath(shard_index=k, num_shards=shards))
        tasks.append(_ShardTask(split, k, k * n // shards, (k + 1) * n // shards, path))
    return tasks

  def _run(self, tasks: list[_ShardTask], progress: Progress) -> list[_ShardResult]:
    def report(message):
      progress(*message)

    if self.workers == 1 or len(tasks) == 1:
      serializer = schema.Serializer(self.kind)
      return [_write_shard(t, self.sources()[t.split], serializer, report) for t in tasks]
    # spawn: the parent may run threads (index scans, grain), which fork would copy mid-flight.
    context = multiprocessing.get_context("spawn")
    progress_queue = context.Queue()
    pool = concurrent.futures.ProcessPoolExecutor(
      min(self.workers, len(tasks)), mp_context=context, initializer=_init_worker,
      initargs=(self.sources(), self.kind, progress_queue))

    def drain():
      while True:
        try:
          report(progress_queue.get_nowait())
        except queue_lib.Empty:
          return

    try:
      futures = [pool.submit(_worker_write, t) for t in tasks]
      pending = set(futures)
      while pending:
        done, pending = concurrent.futures.wait(pending, timeout=0.2)
        for future in done:
          future.result()  # a worker's error stops the build now, not after every shard
        drain()
    except BaseException:
      pool.shutdown(wait=False, cancel_futures=True)
      raise
    pool.shutdown(wait=True)
    drain()
    return [f.result() for f in futures]

  def _metadata(self, results: list[_ShardResult]) -> dict[str, Any]:
    sources = self.sources()
    splits = {}
    for split in self.splits:
      mine = [r for r in results if r.task.split == split]
      skipped, dropped, examples = collections.Counter(), collections.Counter(), {}
      for r in mine:
        skipped.update(r.skipped)
        dropped.update(r.dropped_images)
        for reason, details in r.examples.items():
          examples.setdefault(reason, []).extend(details)
      splits[split] = {
        "source_records": len(sources[split]),
        "written": sum(r.written for r in mine),
        "skipped": dict(sorted(skipped.items())),
        "dropped_images": dict(sorted(dropped.items())),
        "skipped_examples": {k: v[:SKIP_EXAMPLES] for k, v in sorted(examples.items())},
      }
    first = sources[self.splits[0]]
    options = getattr(first, "options", None)
    return {
      "kind": self.kind,
      "source": self.source,
      "reader": repr(first),
      # The MMC4/OBELICS settings baked into the records (LAION pairs take none).
      "reader_options": (_json_safe(dataclasses.asdict(options))
                         if options is not None and self.kind != "pairs" else None),
      "data_config": _json_safe(data_config_lib.as_dict(self.data_config)),
      "shard_size": self.shard_size,
      "splits": splits,
    }

  def build(self, *, overwrite: bool = False, progress: Progress | None = None) -> dict[str, Any]:
    """Writes the dataset (atomically: into a temporary folder renamed at the end).

    Returns:
      The metadata written to metadata.json (per-split counts under "splits").

    A remote `data_dir` (`gs://...`) is built in a local temporary folder first, then uploaded file
    by file with `dataset_info.json` last, so a reader never sees a half-uploaded version.

    Raises:
      FileExistsError: the dataset directory exists and `overwrite` is False.
    """
    if files.is_url(self.data_dir):
      return self._build_and_upload(overwrite=overwrite, progress=progress)
    final = self.dataset_dir
    if os.path.exists(final):
      if not overwrite:
        raise FileExistsError(f"tfds build: {final} exists; pass overwrite=True (--overwrite) to "
                              "replace it.")
      shutil.rmtree(final)
    os.makedirs(os.path.dirname(final), exist_ok=True)
    # TFDS's own naming for unfinished versions; readers ignore it (not a valid version name).
    tmp = tempfile.mkdtemp(prefix="incomplete.", suffix=f"_{self.version}",
                           dir=os.path.dirname(final))
    start = time.monotonic()
    try:
      results = self._run(self._tasks(tmp), progress or (lambda *_: None))
      metadata = self._metadata(results)
      split_infos = []
      for split in self.splits:
        mine = sorted((r for r in results if r.task.split == split), key=lambda r: r.task.shard)
        split_infos.append(tfds.core.SplitInfo(
          name=split, shard_lengths=[r.written for r in mine],
          num_bytes=sum(r.num_bytes for r in mine),
          filename_template=tfds.core.ShardedFileTemplate(
            data_dir=tmp, dataset_name=self.name, split=split, filetype_suffix=FILE_SUFFIX)))
      tfds.folder_dataset.write_metadata(
        data_dir=tmp, features=schema.features(self.kind), split_infos=split_infos,
        version=self.version, check_data=False,  # check_data reads through tf.data
        description=f"vlm_jax {self.kind} records built from {self.source} ({metadata['reader']}).",
        metadata=tfds.core.MetadataDict(vlm_jax=metadata))
      os.rename(tmp, final)
    except BaseException:
      shutil.rmtree(tmp, ignore_errors=True)
      raise
    _log_summary(self.name, metadata, time.monotonic() - start)
    return metadata


  def _build_and_upload(self, *, overwrite: bool, progress: Progress | None) -> dict[str, Any]:
    remote = self.dataset_dir
    fs, root = files.filesystem(remote)
    if fs.exists(root):
      if not overwrite:
        raise FileExistsError(f"tfds build: {remote} exists; pass overwrite=True (--overwrite) to "
                              "replace it.")
      fs.rm(root, recursive=True)
    with tempfile.TemporaryDirectory(prefix="vlm_jax_tfds_") as staging:
      local = self._with_data_dir(staging)
      metadata = local.build(progress=progress)
      names = sorted(os.listdir(local.dataset_dir), key=lambda n: (n == "dataset_info.json", n))
      for name in names:
        fs.put_file(os.path.join(local.dataset_dir, name), f"{root}/{name}")
    logging.info("tfds build %s: uploaded %d files to %s", self.name, len(names), remote)
    return metadata

  def _with_data_dir(self, data_dir: str) -> "RecordsBuilder":
    other = copy.copy(self)
    other.data_dir = data_dir
    return other


def _log_summary(name: str, metadata: dict[str, Any], seconds: float) -> None:
  for split, counts in metadata["splits"].items():
    logging.info("tfds build %s/%s: %d of %d records written, skipped %s (%.1f s)", name, split,
                 counts["written"], counts["source_records"], counts["skipped"] or "none", seconds)
    for reason, details in counts["skipped_examples"].items():
      logging.warning("tfds build %s/%s: skipped %d x %s, e.g. %s", name, split,
                      counts["skipped"][reason], reason, "; ".join(details[:2]))

