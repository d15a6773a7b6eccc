"""Rank classification: the log-likelihood of every class name after the prompt (OpenFlamingo's
`get_rank_classifications` with `normalize_length=True`).

  score[b, k] = mean_j log p(c_k[j] | prompt_b, c_k[:j])         c_k = tokens of class name k

Class names are tokenized on their own (no special tokens) and appended after the left-padded prompt,
as OpenFlamingo does. When every class name is one token, one forward pass of the prompt scores them
all (the next-token distribution at its last position). Otherwise each (example, class) pair is one
row `prompt_b ++ c_k` (class tokens right-padded to the longest class, padding masked out of the mean);
rows go through the model `rows_per_call` at a time, a static shape, so one compilation serves every
chunk. (OpenFlamingo caches the prompt's keys/values instead; the numbers are the same.)
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from vlm_jax.eval import inputs


def class_token_ids(tokenizer, class_names) -> list[list[int]]:
  ids = [tokenizer.encode(name, add_special_tokens=False).ids for name in class_names]
  empty = [n for n, x in zip(class_names, ids) if not x]
  if empty:
    raise ValueError(f"class names {empty} tokenize to no tokens")
  return ids


def make_scorers(model) -> tuple[Callable, Callable]:
  """(next_token_logprobs, continuation_logprobs), both jittable functions of params.

  next_token_logprobs(params, vision_x [B, T_img, S, S, 3], ids int[B, L], mask int[B, L],
    class_ids int[K]) -> float32[B, K]: log p(class_ids[k] | prompt) at the last position.
  continuation_logprobs(params, vision_x [R, ...], ids int[R, L + C], mask int[R, L + C],
    targets int[R, C], target_mask int[R, C]) -> float32[R]: mean log-prob of the last C tokens'
    unmasked targets, each predicted from the position before it.
  """

  def next_token_logprobs(params, vision_x, ids, mask, class_ids):
    logits, _ = model.apply({"params": params}, vision_x, ids, mask)
    lp = jax.nn.log_softmax(logits[:, -1].astype(jnp.float32), axis=-1)
    return jnp.take(lp, class_ids, axis=-1)

  def continuation_logprobs(params, vision_x, ids, mask, targets, target_mask):
    c = targets.shape[1]
    logits, _ = model.apply({"params": params}, vision_x, ids, mask)
    lp = jax.nn.log_softmax(logits[:, -c - 1:-1].astype(jnp.float32), axis=-1)
    tok = jnp.take_along_axis(lp, targets[..., None], axis=-1)[..., 0]
    w = target_mask.astype(jnp.float32)
    return jnp.sum(tok * w, axis=-1) / jnp.maximum(jnp.sum(w, axis=-1), 1.0)

  return next_token_logprobs, continuation_logprobs


class Scorer:
  """Scores prompts against class names on a mesh.

  Args:
    model: the Flamingo Module.
    mesh, rules: where params live; inputs are split over the batch axes.
    put: numpy array (every process holds all rows) -> global jax.Array split over the batch axes.
    rows_per_call: rows per forward pass in the multi-token path (a multiple of the data shards).
  """

  def __init__(self, model, mesh, rules, put, rows_per_call: int):
    self.mesh, self.rules, self.put, self.rows = mesh, rules, put, rows_per_call
    nxt, cont = make_scorers(model)
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
      self._next = jax.jit(nxt)
      self._cont = jax.jit(cont)

  def _call(self, fn, *args):
    with jax.set_mesh(self.mesh), nn.logical_axis_rules(self.rules):
      return np.asarray(jax.device_get(fn(*args)))

  def score(self, params, vision_x: np.ndarray, ids: np.ndarray, mask: np.ndarray,
            class_ids: list[list[int]], pad_id: int) -> np.ndarray:
    """vision_x: uint8[B, T_img, S, S, 3]; ids / mask: int32[B, L] left-padded prompts (B already a
    multiple of the data shards) -> float32[B, K] mean class-token log-probs."""
    b = len(ids)
    if all(len(c) == 1 for c in class_ids):
      first = np.asarray([c[0] for c in class_ids], np.int32)
      return self._call(self._next, params, self.put(vision_x), self.put(ids), self.put(mask),
                        first)
    k = len(class_ids)
    c = max(len(x) for x in class_ids)
    targets, target_mask = inputs.right_pad(class_ids, c, pad_id)
    row_example = np.repeat(np.arange(b), k)  # row r = (example r // K, class r % K)
    row_class = np.tile(np.arange(k), b)
    out = np.empty((b * k,), np.float32)
    for s in range(0, b * k, self.rows):
      rows = np.arange(s, min(b * k, s + self.rows))
      ex = inputs.pad_rows(row_example[rows], self.rows)
      cl = inputs.pad_rows(row_class[rows], self.rows)
      row_ids = np.concatenate([ids[ex], targets[cl]], axis=1)
      row_mask = np.concatenate([mask[ex], target_mask[cl]], axis=1)
      res = self._call(self._cont, params, self.put(vision_x[ex]), self.put(row_ids),
                       self.put(row_mask), self.put(targets[cl]), self.put(target_mask[cl]))
      out[rows] = res[:len(rows)]
    return out.reshape(b, k)
