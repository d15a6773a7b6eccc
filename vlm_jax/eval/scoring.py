"""Rank classification: the log-likelihood of every class name after the prompt (OpenFlamingo's
`get_rank_classifications`, `normalize_length=True`, with its cached context).

  score[b, k] = mean_j log p(c_k[j] | prompt_b, c_k[:j])         c_k = tokens of class name k

Class names are tokenized on their own (no special tokens) and appended after the left-padded prompt,
as OpenFlamingo does. The prompt runs once per example (`prefill`: vision tower, resampler, the
LM over the prompt into KV caches with room for the longest class name); its last logits give every
class's first token. Names of more tokens then run as (example, class) rows, `rows_per_call` at a time
(a static shape: one compilation serves every chunk), each row reading its example's caches and media
keys/values (the vision tower never runs again), `C` tokens per row. The result equals one full forward
pass per (example, class) (tested).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from vlm_jax import sharding
from vlm_jax.data.interleaved import pad_tokens
from vlm_jax.eval import inputs
from vlm_jax.eval.generate import map_cache_rows, padded_positions


def class_token_ids(tokenizer, class_names) -> list[list[int]]:
  ids = [tokenizer.encode(name, add_special_tokens=False).ids for name in class_names]
  empty = [n for n, x in zip(class_names, ids) if not x]
  if empty:
    raise ValueError(f"class names {empty} tokenize to no tokens")
  return ids


def _take_rows(state_caches, media_kv, rows: jax.Array):
  """Rows `rows` of the prefill's KV caches (batch axis ndim - 4; write indices shared) and media
  keys/values (MediaKV leaves [.., B, H, T_img, R, D])."""
  caches = map_cache_rows(lambda a, axis: jnp.take(a, rows, axis=axis), state_caches)
  return caches, jax.tree.map(lambda a: jnp.take(a, rows, axis=a.ndim - 5), media_kv)


def make_scorers(model, class_len: int):
  """(prefill, continue_rows): jittable functions of params for a Flamingo `model`.

  prefill(params, vision_x [B, T_img, S, S, 3], ids int[B, L] left-padded, mask int[B, L])
    -> (first float32[B, V] log-probs of the token after the prompt, state for continue_rows).
  continue_rows(params, state, rows int[R] (example of each row), targets int[R, C], target_mask
    int[R, C]) -> float32[R]: the mean log-prob of each row's unmasked target tokens.
  """

  def prefill(params, vision_x, ids, mask):
    b, length = ids.shape
    full_mask = jnp.concatenate([mask, jnp.ones((b, class_len), mask.dtype)], axis=1)
    positions = padded_positions(mask)
    caches = model.init_caches(b, length + class_len)
    logits, aux = model.apply({"params": params}, vision_x, ids, full_mask, positions=positions,
                              caches=caches, last_logits_only=True)
    first = jax.nn.log_softmax(logits[:, -1].astype(jnp.float32), axis=-1)
    state = {"caches": aux["lm"]["caches"], "media_kv": aux["media_kv"],
             "text_time": aux["text_time"][:, -1], "mask": mask, "first": first}
    return first, state

  def continue_rows(params, state, rows, targets, target_mask):
    c = targets.shape[1]
    caches, media_kv = _take_rows(state["caches"], state["media_kv"], rows)
    mask = jnp.concatenate([state["mask"][rows], target_mask.astype(state["mask"].dtype)], axis=1)
    positions = state["mask"][rows].sum(-1, keepdims=True) + jnp.arange(c)[None]
    # Class tokens hold no <image>: they attend to the prompt's last image (its text_time).
    text_time = jnp.broadcast_to(state["text_time"][rows][:, None], targets.shape)
    logits, _ = model.apply({"params": params}, None, targets, mask, positions=positions,
                            caches=caches, media_kv=media_kv, text_time=text_time)
    # Token j of a class is predicted by the prompt's last position (j = 0) or the class's j - 1.
    lp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), axis=-1)
    later = jnp.take_along_axis(lp, targets[:, 1:, None], axis=-1)[..., 0]
    first = jnp.take_along_axis(state["first"][rows], targets[:, :1], axis=-1)
    tok = jnp.concatenate([first, later], axis=1)
    w = target_mask.astype(jnp.float32)
    return jnp.sum(tok * w, axis=-1) / jnp.maximum(jnp.sum(w, axis=-1), 1.0)

  return prefill, continue_rows


class Scorer:
  """Scores prompts against class names on a mesh.

  Args:
    model: the Flamingo Module.
    mesh, rules: where params live; inputs (every process holds all rows) are split over the batch
      axes (`vlm_jax.sharding.full_batch`).
    rows_per_call: (example, class) rows per call for multi-token names (a multiple of the data
      shards).
  """

  def __init__(self, model, mesh, rules, rows_per_call: int):
    self.model, self.mesh, self.rules, self.rows = model, mesh, rules, rows_per_call
    self._fns: dict[int, tuple] = {}

  def _jitted(self, class_len: int):
    if class_len not in self._fns:
      prefill, cont = make_scorers(self.model, class_len)
      # The scores come back replicated so every process can read all of them (multi-host: a
      # batch-split result spans other processes' devices); the caches stay where they are.
      repl = sharding.replicated(self.mesh)

      def prefill_replicated(*args):
        first, state = prefill(*args)
        return jax.lax.with_sharding_constraint(first, repl), state

      def cont_replicated(*args):
        return jax.lax.with_sharding_constraint(cont(*args), repl)
      with jax.set_mesh(self.mesh), nn.logical_axis_rules(self.rules):
        self._fns[class_len] = (jax.jit(prefill_replicated), jax.jit(cont_replicated))
    return self._fns[class_len]

  def score(self, params, vision_x: np.ndarray, ids: np.ndarray, mask: np.ndarray,
            class_ids: list[list[int]], pad_id: int) -> np.ndarray:
    """vision_x: uint8[B, T_img, S, S, 3]; ids / mask: int32[B, L] left-padded prompts (B already a
    multiple of the data shards) -> float32[B, K] mean class-token log-probs."""
    b, k = len(ids), len(class_ids)
    c = max(len(x) for x in class_ids)
    prefill, cont = self._jitted(c)
    with jax.set_mesh(self.mesh), nn.logical_axis_rules(self.rules):
      put = functools.partial(sharding.full_batch, mesh=self.mesh)
      first, state = prefill(params, put(vision_x), put(ids), put(mask))
      if c == 1:  # every class name is one token: the prompt's next-token distribution is all
        first = np.asarray(jax.device_get(first))
        return first[:, [x[0] for x in class_ids]]
      padded = [pad_tokens(np.asarray(x, np.int32), c, pad_id) for x in class_ids]
      targets, target_mask = (np.stack(a) for a in zip(*padded))
      row_example = np.repeat(np.arange(b), k)  # row r = (example r // K, class r % K)
      row_class = np.tile(np.arange(k), b)
      out = np.empty((b * k,), np.float32)
      for s in range(0, b * k, self.rows):
        rows = np.arange(s, min(b * k, s + self.rows))
        ex = inputs.pad_rows(row_example[rows], self.rows)
        cl = inputs.pad_rows(row_class[rows], self.rows)
        res = cont(params, state, put(ex.astype(np.int32)), put(targets[cl]), put(target_mask[cl]))
        out[rows] = np.asarray(jax.device_get(res))[:len(rows)]
    return out.reshape(b, k)
