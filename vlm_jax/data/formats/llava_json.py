"""LLaVA-Instruct conversation files (`llava_v1_5_mix665k.json`, `llava_instruct_150k.json`, ...) as
a random-access grain source.

The file is a JSON list (or JSON lines, one entry per line) of

  {"id": "000000033471",
   "image": "coco/train2017/000000033471.jpg",        # relative to image_dir; absent: text-only
   "conversations": [{"from": "human", "value": "<image>\\nWhat are the colors of the bus?"},
                     {"from": "gpt", "value": "The bus is white and red."}, ...]}

`source[i]` checks the entry's schema and gives the record that `vlm_jax.data.llava` turns into
model inputs:

  {"id": "llava_v1_5_mix665k.json:17:000000033471",
   "images": ["/data/coco/train2017/000000033471.jpg"],   # [] for a text-only entry
   "conversations": [{"from": "human", "value": ...}, {"from": "gpt", "value": ...}, ...]}

or raises `BadRecord`: "malformed_json" (not an object, a missing or mistyped field, an unknown
role, a JSON line that does not parse), "text_empty" (no conversation turns), "image_missing" (the
image file does not exist), "image_count_mismatch" (several images: LLaVA-1.5 has one per entry).
Whether the turns alternate properly is the transform's business (it owns the template).

The entries are kept as one buffer of compact JSON bytes plus offsets rather than as Python dicts:
665k dicts cost several GB and pickle slowly into every grain worker; one bytes object does neither.
"""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np

from vlm_jax.data import files
from vlm_jax.data.data_config import parse
from vlm_jax.data.formats import config_fields
from vlm_jax.data.records import BadRecord

ROLES = ("human", "gpt")
_READER = "llava_json"


class LlavaJsonSource:
  """Random-access source over one LLaVA-Instruct .json / .jsonl file (a grain data source).

  Args:
    path: the .json (a list of entries) or .jsonl (one entry per line) file.
    image_dir: the folder entries' "image" paths are relative to (LLaVA's `--image_folder`);
      default: the JSON file's folder.

  Raises:
    ValueError: naming the file, if it does not exist or is not a JSON list / JSON lines.
  """

  def __init__(self, path: str | os.PathLike, image_dir: str | os.PathLike | None = None):
    self.path = files.local_path(path)
    if not files.isfile(self.path):
      raise ValueError(f"{_READER}: {self.path!r} is not a file.")
    self.image_dir = os.fspath(image_dir) if image_dir is not None else files.dirname(self.path)
    if not files.isdir(self.image_dir):
      raise ValueError(f"{_READER}: image_dir {self.image_dir!r} is not a directory.")
    self.name = files.basename(self.path)
    raw = files.read_bytes(self.path)
    if raw.lstrip()[:1] == b"[":
      try:
        entries = json.loads(raw)
      except json.JSONDecodeError as e:
        raise ValueError(f"{_READER}: {self.path!r} is not valid JSON: {e}") from None
      del raw
      # Malformed entries stay in (and are skipped and counted when read) so indices match the file.
      blobs = [json.dumps(e, ensure_ascii=False, separators=(",", ":")).encode() for e in entries]
    else:
      # JSON lines: keep each line's bytes unparsed; a bad line is one bad record, not a bad file.
      blobs = [line for line in raw.split(b"\n") if line.strip()]
    self._offsets = np.cumsum([0] + [len(b) for b in blobs], dtype=np.int64)
    self._buffer = b"".join(blobs)

  def __len__(self) -> int:
    return len(self._offsets) - 1

  def __repr__(self) -> str:
    return f"LlavaJsonSource({self.path!r}, image_dir={self.image_dir!r}, {len(self)} entries)"

  def __getitem__(self, index: int) -> dict[str, Any]:
    index = int(index)
    if not 0 <= index < len(self):
      raise IndexError(f"{_READER}: index {index} out of range for {len(self)} entries.")
    where = f"{self.name}:{index}"
    blob = self._buffer[self._offsets[index]:self._offsets[index + 1]]
    try:
      entry = json.loads(blob)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
      raise BadRecord("malformed_json", f"{where}: {e}") from None
    return self.parse(entry, where)

  def parse(self, entry: Any, where: str) -> dict[str, Any]:
    """One entry -> record (layout in the module docstring); raises BadRecord."""
    if not isinstance(entry, dict):
      raise BadRecord("malformed_json", f"{where}: entry is {type(entry).__name__}, not an object")
    if "id" in entry:
      where = f"{where}:{entry['id']}"
    turns = entry.get("conversations")
    if not isinstance(turns, list):
      raise BadRecord("malformed_json", f"{where}: 'conversations' is missing or not a list")
    if not turns:
      raise BadRecord("text_empty", f"{where}: no conversation turns")
    for k, turn in enumerate(turns):
      if not (isinstance(turn, dict) and turn.get("from") in ROLES
              and isinstance(turn.get("value"), str)):
        raise BadRecord("malformed_json", f"{where}: turn {k} is not {{'from': 'human'|'gpt', "
                                          f"'value': str}}: {str(turn)[:80]}")
    image = entry.get("image")
    if isinstance(image, list):  # multi-image formats (LLaVA-NeXT/OneVision) list them
      if len(image) != 1:
        raise BadRecord("image_count_mismatch", f"{where}: {len(image)} images; LLaVA-1.5 "
                                                "conversations have one")
      image = image[0]
    if image is None:
      images = []
    elif isinstance(image, str) and image:
      image_path = files.join_inside(self.image_dir, image)
      if image_path is None:
        raise BadRecord("image_missing", f"{where}: {image!r} points outside image_dir")
      if not files.isfile(image_path):
        raise BadRecord("image_missing", f"{where}: {image_path} does not exist")
      images = [image_path]
    else:
      raise BadRecord("malformed_json", f"{where}: 'image' is {image!r}, not a file name")
    return {"id": where, "images": images,
            "conversations": [{"from": t["from"], "value": t["value"]} for t in turns]}


def make_source(data_config: Any, split: str) -> LlavaJsonSource:
  """The source for `split` from `config.data` fields `path` (a file, or {split: file}) and
  `image_dir` (optional; default the JSON file's folder)."""
  data = parse(data_config)
  image_dir = config_fields.image_dir(data, reader=_READER)
  path = config_fields.split_value(data, "path", split, reader=_READER)
  return LlavaJsonSource(path, image_dir)
