"""Which image goes before which sentence: OpenFlamingo's image<->sentence assignment for MMC4.

MMC4 gives a CLIP similarity matrix sim[num_images, num_sentences]. OpenFlamingo's repository
(`open_flamingo/train/data.py`, commit "one-to-one assign instead of argmax") assigns images to
sentences one-to-one by maximising the summed similarity (Hungarian matching,
`scipy.optimize.linear_sum_assignment`), and then drops every pair whose similarity is below the
threshold. Its PyPI release 2.0.1 instead gives each image its most similar sentence (argmax), so
two images can precede the same sentence; `method="argmax"` reproduces that.
"""

from __future__ import annotations

import numpy as np
from scipy import optimize

METHODS = ("hungarian", "argmax")


def assign_images(
  sim: np.ndarray, threshold: float, method: str = "hungarian"
) -> list[tuple[int, int]]:
  """Image -> sentence assignment with the similarity threshold applied after matching (as OF does).

  Args:
    sim: float[num_images, num_sentences] image-sentence similarities.
    threshold: pairs with similarity < threshold are dropped.
    method: "hungarian" (one image per sentence, maximum total similarity) or "argmax" (each image
      to its most similar sentence, ties to the first).

  Returns:
    [(image_row, sentence_index)] sorted by image_row; images left unmatched are absent.
  """
  if method not in METHODS:
    raise ValueError(f"Unknown matching method {method!r}; expected one of {METHODS}.")
  sim = np.asarray(sim, np.float64)
  if sim.ndim != 2:
    raise ValueError(f"similarity matrix must be 2-D [images, sentences], got shape {sim.shape}.")
  if sim.size == 0:
    return []
  if method == "hungarian":
    rows, cols = optimize.linear_sum_assignment(sim, maximize=True)
  else:
    rows = np.arange(sim.shape[0])
    cols = np.argmax(sim, axis=1)
  return [(int(r), int(c)) for r, c in zip(rows, cols) if sim[r, c] >= threshold]
