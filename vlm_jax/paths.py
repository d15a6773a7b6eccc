"""Local paths made absolute once, at the entry points; URLs (`gs://`, `s3://`, ...) left as they are.

Orbax refuses relative checkpoint paths, and a relative path in a config means "relative to where
the command was started", which stops being true the moment a library call (a worker process, a
`chdir`, a path joined onto another) sees it. So every CLI (`vlm_jax.main`, `vlm_jax.generate`,
`vlm_jax.convert`, `vlm_jax.data.tfds.build`) resolves its path flags and the path fields of its
config here, logs what it changed, and the library below only ever sees absolute paths or URLs.

Path fields of a config are found by name, anywhere in it (stages under `init.stage`, mixture
components, few-shot tasks): a key ending in `dir`, `path`, `paths`, `json`, `file`, `files`,
`checkpoint`, `questions`, `annotations` or `names` (and `fewshot.rices_vision` / `rices_projection`)
whose value is a string or a list / dict of
strings. `tokenizer` specs are resolved only when they name an existing local file or directory
(`openflamingo:conv/lm` too), because `synthetic` and `openflamingo:<known LM>` are names, not paths.
Keys starting with `hf_` are Hugging Face ids and are left alone.
"""

from __future__ import annotations

import logging
import os
import re
from typing import Any

_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
_PATH_KEY = re.compile(r"(^|_)(dir|path|paths|json|file|files|checkpoint|checkpoints|questions|annotations|"
                       r"names)$|^rices_(vision|projection)$")
_SPEC_PREFIXES = ("openflamingo:",)


def is_url(path: str | os.PathLike) -> bool:
  """True for `gs://bucket/x`, `s3://...`, `memory://...`: anything with a URL scheme."""
  return bool(_URL.match(os.fspath(path)))


def resolve(path: str | os.PathLike | None) -> str | None:
  """`~` expanded and made absolute against the current directory; URLs and None unchanged.

  Shard patterns stay patterns: `runs/{000..009}.tar` -> `/home/me/runs/{000..009}.tar`.
  """
  if path is None:
    return None
  path = os.fspath(path)
  if not path or is_url(path):
    return path
  return os.path.abspath(os.path.expanduser(path))


def resolve_all(value: Any) -> Any:
  """`resolve` on a path, or on every path of a list / tuple / {split: path} dict."""
  if isinstance(value, (str, os.PathLike)):
    return resolve(value)
  if isinstance(value, (list, tuple)):
    return type(value)(resolve_all(v) for v in value)
  if isinstance(value, dict):  # {split: pattern} mappings
    return {k: resolve_all(v) for k, v in value.items()}
  return value


def _resolve_spec(spec: Any) -> Any:
  """A tokenizer spec: its path part made absolute only if it names something on local disk."""
  if not isinstance(spec, str) or not spec or is_url(spec):
    return spec
  prefix = next((p for p in _SPEC_PREFIXES if spec.startswith(p)), "")
  rest = spec[len(prefix):]
  if os.path.isabs(rest) or not os.path.exists(os.path.expanduser(rest)):
    return spec
  return prefix + resolve(rest)


def is_path_key(key: str) -> bool:
  return bool(_PATH_KEY.search(key)) and not key.startswith("hf_")


def resolve_config(config, prefix: str = "", _all: bool = False) -> list[tuple[str, Any, Any]]:
  """Makes every local path field of `config` (a ConfigDict, nested) absolute, in place.

  Returns the changes as (dotted key, old, new) and logs each one. A locked ConfigDict accepts
  this (values change, no key is added); a FieldReference shared by several fields is set once
  and all of them follow. Under a path key every string leaf is a path (`data.path.train`).
  """
  changes = []
  if config is None:
    return changes
  for key in list(config.keys()):
    value = config[key]
    dotted = f"{prefix}{key}"
    path_key = _all or is_path_key(str(key))
    if hasattr(value, "keys") and hasattr(value, "lock"):  # a nested ConfigDict
      changes.extend(resolve_config(value, dotted + ".", _all=path_key))
      continue
    if key == "tokenizer":
      new = _resolve_spec(value)
    elif path_key and isinstance(value, (str, list, tuple, dict)):
      new = resolve_all(value)
    else:
      continue
    if new != value:
      config[key] = new
      changes.append((dotted, value, new))
      logging.info("path: %s = %s", dotted, new)
  return changes
