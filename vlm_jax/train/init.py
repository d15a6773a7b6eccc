"""Initial weights for a fresh run (no checkpoint in the workdir yet), from `config.init`.

- `config.init.stage`: a complete run config for an earlier stage (the embedded Flamingo default first
  trains its own tiny LM on the corpus text, since a fresh machine has no pretrained LM). It is trained in
  `<workdir>/<stage.name>` (resuming there too) and its final params are copied under
  `config.init.stage_prefix` (e.g. `lm/`) of this run's params.
Every copied param must exist in this run's state with the same shape: nothing is silently dropped.
"""

import logging
import os
from typing import Any

import jax

from vlm_jax.param_paths import flatten, unflatten
from vlm_jax.train.state import TrainState


def load_initial_weights(config, workdir: str, state: TrainState, abstract_state: TrainState
                         ) -> TrainState:
  init = config.get("init") or {}
  stage = init.get("stage")
  if not stage:
    return state
  from vlm_jax.train import trainer  # pylint: disable=g-import-not-at-top  (trainer imports us)

  stage_dir = os.path.join(workdir, stage.name)
  logging.info("init: stage %r in %s", stage.name, stage_dir)
  _, params = trainer.train_and_evaluate(stage, stage_dir)
  prefix = init.get("stage_prefix", "")
  loaded = {f"{prefix}/{k}" if prefix else k: v for k, v in flatten(params).items()}
  return overwrite_params(state, abstract_state, loaded, source=f"stage {stage.name!r}")


def overwrite_params(state: TrainState, abstract_state: TrainState, loaded: dict[str, Any], *,
                     source: str) -> TrainState:
  """Replace params at the flat paths of `loaded`, placed on the target shardings."""
  parts = {"trainable": (flatten(state.trainable), flatten(abstract_state.trainable)),
           "frozen": (flatten(state.frozen), flatten(abstract_state.frozen))}
  for path, value in loaded.items():
    owner = next((name for name, (flat, _) in parts.items() if path in flat), None)
    if owner is None:
      raise KeyError(f"{source}: param {path!r} has no counterpart in this model")
    flat, abstract = parts[owner]
    target = abstract[path]
    if tuple(value.shape) != tuple(target.shape):
      raise ValueError(f"{source}: param {path!r} has shape {tuple(value.shape)}, this model "
                       f"expects {tuple(target.shape)}")
    flat[path] = jax.device_put(value.astype(target.dtype), target.sharding)
  logging.info("init: copied %d params from %s", len(loaded), source)
  return state.replace(trainable=unflatten(parts["trainable"][0]),
                       frozen=unflatten(parts["frozen"][0]))
