"""Host allocator settings for XLA:CPU: keep freed memory for reuse instead of returning it to the OS.

XLA:CPU allocates each executable's buffers with the C library's malloc and frees them when the call
returns. glibc serves large blocks with fresh `mmap`s (and hands freed heap tops back with
`madvise`/`brk`), so every step re-faults and re-zeroes hundreds of MB of pages: the OpenFlamingo
train step of `benchmarks/train_step.py --against=open_flamingo` took ~145k minor page faults and
~0.35 s of kernel time per 0.73 s step on a 2-core Zen 4. With large blocks taken from the heap
(`M_MMAP_MAX = 0`), freed memory kept (`M_TRIM_THRESHOLD` = 2 GiB) and one arena (`M_ARENA_MAX`;
XLA's and YNNPACK's worker threads would otherwise each get an arena whose heaps are unmapped when
emptied), the same step takes ~36k faults and runs in ~0.62 s. PyTorch in the same process gets the
same settings, so side-by-side benchmarks stay fair.

`configure()` runs once when `vlm_jax` is imported (before jax starts its thread pools when
`vlm_jax` is imported first, as `python -m vlm_jax.main` does). It only acts with glibc; set
`VLM_JAX_HOST_MALLOC=default` in the environment to leave the allocator alone (e.g. in a process
that must return memory to the OS between phases). The cost: the process keeps its peak heap.
"""

import ctypes
import ctypes.util
import os

# glibc <malloc.h> parameter numbers.
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
M_ARENA_MAX = -8

SETTINGS = ((M_MMAP_MAX, 0), (M_TRIM_THRESHOLD, 2**31 - 1), (M_ARENA_MAX, 1))
ENV = "VLM_JAX_HOST_MALLOC"

_applied: bool | None = None


def configure() -> bool:
  """Apply `SETTINGS` with glibc's `mallopt` (once per process). -> whether they are in effect."""
  global _applied
  if _applied is not None:
    return _applied
  _applied = False
  if os.environ.get(ENV, "").lower() == "default":
    return False
  try:
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    libc.gnu_get_libc_version  # noqa: B018 -- raises AttributeError when the C library is not glibc
    mallopt = libc.mallopt
  except (OSError, AttributeError):
    return False
  mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
  _applied = all(mallopt(param, value) == 1 for param, value in SETTINGS)
  return _applied
