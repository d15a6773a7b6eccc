"""Bad records are dropped whole, counted per reason, and the counts survive a checkpoint restore."""

import grain
import numpy as np
import pytest

from vlm_jax.data.counting import CountingBatch
from vlm_jax.data.records import BadRecord, Skip, skipping


def _transform(i):
  if i % 5 == 3:
    raise BadRecord("image_undecodable", f"record {i}")
  if i % 7 == 6:
    raise BadRecord("text_empty", f"record {i}")
  return {"x": np.int32(i)}


def _dataset(batch_size=4, n=40):
  ds = grain.MapDataset.range(n).map(skipping(_transform)).to_iter_dataset()
  return CountingBatch(ds, batch_size, lambda xs: np.stack([x["x"] for x in xs]))


def test_skips_are_counted_and_never_batched():
  it = iter(_dataset())
  batches = list(it)
  got = np.concatenate(batches)
  bad3 = {i for i in range(40) if i % 5 == 3}
  bad6 = {i for i in range(40) if i % 7 == 6 and i % 5 != 3}
  good = [i for i in range(40) if i not in bad3 | bad6]
  assert list(got) == good[: len(got)] and len(got) == len(good) - len(good) % 4
  # Counts cover the emitted batches (the dropped partial batch's records are not counted).
  last = max(i for i in range(40) if i in set(got.tolist()))
  counted = range(last + 1)
  assert it.counters() == {"seen": last + 1,
                           "skipped/image_undecodable": sum(i in bad3 for i in counted),
                           "skipped/text_empty": sum(i in bad6 for i in counted)}


def test_restore_mid_epoch_gives_identical_continuation_and_counts():
  it = iter(_dataset())
  next(it), next(it)
  state = it.get_state()
  rest = [b.tolist() for b in it]
  final = it.counters()
  again = iter(_dataset())
  again.set_state(state)
  assert [b.tolist() for b in again] == rest
  assert again.counters() == final


def test_unknown_reason_is_rejected_and_skip_passes_through():
  with pytest.raises(ValueError, match="unknown bad-record reason"):
    BadRecord("cosmic_rays")
  marker = Skip("text_empty", "x")
  assert skipping(lambda r: r)(marker) is marker
