"""The jitted train step: pure function of (state, batch, rng), state donated.

Gradients are taken with respect to `state.trainable` only; frozen params enter as constants, so XLA does
not compute (or keep activations for) gradients of frozen towers beyond what the trainable params need.
A step whose loss or gradient norm is not finite leaves params and optimizer state unchanged and reports
`finite = False`; the host loop stops on it before the next checkpoint (`vlm_jax.train.trainer`).
"""

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

from vlm_jax.train.losses import batch_loss
from vlm_jax.train.state import TrainState, merge_params


def make_train_step(model, tx: optax.GradientTransformation, loss_fn: Callable) -> Callable:
  """-> train_step(state, batch, rng) -> (state, metrics).

  loss_fn(logits, labels) for a plain batch {"inputs": {...}, "labels": ...}, or a
  `losses.MixtureLoss` for a concat-mixture batch {name: plain batch}; its per-component
  "loss/<name>" values join the metrics.
  """
  model_loss = batch_loss(loss_fn)

  def train_step(state: TrainState, batch: dict, rng: jax.Array) -> tuple[TrainState, dict]:
    del rng  # No stochastic layers yet; kept so dropout/augmentation need no API change.

    def compute_loss(trainable):
      params = merge_params(trainable, state.frozen)
      apply = functools.partial(model.apply, {"params": params})
      if getattr(model, "takes_step", False):  # schedules inside the model (FlexAttention's ramp)
        apply = functools.partial(apply, step=state.step)
      return model_loss(apply, batch)

    (loss, aux), grads = jax.value_and_grad(compute_loss, has_aux=True)(state.trainable)
    grad_norm = optax.global_norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)

    def apply(operands):
      trainable, opt_state = operands
      updates, opt_state = tx.update(grads, opt_state, trainable)
      return optax.apply_updates(trainable, updates), opt_state

    # A branch, not a select of new and old: the update then runs in place in the donated buffers
    # (a select keeps both alive, so XLA copies all of params and optimizer state every step).
    trainable, opt_state = jax.lax.cond(finite, apply, lambda operands: operands,
                                        (state.trainable, state.opt_state))
    new_state = state.replace(step=state.step + 1, trainable=trainable, opt_state=opt_state)
    n = jnp.maximum(aux["num_tokens"], 1)
    metrics = {
      "loss": loss,
      "grad_norm": grad_norm,
      "token_accuracy": aux["correct"] / n,
      "num_tokens": aux["num_tokens"],
      "finite": finite,
      **{k: v for k, v in aux.items() if k.startswith("loss/")},
    }
    return new_state, metrics

  return train_step


def make_forward(model) -> Callable[[Any, dict], jax.Array]:
  """-> forward(params, inputs) -> logits; the eval-side counterpart of the train step."""

  def forward(params, inputs):
    return model.apply({"params": params}, **inputs)[0]

  return forward
