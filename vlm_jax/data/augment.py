"""Training-time augmentation decided per record, deterministically from the seed and the record's
position in the (repeated) stream: the same run replays the same decisions after a restore, and each
epoch draws new ones.

OpenFlamingo's only image augmentation is `RandomHorizontalFlip(p=0.5)` applied to the stacked images
of one sample, i.e. all images of a document flip together (reference/flamingo.md 1.2). `JointFlip`
marks a record with `"flip": True` with probability `p`; the transform flips every image of the record
(`InterleavedTransform`).
"""

from __future__ import annotations

from typing import Any

import grain
import numpy as np

from vlm_jax.data.records import Skip


class JointFlip(grain.transforms.RandomMap):
  """record -> record with "flip" drawn once for all its images (Skip markers pass through)."""

  def __init__(self, p: float = 0.5):
    if not 0.0 <= p <= 1.0:
      raise ValueError(f"config.data.random_flip={p} must be a probability in [0, 1]")
    self.p = p

  def random_map(self, element: Any, rng: np.random.Generator) -> Any:
    if isinstance(element, Skip):
      return element
    return {**element, "flip": bool(rng.random() < self.p)}
