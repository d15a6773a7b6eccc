"""Initial weights for a fresh run (no checkpoint in the workdir yet), from `config.init`.

- `config.init.stage`: a complete run config for an earlier stage (the embedded Flamingo default first
  trains its own tiny LM on the corpus text, since a fresh machine has no pretrained LM). It is trained in
  `<workdir>/<stage.name>` (resuming there too) and its final params are copied under
  `config.init.stage_prefix` (e.g. `lm/`) of this run's params.
- `config.init.checkpoint`: a directory written by `python -m vlm_jax.convert` (converted HF / OpenFlamingo
  / LLaVA weights); its params are restored straight onto this run's shardings under
  `config.init.checkpoint_prefix` (e.g. `lm/` to start a Flamingo from a converted LM; "" for a whole
  model). Params of this run that the checkpoint lacks keep their fresh init (and are logged).
- `config.init.checkpoints`: {prefix: directory}, converted parts loaded the same way (LLaVA stage 1:
  a converted CLIP under `vision` and a converted LM under `lm`).
Every copied param must exist in this run's state with the same shape: nothing is silently dropped.
Converted checkpoints (and earlier stages) hold per-layer params (`lm/layers_3/...`); when this
run's model scans its layers (`scan_layers`, `model.layer_stacks()`), they are stacked into its
`lm/layers/...` params, which must then receive every layer of the stack.
"""

import logging
import os
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec

from vlm_jax import converted
from vlm_jax.models import build_model
from vlm_jax.param_paths import LayerStack, flatten, layer_slots, unflatten
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
  if not init.get("checkpoint") and not init.get("stage") and not init.get("checkpoints"):
    return state
  model = build_model(*model_config(config))
  stacks = model.layer_stacks() if hasattr(model, "layer_stacks") else ()
  # Params a model derives from others it loaded (LLaVA-FlexAttn's k_hd / v_hd from k / v).
  complete = getattr(model, "complete_loaded", None)
  if init.get("checkpoint"):
    state = load_converted_checkpoint(init.checkpoint, init.get("checkpoint_prefix", ""), state,
                                      abstract_state, stacks, complete)
  for prefix, directory in sorted(dict(init.get("checkpoints") or {}).items()):
    state = load_converted_checkpoint(directory, prefix, state, abstract_state, stacks, complete)
  stage = init.get("stage")
  if not stage:
    return state
  from vlm_jax.train import trainer  # pylint: disable=g-import-not-at-top  (trainer imports us)

  stage_dir = os.path.join(workdir, stage.name)
  logging.info("init: stage %r in %s", stage.name, stage_dir)
  _, params = trainer.train_and_evaluate(stage, stage_dir)
  prefix = init.get("stage_prefix", "")
  loaded = {f"{prefix}/{k}" if prefix else k: v for k, v in flatten(params).items()}
  targets = {**flatten(abstract_state.trainable), **flatten(abstract_state.frozen)}
  loaded = stack_rows(loaded, targets, layer_slots(targets, stacks), source=f"stage {stage.name!r}")
  if complete is not None:
    loaded = complete(loaded, targets)
  return overwrite_params(state, abstract_state, loaded, source=f"stage {stage.name!r}")


def load_converted_checkpoint(directory: str, prefix: str, state: TrainState,
                              abstract_state: TrainState,
                              stacks: tuple[LayerStack, ...] = (), complete=None) -> TrainState:
  """Restore a converted checkpoint's params onto the shardings of this run's params at `prefix`;
  per-layer params of a scanned stack (`stacks`) are stacked into it. complete(loaded, targets)
  -> loaded: the model's derived params (`complete_loaded`), before the untouched ones are logged."""
  targets = {**flatten(abstract_state.trainable), **flatten(abstract_state.frozen)}
  slots = layer_slots(targets, stacks)  # per-layer path -> (stacked path, row)

  def ours(path):
    return f"{prefix.rstrip('/')}/{path}" if prefix else path

  def target_shape(path):
    if path in targets:
      return tuple(targets[path].shape)
    return tuple(targets[slots[path][0]].shape[1:]) if path in slots else None
  stored = converted.stored_shapes(directory)
  absent = sorted(p for p in stored if target_shape(ours(p)) is None)
  if absent:
    raise KeyError(f"{directory}: params {[ours(p) for p in absent[:8]]} have no counterpart in this "
                   "model (wrong config preset, or config.init.checkpoint_prefix?)")
  wrong = [f"{ours(p)}: stored {s}, model {target_shape(ours(p))}"
           for p, (s, _) in stored.items() if s != target_shape(ours(p))]
  if wrong:
    raise ValueError(f"{directory}: shapes differ from this model's: {wrong[:8]}")
  params = converted.load_converted(directory, {p: _restore_sharding(ours(p), targets, slots)
                                                for p in stored})
  loaded = {ours(p): v for p, v in flatten(params).items()}
  loaded = stack_rows(loaded, targets, slots, source=directory)
  if complete is not None:
    loaded = complete(loaded, targets)
  untouched = sorted(k for k in targets if (k.startswith(prefix) if prefix else True)
                     and k not in loaded)
  if untouched:
    logging.info("init: %d params under %r are not in %s and keep their init, e.g. %s",
                 len(untouched), prefix, directory, untouched[:4])
  return overwrite_params(state, abstract_state, loaded, source=directory)


def _restore_sharding(path: str, targets: dict, slots: dict) -> jax.sharding.Sharding:
  """Where to restore a stored param: its target's sharding, or for one row of a stacked target,
  that sharding without the leading layer axis."""
  if path in targets:
    return targets[path].sharding
  sharding = targets[slots[path][0]].sharding
  if isinstance(sharding, NamedSharding):
    return NamedSharding(sharding.mesh, PartitionSpec(*sharding.spec[1:]))
  return jax.sharding.SingleDeviceSharding(jax.devices()[0])


def stack_rows(loaded: dict[str, Any], targets: dict[str, Any], slots: dict[str, tuple[str, int]],
               *, source: str) -> dict[str, Any]:
  """Per-layer params that this model holds stacked (`slots`) -> its stacked params; a stack must
  get all of its layers (a stacked param cannot keep its init for some rows)."""
  rows: dict[str, dict[int, Any]] = {}
  out = {}
  for path, value in loaded.items():
    if path in targets or path not in slots:
      out[path] = value
    else:
      stacked, row = slots[path]
      rows.setdefault(stacked, {})[row] = value
  for stacked, got in rows.items():
    n = targets[stacked].shape[0]
    if sorted(got) != list(range(n)):
      layers = sorted(p for p, (s, _) in slots.items() if s == stacked)
      lacking = [p for p in layers if slots[p][1] not in got]
      raise KeyError(f"{source}: the scanned param {stacked!r} needs all {n} layers, but "
                     f"{lacking[:4]} are missing")
    stack = jax.jit(lambda *r: jnp.stack(r), out_shardings=targets[stacked].sharding)
    out[stacked] = stack(*[got[i] for i in range(n)])
  return out


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
