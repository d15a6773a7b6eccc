"""Losses, looked up by name from `config.loss`.

`next_token_ce`: labels are aligned with input_ids (HF convention, ignore = -100); the loss shifts:
logits[:, t] predicts labels[:, t + 1]. Mean over the valid tokens of the batch, computed in float32.

A loss from the registry is a function of (logits, labels). The train step needs a loss of the
model on a batch: `batch_loss` lifts one to that for a plain batch, and `MixtureLoss` is one for a
concat-mixture batch {name: plain batch} (`vlm_jax.data.mixture`).
"""

import dataclasses
from collections.abc import Mapping
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

# apply_fn(**batch["inputs"]) -> (logits, aux): the model with its params bound.
ApplyFn = Callable[..., tuple[jax.Array, dict]]


@dataclasses.dataclass(frozen=True)
class MixtureLoss:
  """The loss of a concat-mixture batch {name: {"inputs", "labels"}}, OpenFlamingo's LAION + MMC4
  step:

    L = sum_d w_d * L_d,    L_d = loss_fn(model(inputs_d), labels_d)

  with each L_d a mean over component d's own valid tokens (OpenFlamingo's `loss_laion * w_laion +
  loss_mmc4 * w_mmc4`), so a component's share of the gradient is its weight, whatever the number of
  tokens in its sub-batch. The model runs once per sub-batch, each at its own shapes.

  __call__(apply_fn, batch) -> (L, aux): aux["num_tokens"] / ["correct"] summed over components
  (token accuracy over all of them) and aux["loss/<name>"] = L_d.
  """

  loss_fn: Callable[[jax.Array, jax.Array], tuple[jax.Array, dict]]
  weights: Mapping[str, float]

  def __call__(self, apply_fn: ApplyFn, batch: Mapping[str, dict]) -> tuple[jax.Array, dict]:
    if set(batch) != set(self.weights):
      raise ValueError(f"mixture batch has components {sorted(batch)}, but the loss weights name "
                       f"{sorted(self.weights)}")
    single = batch_loss(self.loss_fn)
    total, aux = jnp.zeros((), jnp.float32), {"num_tokens": 0, "correct": 0}
    for name, weight in self.weights.items():
      loss, part = single(apply_fn, batch[name])
      total = total + weight * loss
      aux["num_tokens"] = aux["num_tokens"] + part["num_tokens"]
      aux["correct"] = aux["correct"] + part["correct"]
      aux[f"loss/{name}"] = loss
    return total, aux


def batch_loss(loss_fn: Callable) -> Callable[[ApplyFn, dict], tuple[jax.Array, dict]]:
  """loss_fn(logits, labels) -> loss(apply_fn, batch) of the model on a plain batch
  {"inputs", "labels"}; a `MixtureLoss` is returned as it is (it already takes the batch)."""
  if isinstance(loss_fn, MixtureLoss):
    return loss_fn

  def loss(apply_fn: ApplyFn, batch: dict) -> tuple[jax.Array, dict]:
    logits, _ = apply_fn(**batch["inputs"])
    return loss_fn(logits, batch["labels"])

  return loss


def get_loss(name: str) -> Callable:
  if name not in LOSSES:
    raise ValueError(f"config.loss {name!r} is not one of {sorted(LOSSES)}")
  return LOSSES[name]
