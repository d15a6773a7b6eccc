"""Local files and remote objects (`gs://`, `s3://`, `memory://`, ...) for the data readers and
for what a run writes into its workdir (config.json, results.json, reports).

A path with a URL scheme goes through fsspec (the file-system library behind gcsfs, s3fs, adlfs,
HF datasets and pandas); any other path is a local file, opened with the builtin `open` (no
indirection in the input workers' hot loop). Remote file systems need their fsspec backend
installed (`pip install gcsfs` for `gs://`, `s3fs` for `s3://`); fsspec names the package when it
is missing.

Shard lists are written the way OpenFlamingo's scripts and WebDataset write them: brace ranges and
lists `mmc4/{000000000..000001023}.tar`, `{a,b}/part-*.jsonl` (expanded with `braceexpand`, the
library WebDataset uses), then globs (`*`, `?`, `[...]`), on local paths and remote ones alike.
"""

from __future__ import annotations

import glob as glob_lib
import json
import os
import posixpath
from typing import BinaryIO

from vlm_jax.paths import is_url  # noqa: F401  (re-exported: the readers ask files.is_url)


def filesystem(path: str):
  """(fsspec file system, path without its scheme) of a URL; no glob expansion."""
  import fsspec  # pylint: disable=g-import-not-at-top  # only remote paths need it

  return fsspec.core.url_to_fs(path)


def local_path(path: str | os.PathLike) -> str:
  """`~` expanded for local paths; URLs as they are."""
  path = os.fspath(path)
  return path if is_url(path) else os.path.expanduser(path)


def open_file(path: str, mode: str = "rb") -> BinaryIO:
  """A file object (seekable, for remote objects too); the caller closes it."""
  if not is_url(path):
    return open(path, mode)  # noqa: SIM115
  fs, stripped = filesystem(path)
  return fs.open(stripped, mode)


def exists(path: str) -> bool:
  if not is_url(path):
    return os.path.exists(path)
  fs, stripped = filesystem(path)
  return fs.exists(stripped)


def makedirs(path: str) -> None:
  """A local directory and its parents; on object stores (no directories) a no-op where fsspec's
  backend makes it one."""
  if not is_url(path):
    os.makedirs(path, exist_ok=True)
    return
  fs, stripped = filesystem(path)
  fs.makedirs(stripped, exist_ok=True)


def read_json(path: str):
  with open_file(path, "r") as f:
    return json.load(f)


def write_json(path: str, obj) -> None:
  """Never half-written: locally tmp + rename; an object store commits the object on close."""
  if is_url(path):
    with open_file(path, "w") as f:
      json.dump(obj, f, indent=2, sort_keys=True)
    return
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(obj, f, indent=2, sort_keys=True)
  os.replace(tmp, path)


def read_bytes(path: str) -> bytes:
  with open_file(path) as f:
    return f.read()


def isfile(path: str) -> bool:
  if not is_url(path):
    return os.path.isfile(path)
  fs, stripped = filesystem(path)
  return fs.isfile(stripped)


def isdir(path: str) -> bool:
  if not is_url(path):
    return os.path.isdir(path)
  fs, stripped = filesystem(path)
  return fs.isdir(stripped)


def size(path: str) -> int:
  if not is_url(path):
    return os.path.getsize(path)
  fs, stripped = filesystem(path)
  return int(fs.size(stripped))


def basename(path: str) -> str:
  return posixpath.basename(path.rstrip("/")) if is_url(path) else os.path.basename(path)


def dirname(path: str) -> str:
  if not is_url(path):
    return os.path.dirname(path)
  scheme, rest = path.split("://", 1)
  return f"{scheme}://{posixpath.dirname(rest.rstrip('/'))}"


def join_inside(root: str, name: str) -> str | None:
  """`root/name`, or None when `name` would leave `root` (`../x`, an absolute path): web records
  name their own image files, and must not make a reader open anything else."""
  if is_url(root):
    if is_url(name) or name.startswith("/"):
      return None
    normal = posixpath.normpath(name)
    if normal == ".." or normal.startswith("../"):
      return None
    return root.rstrip("/") + "/" + normal
  base = os.path.abspath(root)
  path = os.path.abspath(os.path.join(base, name))
  return path if os.path.commonpath([base, path]) == base else None


def _has_magic(pattern: str) -> bool:
  return glob_lib.has_magic(pattern)


def expand(pattern: str) -> tuple[list[str], list[str]]:
  """(files, patterns that matched nothing): `pattern`'s brace ranges expanded, then each result
  globbed (sorted) or, without wildcards, kept if it is a file. Order: brace order, then sorted
  within each glob."""
  import braceexpand  # pylint: disable=g-import-not-at-top

  found, missing = [], []
  for item in braceexpand.braceexpand(local_path(pattern)):
    if not _has_magic(item):
      (found if isfile(item) else missing).append(item)
      continue
    if is_url(item):
      fs, stripped = filesystem(item)
      matches = sorted(fs.unstrip_protocol(p) for p in fs.glob(stripped) if fs.isfile(p))
    else:
      matches = sorted(p for p in glob_lib.glob(item) if os.path.isfile(p))
    if matches:
      found.extend(matches)
    else:
      missing.append(item)
  return found, missing
