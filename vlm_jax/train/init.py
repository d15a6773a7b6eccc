"""Initial weights for a fresh run (no checkpoint in the workdir yet), from `config.init`.

- `config.init.stage`: a complete run config for an earlier stage (the embedded Flamingo default first
  trains its own tiny LM on the corpus text, since a fresh machine has no pretrained LM). It is trained in
  `<workdir>/<stage.name>` (resuming there too) and its final params are copied under
  `config.init.stage_prefix` (e.g. `lm/`) of this run's params.
- `config.init.checkpoint`: a directory written by `python -m vlm_jax.convert` (converted HF / OpenFlamingo
  / LLaVA weights); its params are restored straight onto this run's shardings under
  `config.init.checkpoint_prefix` (e.g. `lm/` to start a Flamingo from a converted LM; "" for a whole
  model). Params of this run that the checkpoint lacks keep their fresh init (and are logged).
Every copied param must exist in this run's state with the same shape: nothing is silently dropped.
"""

import logging
import os
from typing import Any

import jax

from vlm_jax import converted
from vlm_jax.param_paths import flatten, unflatten
from vlm_jax.train.state import TrainState


def model_config(config) -> tuple[str, dict]:
  """(model_name, model kwargs): from the config, or, when `config.model_name` is empty and
  `config.init.checkpoint` names a converted checkpoint of a whole model, from its model.json."""
  init = config.get("init") or {}
  if config.model_name or not init.get("checkpoint"):
    return config.model_name, dict(config.model)
  if init.get("checkpoint_prefix"):
    raise ValueError("config.model_name is empty but config.init.checkpoint_prefix is set: a prefixed "
                     "checkpoint is part of a larger model, which the config must describe")
  stored = converted.read_model_config(init.checkpoint)
  logging.info("init: model %r from %s", stored["model_name"], init.checkpoint)
  return stored["model_name"], stored["model"]


def load_initial_weights(config, workdir: str, state: TrainState, abstract_state: TrainState
                         ) -> TrainState:
  init = config.get("init") or {}
  if init.get("checkpoint"):
    state = load_converted_checkpoint(init.checkpoint, init.get("checkpoint_prefix", ""), state,
                                      abstract_state)
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


def load_converted_checkpoint(directory: str, prefix: str, state: TrainState,
                              abstract_state: TrainState) -> TrainState:
  """Restore a converted checkpoint's params onto the shardings of this run's params at `prefix`."""
  targets = {**flatten(abstract_state.trainable), **flatten(abstract_state.frozen)}

  def ours(path):
    return f"{prefix.rstrip('/')}/{path}" if prefix else path
  stored = converted.stored_shapes(directory)
  absent = sorted(p for p in stored if ours(p) not in targets)
  if absent:
    raise KeyError(f"{directory}: params {[ours(p) for p in absent[:8]]} have no counterpart in this "
                   "model (wrong config preset, or config.init.checkpoint_prefix?)")
  wrong = [f"{ours(p)}: stored {s}, model {tuple(targets[ours(p)].shape)}"
           for p, (s, _) in stored.items() if s != tuple(targets[ours(p)].shape)]
  if wrong:
    raise ValueError(f"{directory}: shapes differ from this model's: {wrong[:8]}")
  params = converted.load_converted(directory, {p: targets[ours(p)].sharding for p in stored})
  untouched = sorted(k for k in targets if (k.startswith(prefix) if prefix else True)
                     and k not in {ours(p) for p in stored})
  if untouched:
    logging.info("init: %d params under %r are not in %s and keep their init, e.g. %s",
                 len(untouched), prefix, directory, untouched[:4])
  loaded = {ours(p): v for p, v in flatten(params).items()}
  return overwrite_params(state, abstract_state, loaded, source=directory)


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
