"""Training metrics: TensorBoard events (tensorboardX) and one progress line every N steps.

The line reads `step 120/600 | loss 2.314 | lr 1.0e-03 | 3.41 steps/s | 6980 tok/s | ETA 2m21s`; rates and
ETA are measured over the steps of this process run after the first (compiling) step.
"""

import logging
import os
import time
from typing import Mapping

import jax


def format_seconds(s: float) -> str:
  s = int(max(0, s))
  h, rem = divmod(s, 3600)
  m, sec = divmod(rem, 60)
  return f"{h}h{m:02d}m{sec:02d}s" if h else (f"{m}m{sec:02d}s" if m else f"{sec}s")


class MetricLogger:
  """Writes scalars to `<workdir>/tensorboard` and logs progress lines, both on process 0 only (the
  scalars are global: every process would write the same numbers)."""

  def __init__(self, workdir: str, total_steps: int, prefix: str = ""):
    self.total_steps = total_steps
    self.prefix = prefix
    self._writer = None
    self._chief = jax.process_index() == 0
    if self._chief:
      from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top

      self._writer = SummaryWriter(os.path.join(workdir, "tensorboard"), flush_secs=10)
    self._t0 = None
    self._step0 = None
    self._tokens = 0

  def start(self, step: int) -> None:
    """Call after the first step completed: rates exclude compilation."""
    self._t0, self._step0, self._tokens = time.perf_counter(), step, 0

  def count_tokens(self, n: int) -> None:
    self._tokens += n

  def rates(self, step: int) -> dict[str, float]:
    if self._t0 is None or step <= self._step0:
      return {}
    dt = time.perf_counter() - self._t0
    steps_per_s = (step - self._step0) / dt
    return {"steps_per_sec": steps_per_s, "tokens_per_sec": self._tokens / dt,
            "eta_sec": (self.total_steps - step) / steps_per_s}

  def log_train(self, step: int, scalars: Mapping[str, float]) -> None:
    rates = self.rates(step)
    line = [f"{self.prefix}step {step}/{self.total_steps}", f"loss {scalars['loss']:.4f}",
            f"lr {scalars['learning_rate']:.2e}"]
    if rates:
      line += [f"{rates['steps_per_sec']:.2f} steps/s", f"{rates['tokens_per_sec']:.0f} tok/s",
               f"ETA {format_seconds(rates['eta_sec'])}"]
    if self._chief:
      logging.info(" | ".join(line))
    self.write_scalars(step, {**{f"train/{k}": v for k, v in scalars.items()},
                              **{f"perf/{k}": v for k, v in rates.items()}})

  def write_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
    if self._writer is not None:
      for k, v in scalars.items():
        self._writer.add_scalar(k, float(v), step)

  def close(self) -> None:
    if self._writer is not None:
      self._writer.flush()
      self._writer.close()
