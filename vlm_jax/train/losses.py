"""Losses, looked up by name from `config.loss`.

`next_token_ce`: labels are aligned with input_ids (HF convention, ignore = -100); the loss shifts:
logits[:, t] predicts labels[:, t + 1]. Mean over the valid tokens of the batch, computed in float32.
`classification_ce`: softmax CE of logits[B, C] against class ids[B] with label smoothing, plus the
model's auxiliary loss (LaViT's DP loss) times its weight; `config.loss_options` sets both.

A loss from the registry is a function of (logits, labels), or, where it has `uses_aux = True`, of
(logits, labels, aux) with the model's aux dict (aux None: the caller has no aux, e.g. an
evaluator). The train step needs a loss of the model on a batch: `batch_loss` lifts one to that
for a plain batch, and `MixtureLoss` is one for a concat-mixture batch {name: plain batch}
(`vlm_jax.data.mixture`).
"""

import dataclasses
from collections.abc import Mapping
from typing import Callable

import jax
import jax.numpy as jnp
import optax

IGNORE = -100


def next_token_ce(logits: jax.Array, labels: jax.Array) -> tuple[jax.Array, dict]:
  """logits: float[B, T, V]; labels: int32[B, T] -> (scalar loss, {"num_tokens", "correct"}).

  loss = mean over valid t of logsumexp(logits_t) - logits_t[label_{t+1}]. "correct" counts the
  valid positions whose label's logit is the row's maximum (a tie for the maximum counts as
  correct): this reuses the log-sum-exp's max, where an argmax is a second variadic reduction over
  [B, T, V] that cost 9 ms of a 750 ms OpenFlamingo train step on XLA:CPU.
  """
  x = logits[:, :-1].astype(jnp.float32)
  targets = labels[:, 1:]
  valid = targets != IGNORE
  safe = jnp.where(valid, targets, 0)
  top = jax.lax.stop_gradient(x.max(-1, keepdims=True))  # logsumexp is shift-invariant
  lse = jnp.log(jnp.exp(x - top).sum(-1)) + top[..., 0]
  label_logit = jnp.take_along_axis(x, safe[..., None], -1)[..., 0]
  n = valid.sum()
  loss = jnp.where(valid, lse - label_logit, 0.0).sum() / jnp.maximum(n, 1)
  correct = jnp.where(valid, label_logit >= top[..., 0], False).sum()
  return loss, {"num_tokens": n, "correct": correct}


@dataclasses.dataclass(frozen=True)
class ClassificationCE:
  """Image classification with an auxiliary model loss (LaViT, Eq. 9 of the paper):

    L = mean_b CE(softmax(logits_b), (1 - eps) * onehot(y_b) + eps / C) + lambda * aux["dp_loss"]

  logits: float[B, C]; labels: int32[B]; eps = `label_smoothing` (DeiT: 0.1, timm's
  LabelSmoothingCrossEntropy); lambda = `dp_weight` (the notes' proposal 0.1; the paper's weight
  was not retrieved). aux None (or without "dp_loss") leaves the second term out.
  -> (L, {"num_tokens": B, "correct": top-1 hits, "loss/ce", "loss/dp"}); "num_tokens" counts
  examples so the step's token_accuracy is the batch's top-1 accuracy.
  """

  label_smoothing: float = 0.0
  dp_weight: float = 0.0
  uses_aux = True

  def __post_init__(self):
    if not 0.0 <= self.label_smoothing < 1.0:
      raise ValueError(f"config.loss_options.label_smoothing={self.label_smoothing} must be in "
                       "[0, 1)")

  def __call__(self, logits: jax.Array, labels: jax.Array, aux: dict | None = None
               ) -> tuple[jax.Array, dict]:
    if logits.ndim != 2 or labels.shape != logits.shape[:1]:
      raise ValueError(f"classification_ce: logits must be [B, C] and labels [B]; got "
                       f"{logits.shape} and {labels.shape}")
    logits = logits.astype(jnp.float32)
    targets = optax.smooth_labels(jax.nn.one_hot(labels, logits.shape[-1]), self.label_smoothing)
    ce = optax.softmax_cross_entropy(logits, targets).mean()
    dp = jnp.zeros((), jnp.float32)
    if aux is not None and "dp_loss" in aux:
      dp = aux["dp_loss"].astype(jnp.float32)
    correct = (logits.argmax(-1) == labels).sum()
    return ce + self.dp_weight * dp, {"num_tokens": jnp.asarray(labels.shape[0], jnp.int32),
                                      "correct": correct, "loss/ce": ce, "loss/dp": dp}


LOSSES: dict[str, Callable] = {"next_token_ce": next_token_ce, "classification_ce": ClassificationCE}
# Registry entries built from `config.loss_options` (the others take no options).
_CONFIGURABLE = ("classification_ce",)

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
    logits, aux = apply_fn(**batch["inputs"])
    if getattr(loss_fn, "uses_aux", False):
      return loss_fn(logits, batch["labels"], aux)
    return loss_fn(logits, batch["labels"])

  return loss


def get_loss(name: str, options=None) -> Callable:
  """`config.loss` (+ `config.loss_options`, a mapping of the loss's fields) -> the loss."""
  if name not in LOSSES:
    raise ValueError(f"config.loss {name!r} is not one of {sorted(LOSSES)}")
  options = dict(options or {})
  if name in _CONFIGURABLE:
    fields = {f.name for f in dataclasses.fields(LOSSES[name])}
    unknown = sorted(set(options) - fields)
    if unknown:
      raise ValueError(f"config.loss_options {unknown} are not options of {name!r}; it takes "
                       f"{sorted(fields)}")
    return LOSSES[name](**options)
  if options:
    raise ValueError(f"config.loss {name!r} takes no config.loss_options, got {sorted(options)}")
  return LOSSES[name]
