"""RICES (Yang et al. 2022; OpenFlamingo `eval/rices.py`): demonstrations retrieved by image similarity.

Every demonstration candidate (the whole train split, not the random query set) is embedded once by a
CLIP image encoder, L2-normalised; a query takes the k candidates of highest cosine similarity, ordered
so that the MOST similar comes LAST (nearest to the query in the prompt), as OpenFlamingo does.

The encoder is our CLIP ViT (`vlm_jax.models.vit.Model`): by default the evaluated Flamingo's own frozen
vision tower, or a converted CLIP directory (`python -m vlm_jax.convert clip ...`). The embedding is the
pooled output (LN_post of the CLS token). OpenFlamingo uses open_clip's `encode_image`, which also
multiplies by the image projection `proj`; our towers drop `proj`, so `projection` (a float[D, E] .npy)
can be given to match it exactly.

Features of the candidates are cached in an .npy file keyed by the dataset, image size and encoder
weights, so a second evaluation (other shots, seeds, or a rerun) does not embed the train set again.
"""

from __future__ import annotations

import hashlib
import logging
import os
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from vlm_jax.eval.inputs import pad_rows
from vlm_jax.models import vit
from vlm_jax.param_paths import flatten


def make_encoder(vision_kwargs: dict, vision_params, projection: np.ndarray | None = None
                 ) -> Callable[[np.ndarray], np.ndarray]:
  """A jitted uint8[B, S, S, 3] -> float32[B, D] (or [B, E] with `projection`) image embedder."""
  model = vit.Model(**vision_kwargs)
  proj = None if projection is None else jnp.asarray(projection, jnp.float32)

  @jax.jit
  def encode(params, images):
    _, aux = model.apply({"params": params}, images)
    feats = aux["pooled"].astype(jnp.float32)
    return feats if proj is None else feats @ proj

  return lambda images: np.asarray(jax.device_get(encode(vision_params, images)))


def params_digest(params) -> str:
  """A short digest of a param tree (paths, shapes and per-leaf sums): the cache key's encoder part."""
  h = hashlib.sha1()
  flat = flatten(params)
  sums = jax.device_get({k: jnp.sum(jnp.asarray(v, jnp.float32)) for k, v in flat.items()})
  for k in sorted(flat):
    h.update(f"{k}:{tuple(flat[k].shape)}:{float(sums[k]):.6e};".encode())
  return h.hexdigest()[:16]


def normalise(x: np.ndarray) -> np.ndarray:
  x = np.asarray(x, np.float32)
  return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


class Rices:
  """Retrieval over `num_candidates` demonstration candidates.

  Args:
    encode: uint8[B, S, S, 3] -> float[B, D] (`make_encoder`).
    load_images: indices -> uint8[len, S, S, 3] of those candidates.
    num_candidates: size of the train split.
    batch_size: images embedded per call.
    cache_path: .npy file for the candidates' features (read if present with the right shape).
  """

  def __init__(self, encode, load_images, num_candidates: int, batch_size: int,
               cache_path: str | None = None):
    self.encode = encode
    features = None
    if cache_path and os.path.exists(cache_path):
      features = np.load(cache_path)
      if features.ndim != 2 or len(features) != num_candidates:
        logging.warning("RICES: ignoring %s (shape %s, expected %d rows)", cache_path,
                        features.shape, num_candidates)
        features = None
      else:
        logging.info("RICES: %d cached candidate features from %s", num_candidates, cache_path)
    if features is None:
      chunks = []
      for s in range(0, num_candidates, batch_size):
        idx = np.arange(s, min(num_candidates, s + batch_size))
        chunks.append(self._embed(load_images(idx), batch_size))
      features = np.concatenate(chunks)
      if cache_path and jax.process_index() == 0:  # every process has the same features
        os.makedirs(os.path.dirname(cache_path) or ".", exist_ok=True)
        tmp = f"{cache_path}.tmp{os.getpid()}.npy"  # never a half-written file under the name
        np.save(tmp, features)
        os.replace(tmp, cache_path)
    self.features = normalise(features)

  def _embed(self, images: np.ndarray, batch_size: int) -> np.ndarray:
    """Embeds up to `batch_size` images, padded to that many rows (one compiled shape)."""
    return np.asarray(self.encode(pad_rows(images, batch_size)))[:len(images)]

  def find(self, query_images: np.ndarray, k: int, batch_size: int | None = None
           ) -> list[list[int]]:
    """uint8[B, S, S, 3] -> per query the indices of its k nearest candidates, most similar LAST."""
    q = normalise(self._embed(query_images, batch_size or len(query_images)))
    return self.find_by_features(q, k)

  def find_by_features(self, query_features: np.ndarray, k: int) -> list[list[int]]:
    """float[B, D] (normalised) -> indices as `find`. Ties keep the lower index first in rank."""
    sim = np.asarray(query_features, np.float32) @ self.features.T  # [B, N]
    # A stable sort of -sim: equal similarities rank by index, like torch.argsort(descending=True).
    order = np.argsort(-sim, axis=-1, kind="stable")[:, :k]
    return [list(map(int, row[::-1])) for row in order]


def cache_file(directory: str, task_name: str, records: Sequence[dict], image_size: int,
               encoder_id: str) -> str:
  """`<directory>/<task>_<digest>.npy`, the digest over the candidates (their ids, or a lazy sequence's
  `fingerprint`), the image size and the encoder."""
  h = hashlib.sha1(f"{len(records)}:{image_size}:{encoder_id}:".encode())
  fingerprint = getattr(records, "fingerprint", None)
  if fingerprint is not None:  # lazily built records (synthetic): reading ids would render images
    h.update(fingerprint.encode())
  else:
    for r in records:
      h.update(f"{r['id']};".encode())
  return os.path.join(directory, f"{task_name}_{h.hexdigest()[:16]}.npy")
