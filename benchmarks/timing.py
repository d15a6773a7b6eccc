"""Shared by the benchmarks (run as `python benchmarks/<name>.py`, so this directory is on sys.path)."""

import time

import jax
import numpy as np


def time_steps(compiled, state, batch, key, *, steps: int, warmup: int = 1):
  """Times `steps` calls of a compiled train step after `warmup` calls ->
  (median seconds, min seconds, last metrics)."""
  for _ in range(warmup):
    state, m = compiled(state, batch, key)
  jax.block_until_ready(m)
  times = []
  for _ in range(steps):
    t0 = time.perf_counter()
    state, m = compiled(state, batch, key)
    jax.block_until_ready(m)
    times.append(time.perf_counter() - t0)
  return float(np.median(times)), float(np.min(times)), m


def best_time(fn, *args, reps: int) -> float:
  """Seconds of the fastest of `reps` calls of `fn(*args)` after one warm-up call (JAX results are
  waited for; anything else, e.g. PyTorch on CPU, is done when `fn` returns). The minimum, as other
  processes may share the host's cores."""
  jax.block_until_ready(fn(*args))
  best = float("inf")
  for _ in range(reps):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    best = min(best, time.perf_counter() - t0)
  return best
