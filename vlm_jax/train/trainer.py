"""The one generic trainer: `train_and_evaluate(config, workdir)`.

Resume order (first that applies): (1) the latest checkpoint in `workdir` (state + data iterator),
(2) fresh init, then weights from `config.init` (a finished earlier stage such as the embedded default's
LM pretraining, run first if needed). Running the same command again therefore continues where a killed
run stopped, with the same data order, and ends with the same result.

`config.baselines` ({name: run config}, optional): runs to compare with this one (configs/lavit.py:
the ViT of the same widths), each trained after it in `<workdir>/<name>` (resuming there too); their
results join this run's results.json as `<name>/<metric>`.
"""

import logging
import os
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from vlm_jax import distributed, sharding
from vlm_jax.data import files, mixture
from vlm_jax.data.pipeline import make_dataset
from vlm_jax.eval.evaluators import build_evaluators
from vlm_jax.models import build_model
from vlm_jax.train import init as init_lib
from vlm_jax.train.checkpointing import Checkpointer, abstract_with_shardings
from vlm_jax.train.losses import MixtureLoss, get_loss
from vlm_jax.train.metrics import MetricLogger
from vlm_jax.train.optimizer import learning_rate_schedule, make_optimizer
from vlm_jax.train.state import TrainState, split_params
from vlm_jax.train.step import make_train_step

RESULTS_FILE = "results.json"


def _dtype(name: str | None):
  return None if name in (None, "", "none") else jnp.dtype(name)


def build_state(config, model, example_inputs: dict, mesh, rules):
  """-> (tx, init_fn(rng) -> sharded TrainState, abstract TrainState with shardings)."""
  rng = jax.random.PRNGKey(config.seed)
  abstract_params = jax.eval_shape(model.init, rng, **example_inputs)["params"]
  abstract_trainable, _ = split_params(abstract_params, config.trainable)
  tx = make_optimizer(config.optimizer, abstract_trainable)
  frozen_dtype = _dtype(config.get("frozen_param_dtype"))

  def init_boxed(rng):
    params = model.init(rng, **example_inputs)["params"]
    trainable, frozen = split_params(params, config.trainable)
    if frozen_dtype is not None:
      frozen = jax.tree.map(lambda x: x.astype(frozen_dtype), frozen)
    return TrainState(jnp.zeros((), jnp.int32), trainable, frozen, tx.init(trainable))

  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    abstract_boxed = jax.eval_shape(init_boxed, rng)
    shardings = sharding.logical_shardings(abstract_boxed, mesh, rules)
  init_fn = jax.jit(lambda r: nn.unbox(init_boxed(r)), out_shardings=shardings)
  abstract = abstract_with_shardings(nn.unbox(abstract_boxed), shardings)
  return tx, init_fn, abstract


def jit_train_step(config, model, tx, abstract_state: TrainState, mesh) -> Callable:
  """The run's jitted train step: `config.loss` (per-component weighted for a concat mixture),
  state donated and kept on its shardings, metrics replicated. Trace it (first call, or `.lower`)
  under `jax.set_mesh(mesh)` and the logical rules, or the models' activation sharding constraints
  are dropped from the compiled step."""
  loss_fn = get_loss(config.loss, config.get("loss_options"))
  weights = mixture.loss_weights(config.data)  # a concat mixture trains on sum_d w_d * loss_d
  train_loss = MixtureLoss(loss_fn, weights) if weights else loss_fn
  state_sharding = jax.tree.map(lambda x: x.sharding, abstract_state)
  return jax.jit(make_train_step(model, tx, train_loss), donate_argnums=(0,),
                 out_shardings=(state_sharding, sharding.replicated(mesh)))


def plain_batches(batch: dict) -> list[dict]:
  """A plain batch {"inputs", "labels"}, or the sub-batches of a concat mixture {name: batch}."""
  return [batch] if "inputs" in batch else list(batch.values())


def _local_tokens(batch: dict) -> int:
  total = 0
  for plain in plain_batches(batch):
    mask = plain["inputs"].get("attention_mask")
    total += int(np.sum(mask)) if mask is not None else int(np.prod(plain["labels"].shape))
  return total


def train_and_evaluate(config, workdir: str) -> tuple[dict, Any]:
  """Train `config` in `workdir` (resuming if it holds a checkpoint); returns (results, final params)."""
  files.makedirs(workdir)
  stage = config.get("name", "train")
  is_chief = distributed.is_chief()  # the one process that writes config.json and results.json
  if is_chief:
    with files.open_file(os.path.join(workdir, "config.json"), "w") as f:
      f.write(config.to_json_best_effort(indent=2))
  mesh = sharding.config_mesh(config)
  logging.info("%s", sharding.describe(mesh))
  rules = sharding.logical_rules(config.get("sharding_rules"))
  model = build_model(*init_lib.model_config(config))
  if config.batch_size % jax.process_count():
    raise ValueError(f"config.batch_size ({config.batch_size}) must be divisible by the number of "
                     f"processes ({jax.process_count()})")
  data_shards = sharding.data_shards(mesh)
  if config.batch_size % data_shards:
    raise ValueError(f"config.batch_size ({config.batch_size}) must be divisible by the data-parallel "
                     f"mesh size config.mesh.data * config.mesh.fsdp = {data_shards}")
  for name, size in mixture.batch_sizes(config.data).items():
    if size % data_shards:
      raise ValueError(f"config.data.mixture.{name}.batch_size ({size}) must be divisible by the "
                       f"data-parallel mesh size {data_shards}")
  local_batch = config.batch_size // jax.process_count()
  train_ds = make_dataset(config.data, split="train", batch_size=local_batch)
  example = next(iter(train_ds))
  # Params do not depend on text length or image count: any mixture component's shapes will do.
  example_inputs = jax.tree.map(lambda x: jnp.asarray(x[:1]), plain_batches(example)[0]["inputs"])
  tx, init_fn, abstract_state = build_state(config, model, example_inputs, mesh, rules)
  if mesh.shape["fsdp"] > 1:  # fail before allocating if big params would sit whole on every device
    sharding.check_replication(abstract_state.params, mesh,
                               config.get("max_replicated_fraction", 0.05))
  train_iter = iter(train_ds)

  ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), max_to_keep=config.checkpoint.max_to_keep,
                      save_every=config.checkpoint.every_steps,
                      async_save=config.checkpoint.get("async_save", True))
  latest = ckpt.latest_step()
  # Restore is collective: processes that disagree on the step would hang (or mix two states).
  distributed.assert_same_on_all_processes(-1 if latest is None else latest,
                                           f"the latest checkpoint step in {ckpt.directory}")
  if latest is not None:
    logging.info("[%s] resuming from checkpoint step %d in %s", stage, latest, workdir)
    state = ckpt.restore(latest, abstract_state, train_iter)
  else:
    state = init_fn(jax.random.PRNGKey(config.seed))
    state = init_lib.load_initial_weights(config, workdir, state, abstract_state)

  p_step = jit_train_step(config, model, tx, abstract_state, mesh)
  evaluators = build_evaluators(config, model, mesh, rules,
                                get_loss(config.loss, config.get("loss_options")))
  schedule = learning_rate_schedule(config.optimizer)
  logger = MetricLogger(workdir, config.total_steps, prefix=f"[{stage}] ")
  base_rng = jax.random.PRNGKey(config.seed + 1)

  step = int(jax.device_get(state.step))
  first_step = step
  pending: list[dict] = []

  def check_and_log(step: int) -> dict:
    fetched = jax.device_get(pending)
    pending.clear()
    for i, m in enumerate(fetched):
      if not bool(m["finite"]):
        bad = step - len(fetched) + i + 1
        raise FloatingPointError(
          f"[{stage}] non-finite loss or gradient at step {bad} (loss={float(m['loss'])}, "
          f"grad_norm={float(m['grad_norm'])}); stopping. The last good checkpoint is step "
          f"{ckpt.latest_step()} in {ckpt.directory}.")
    per_component = sorted(k for k in fetched[0] if k.startswith("loss/"))
    keys = ("loss", "grad_norm", "token_accuracy", *per_component)
    scalars = {k: float(np.mean([m[k] for m in fetched])) for k in keys}
    scalars["learning_rate"] = float(schedule(step))
    logger.log_train(step, scalars)
    if hasattr(train_iter, "counters"):  # records seen / skipped per reason, summed over processes
      counts = distributed.sum_counts(train_iter.counters())
      logger.write_scalars(step, {f"data/{k}": v for k, v in counts.items()})
    return scalars

  last_scalars: dict = {}
  try:
    while step < config.total_steps:
      local = next(train_iter)
      batch = sharding.global_batch(local, mesh)
      with jax.profiler.StepTraceAnnotation("train", step_num=step):
        # Traced (first call) inside the mesh and rules, or the models' activation sharding
        # constraints are dropped from the compiled step.
        with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
          state, metrics = p_step(state, batch, jax.random.fold_in(base_rng, step))
      step += 1
      pending.append(metrics)
      logger.count_tokens(_local_tokens(local) * jax.process_count())
      if step == first_step + 1:
        jax.block_until_ready(metrics)
        logger.start(step)
      save_due = step % config.checkpoint.every_steps == 0 or step == config.total_steps
      if step % config.log_every == 0 or save_due or step == config.total_steps:
        last_scalars = check_and_log(step)  # raises before a non-finite state could be saved
      if save_due:
        ckpt.save(step, state, train_iter, force=step == config.total_steps)
      if config.get("eval_every") and step % config.eval_every == 0 and step < config.total_steps:
        logger.write_scalars(step, _run_evals(evaluators, state.params, stage))
  finally:
    ckpt.close()

  results_path = os.path.join(workdir, RESULTS_FILE)
  if step == first_step:  # nothing trained: a finished run's results stand, no need to evaluate
    finished = None
    if is_chief and files.exists(results_path):
      finished = files.read_json(results_path)
    # Evaluations are collective, so every process must take the chief's decision (the others may
    # not even see its results.json).
    finished = distributed.broadcast_from_chief(finished)
    if finished is not None and finished.get("step") == step:
      logger.close()
      return finished, state.params
  t0 = time.perf_counter()
  results = {"step": step, **_run_evals(evaluators, state.params, stage)}
  if last_scalars:
    results["train/loss"] = last_scalars["loss"]
  logging.info("[%s] final evaluation (%.1fs): %s", stage, time.perf_counter() - t0,
               {k: round(v, 4) for k, v in results.items() if isinstance(v, float)})
  logger.write_scalars(step, {k: v for k, v in results.items() if k != "step"})
  logger.close()
  for name, other in sorted(dict(config.get("baselines") or {}).items()):
    compared, _ = train_and_evaluate(other, os.path.join(workdir, name))
    results.update({f"{name}/{k}": v for k, v in compared.items()})
  if is_chief:
    files.write_json(results_path, results)
  return results, state.params


def _run_evals(evaluators, params, stage: str) -> dict:
  out = {}
  for ev in evaluators:
    t0 = time.perf_counter()
    res = ev.run(params)
    logging.info("[%s] eval %s (%.1fs): %s", stage, ev.name, time.perf_counter() - t0,
                 {k: round(v, 4) for k, v in res.items()})
    out.update(res)
  return out
