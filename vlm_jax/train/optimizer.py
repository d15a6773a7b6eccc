"""Optimizer from config: AdamW with warmup then constant or cosine, global-norm clipping, weight decay
only on params matching `config.optimizer.weight_decay_regex` (OpenFlamingo: the xattn blocks), and
gradient row masks that train only some rows of an embedding table (OpenFlamingo trains only the `<image>`
and `<|endofchunk|>` rows of the LM input embedding).

The chain is applied to the trainable subtree only (see `vlm_jax.train.state`), so frozen params have no
optimizer state at all.
"""

from typing import Any, Mapping, Sequence

import jax.numpy as jnp
import optax

from vlm_jax.param_paths import flatten, unflatten
from vlm_jax.train.state import path_mask


def learning_rate_schedule(cfg) -> optax.Schedule:
  """`cfg.schedule` in {constant, cosine}, linear warmup over `cfg.warmup_steps` first."""
  warmup = int(cfg.warmup_steps)
  if cfg.schedule == "constant":
    main = optax.constant_schedule(cfg.learning_rate)
  elif cfg.schedule == "cosine":
    main = optax.cosine_decay_schedule(cfg.learning_rate, max(1, int(cfg.total_steps) - warmup),
                                       alpha=float(cfg.get("end_lr_fraction", 0.0)))
  else:
    raise ValueError(f"config.optimizer.schedule must be 'constant' or 'cosine', got {cfg.schedule!r}")
  if warmup <= 0:
    return main
  return optax.join_schedules([optax.linear_schedule(0.0, cfg.learning_rate, warmup), main], [warmup])


def mask_embedding_rows(rows_by_path: Mapping[str, Sequence[int]]) -> optax.GradientTransformation:
  """Zero the gradient of every row of the named tables except the listed rows.

  rows_by_path: {"lm/embed/embedding": [media_id, eoc_id]}. Paths must be trainable params.
  """

  def init_fn(params):
    flat = flatten(params)
    for path in rows_by_path:
      if path not in flat:
        raise ValueError(f"config.optimizer.trainable_rows names {path!r}, which is not a trainable "
                         f"param (trainable: {sorted(flat)[:5]}...)")
    return optax.EmptyState()

  def update_fn(updates, state, params=None):
    del params
    flat = flatten(updates)
    for path, rows in rows_by_path.items():
      g = flat[path]
      keep = jnp.zeros((g.shape[0],) + (1,) * (g.ndim - 1), g.dtype).at[jnp.asarray(rows)].set(1)
      flat[path] = g * keep
    return unflatten(flat), state

  return optax.GradientTransformation(init_fn, update_fn)


def make_optimizer(cfg, trainable_params: Any) -> optax.GradientTransformation:
  """config.optimizer -> the full gradient transformation for `trainable_params`."""
  if cfg.name != "adamw":
    raise ValueError(f"config.optimizer.name must be 'adamw', got {cfg.name!r}")
  chain = []
  rows = dict(cfg.get("trainable_rows") or {})
  if rows:
    chain.append(mask_embedding_rows({k: list(v) for k, v in rows.items()}))
  if cfg.get("grad_clip_norm"):
    chain.append(optax.clip_by_global_norm(cfg.grad_clip_norm))
  wd_mask = path_mask(trainable_params, cfg.get("weight_decay_regex"))
  chain.append(optax.adamw(learning_rate_schedule(cfg), b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
                           weight_decay=cfg.weight_decay, mask=wd_mask))
  return optax.chain(*chain)
