"""Losses, looked up by name from `config.loss`.

`next_token_ce`: labels are aligned with input_ids (HF convention, ignore = -100); the loss shifts:
logits[:, t] predicts labels[:, t + 1]. Mean over the valid tokens of the batch, computed in float32.
"""

from typing import Callable

import jax
import jax.numpy as jnp
import optax

IGNORE = -100


def next_token_ce(logits: jax.Array, labels: jax.Array) -> tuple[jax.Array, dict]:
  """logits: float[B, T, V]; labels: int32[B, T] -> (scalar loss, {"num_tokens", "correct"})."""
  logits = logits[:, :-1].astype(jnp.float32)
  targets = labels[:, 1:]
  valid = targets != IGNORE
  safe = jnp.where(valid, targets, 0)
  ce = optax.softmax_cross_entropy_with_integer_labels(logits, safe)
  n = valid.sum()
  loss = jnp.where(valid, ce, 0.0).sum() / jnp.maximum(n, 1)
  correct = jnp.where(valid, logits.argmax(-1) == safe, False).sum()
  return loss, {"num_tokens": n, "correct": correct}


LOSSES: dict[str, Callable] = {"next_token_ce": next_token_ce}


def get_loss(name: str) -> Callable:
  if name not in LOSSES:
    raise ValueError(f"config.loss {name!r} is not one of {sorted(LOSSES)}")
  return LOSSES[name]
