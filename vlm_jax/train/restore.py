"""Params for evaluation and inference (`--mode=eval`, `python -m vlm_jax.generate`): the model of a
config with its params on the config's mesh, without an optimizer.

Where the params come from (the first that applies):
  1. an explicit `checkpoint` directory: a converted checkpoint (it holds `model.json`, written by
     `python -m vlm_jax.convert`) or a training workdir (it holds `checkpoints/`);
  2. the latest training checkpoint in `workdir` (what `--mode=train` wrote there);
  3. `config.init.checkpoint` (a converted checkpoint; with `config.model_name=""` its model.json also
     gives the model config).
Training checkpoints are read partially: only `state.trainable` and `state.frozen`, in their stored
dtypes, straight onto the shardings the model's logical axis names give on the mesh; the optimizer
state is never read. Every param of the model must be found; a missing one is an error naming it.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

from vlm_jax import converted, paths, sharding
from vlm_jax.models import build_model
from vlm_jax.param_paths import flatten, matching, unflatten
from vlm_jax.train import init as init_lib
from vlm_jax.train.checkpointing import Checkpointer
from vlm_jax.train.state import TrainState


@dataclasses.dataclass
class Loaded:
  model: nn.Module
  params: Any
  mesh: jax.sharding.Mesh
  rules: tuple
  step: int      # the training step of the checkpoint (0 for a converted checkpoint)
  source: str    # where the params came from, for logs and results.json


def example_inputs(model: nn.Module) -> dict[str, jax.Array]:
  """Smallest inputs `model.init` accepts (params do not depend on text length or image count)."""
  ids = jnp.zeros((1, 8), jnp.int32)
  mask = jnp.ones((1, 8), jnp.int32)
  vision = getattr(model, "vision", None)
  if vision is not None and hasattr(model, "media_token_id"):  # Flamingo
    size = int(dict(vision).get("image_size", 224))
    return {"vision_x": jnp.zeros((1, 1, size, size, 3), jnp.float32), "input_ids": ids,
            "attention_mask": mask}
  if hasattr(model, "vocab_size"):  # a decoder LM
    return {"input_ids": ids, "attention_mask": mask}
  raise ValueError(f"no example inputs for {type(model).__module__}.{type(model).__name__}; "
                   "evaluation supports Flamingo models and decoder LMs")


def abstract_params(model: nn.Module, mesh, rules) -> dict[str, jax.ShapeDtypeStruct]:
  """Flat {path: ShapeDtypeStruct} of the model's params, carrying their mesh shardings."""
  ex = example_inputs(model)
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    boxed = jax.eval_shape(lambda r: model.init(r, **ex)["params"], jax.random.PRNGKey(0))
    shardings = sharding.logical_shardings(boxed, mesh, rules)
  flat, flat_sh = flatten(nn.unbox(boxed)), flatten(shardings)
  return {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=flat_sh[k]) for k, v in flat.items()}


def _check_complete(flat: dict, targets: dict, source: str) -> None:
  missing = sorted(k for k in targets if k not in flat)
  if missing:
    raise KeyError(f"{source}: {len(missing)} params of the model are missing, e.g. {missing[:6]} "
                   "(another config preset, or a scan_layers setting other than at training?)")
  wrong = [f"{k}: stored {tuple(flat[k].shape)}, model {targets[k].shape}" for k in targets
           if tuple(flat[k].shape) != tuple(targets[k].shape)]
  if wrong:
    raise ValueError(f"{source}: shapes differ from the model's: {wrong[:6]}")


def _from_train_checkpoint(workdir: str, targets: dict) -> tuple[dict, int]:
  ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), max_to_keep=1, save_every=1,
                      async_save=False)
  try:
    step = ckpt.latest_step()
    flat = ckpt.restore_params(step, {k: v.sharding for k, v in targets.items()})
  finally:
    ckpt.close()
  unknown = sorted(set(flat) - set(targets))
  if unknown:
    raise KeyError(f"{workdir}: checkpoint params {unknown[:6]} are not in this model")
  _check_complete(flat, targets, f"{workdir} step {step}")
  return flat, step


def _from_converted(directory: str, prefix: str, model: nn.Module, targets: dict) -> dict:
  # The trainer's loader does the name checks and the per-layer -> scanned stacking; a state whose
  # leaves are all abstract tells, after loading, which params the checkpoint did not provide.
  abstract = TrainState(jax.ShapeDtypeStruct((), jnp.int32), {}, unflatten(dict(targets)), None)
  stacks = model.layer_stacks() if hasattr(model, "layer_stacks") else ()
  state = init_lib.load_converted_checkpoint(directory, prefix, abstract, abstract, stacks)
  flat = {k: v for k, v in flatten(state.frozen).items() if isinstance(v, jax.Array)}
  _check_complete(flat, targets, directory)
  return flat


def _has_train_checkpoint(workdir: str | None) -> bool:
  directory = os.path.join(workdir, "checkpoints") if workdir else None
  return bool(directory and os.path.isdir(directory) and any(
    name.isdigit() for name in os.listdir(directory)))


def load_for_eval(config, workdir: str | None = None, checkpoint: str | None = None) -> Loaded:
  """The model of `config` and its params from `checkpoint`, `workdir` or `config.init.checkpoint`."""
  mesh = sharding.config_mesh(config)
  rules = sharding.logical_rules(config.get("sharding_rules"))
  init = dict(config.get("init") or {})
  converted_dir, train_dir = None, None
  if checkpoint:
    if os.path.exists(os.path.join(checkpoint, converted.MODEL_JSON)):
      converted_dir = checkpoint
    elif _has_train_checkpoint(checkpoint):
      train_dir = checkpoint
    else:
      raise FileNotFoundError(f"--checkpoint={checkpoint}: neither a converted checkpoint (no "
                              f"{converted.MODEL_JSON}) nor a training workdir (no checkpoints/<step>)")
  elif _has_train_checkpoint(workdir):
    train_dir = workdir
  elif init.get("checkpoint"):
    converted_dir = init["checkpoint"]
  else:
    where = f"{workdir}/checkpoints holds no checkpoint" if workdir else "no checkpoint was given"
    raise FileNotFoundError(f"nothing to evaluate: {where} and config.init.checkpoint is unset; "
                            "train first (--mode=train with the same --workdir), or pass a "
                            "converted model (config.init.checkpoint / --checkpoint)")
  if converted_dir and not config.model_name:
    stored = converted.read_model_config(converted_dir)
    name, kwargs = stored["model_name"], stored["model"]
  else:
    name, kwargs = config.model_name, dict(config.model)
  if not name:
    raise ValueError("config.model_name is empty and no converted checkpoint gives the model")
  model = build_model(name, kwargs)
  targets = abstract_params(model, mesh, rules)
  if train_dir:
    flat, step = _from_train_checkpoint(train_dir, targets)
    source = f"{paths.resolve(train_dir)}/checkpoints/{step}"
  else:
    flat, step = _from_converted(converted_dir, init.get("checkpoint_prefix", "") if
                                 converted_dir == init.get("checkpoint") else "", model, targets), 0
    source = paths.resolve(converted_dir)
    dtype = config.get("frozen_param_dtype")
    if dtype not in (None, "", "none"):  # as training would hold them
      frozen = set(flat) - matching(flat, config.trainable)
      flat = {k: v.astype(dtype) if k in frozen else v for k, v in flat.items()}
  logging.info("loaded %d params of %s from %s", len(flat), name, source)
  return Loaded(model, unflatten(flat), mesh, rules, step, source)
