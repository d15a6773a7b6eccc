"""A converted checkpoint on disk: what `python -m vlm_jax.convert` writes and `config.init.checkpoint`
reads (on the ground floor because both `convert` and `train` use it).

  DIR/model.json   {"format": 1, "model_name": "llama" | "flamingo" | ..., "model": {kwargs of Model},
                    "source": what it was converted from, ...}
  DIR/params/      an orbax (tensorstore) checkpoint of the param tree, written shard by shard, so a
                   sharded model is saved (and restored) without gathering it on one host.
"""

import json
import os
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from vlm_jax import paths
from vlm_jax.param_paths import flatten, unflatten

FORMAT = 1
MODEL_JSON = "model.json"
PARAMS = "params"


def _plain(obj):
  """ml_collections / numpy values -> JSON-able Python values."""
  if isinstance(obj, dict) or hasattr(obj, "items"):
    return {k: _plain(v) for k, v in obj.items()}
  if isinstance(obj, (list, tuple)):
    return [_plain(v) for v in obj]
  if isinstance(obj, np.generic):
    return obj.item()
  return obj


def save_converted(out: str, model_name: str, model_kwargs: dict, params: Any, **info) -> None:
  """Write `params` (jax Arrays, possibly sharded) and the model config into `out`."""
  out = paths.resolve(out)
  path = os.path.join(out, PARAMS)
  if os.path.exists(path):
    raise FileExistsError(f"{path} exists; choose an empty --out directory")
  os.makedirs(out, exist_ok=True)
  # Uncompressed: tensorstore's zstd buffers cost +0.5x the params in host memory at save time (a
  # 1.1B bf16 LM peaked at 3.98 GB instead of 2.69 GB) and weights barely compress.
  checkpointer = ocp.Checkpointer(ocp.PyTreeCheckpointHandler(use_compression=False))
  checkpointer.save(path, args=ocp.args.PyTreeSave(params))
  if jax.process_index() == 0:
    dtypes = sorted({str(x.dtype) for x in flatten(params).values()})
    config = {"format": FORMAT, "model_name": model_name, "model": _plain(model_kwargs),
              "param_dtypes": dtypes, **_plain(info)}
    tmp = os.path.join(out, MODEL_JSON + ".tmp")
    with open(tmp, "w") as f:
      json.dump(config, f, indent=2, sort_keys=True)
    os.replace(tmp, os.path.join(out, MODEL_JSON))  # written last: its presence means complete


def read_model_config(directory: str) -> dict:
  file = os.path.join(directory, MODEL_JSON)
  if not os.path.exists(file):
    raise FileNotFoundError(f"{directory}: no {MODEL_JSON}; not a directory written by "
                            "`python -m vlm_jax.convert` (or the conversion did not finish)")
  with open(file) as f:
    config = json.load(f)
  if config.get("format") != FORMAT:
    raise ValueError(f"{file}: format {config.get('format')!r}, this vlm_jax reads format {FORMAT}")
  return config


def stored_shapes(directory: str) -> dict[str, tuple[tuple[int, ...], Any]]:
  """Flat `{param path: (shape, dtype)}` from the checkpoint's metadata, without reading tensors."""
  meta = ocp.StandardCheckpointer().metadata(os.path.join(paths.resolve(directory), PARAMS))
  return {k: (tuple(v.shape), v.dtype) for k, v in flatten(meta.item_metadata.tree).items()}


def load_converted(directory: str, shardings: dict[str, jax.sharding.Sharding] | None = None) -> Any:
  """The stored param tree; `shardings` (flat path -> Sharding) places params directly on their
  shards, params without one land on the default device."""
  shapes = stored_shapes(directory)
  shardings = shardings or {}
  default = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  target = unflatten({k: jax.ShapeDtypeStruct(s, d, sharding=shardings.get(k, default))
                      for k, (s, d) in shapes.items()})
  return ocp.StandardCheckpointer().restore(os.path.join(paths.resolve(directory), PARAMS), target)
