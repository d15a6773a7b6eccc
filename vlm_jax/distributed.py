"""Multi-host runs: `jax.distributed.initialize` from `config.distributed`, before other jax use.

Every host runs the same command; `maybe_initialize(config)` (called first thing in `vlm_jax.main`)
connects the processes so that `jax.devices()` lists every device of the job and a mesh spans hosts.
`config.distributed`:

  enabled              "auto" | "true" | "false". auto initializes when the environment shows a job
                       of several processes (below); true always initializes (fields left unset are
                       auto-detected by jax, else an error names them); false never does.
  coordinator_address  "host:port" of process 0 (else env JAX_COORDINATOR_ADDRESS, else detected)
  num_processes        (else env JAX_NUM_PROCESSES, else auto-detected)
  process_id           this process, 0..num_processes-1 (else env JAX_PROCESS_ID, else detected)
  local_device_ids     devices this process uses: [0, 1] or "0,1" (else env JAX_LOCAL_DEVICE_IDS;
                       default all)
  cpu_collectives      cross-process collectives on the CPU backend: "gloo" | "mpi" | "" (jax's
                       default); only the CPU backend reads it, so it is harmless on TPU/GPU
  initialization_timeout  seconds to wait for every process to connect

What "auto" recognises, in order:
  explicit     a coordinator address in the config or JAX_COORDINATOR_ADDRESS (a hand-rolled
               launch, e.g. `launch/` scripts or the tests' local processes)
  slurm        SLURM_NTASKS > 1 inside an `srun` step (jax reads SLURM_* itself)
  openmpi      OMPI_COMM_WORLD_SIZE > 1 under mpirun (jax reads OMPI_* itself)
  tpu          a Cloud TPU VM (libtpu installed and TPU devices present, unless JAX_PLATFORMS
               excludes tpu): worker count and ids live in the GCE metadata server, which only
               `jax.distributed.initialize()` queries, so it is called with no arguments; on a
               single-worker VM that makes a job of one process, which is harmless.

Only `jax.distributed.initialize` and a few collectives are used, so this module imports nothing of
ours (like `sharding`).
"""

import glob
import importlib.util
import json
import logging
import os
from typing import Any, Mapping

import numpy as np

ENABLED_VALUES = ("auto", "true", "false")
ENV_COORDINATOR = "JAX_COORDINATOR_ADDRESS"  # jax reads this one itself too
ENV_NUM_PROCESSES = "JAX_NUM_PROCESSES"
ENV_PROCESS_ID = "JAX_PROCESS_ID"
ENV_LOCAL_DEVICE_IDS = "JAX_LOCAL_DEVICE_IDS"  # jax reads this one itself too
CPU_COLLECTIVES = ("", "gloo", "mpi")


def _enabled(value: Any) -> str:
  if isinstance(value, bool):
    return "true" if value else "false"
  text = str(value).strip().lower()
  text = {"1": "true", "yes": "true", "0": "false", "no": "false", "none": "false"}.get(text, text)
  if text not in ENABLED_VALUES:
    raise ValueError(f"config.distributed.enabled={value!r}; expected one of {ENABLED_VALUES}")
  return text


def _int_field(cfg: Mapping[str, Any], env: Mapping[str, str], name: str, env_name: str
               ) -> int | None:
  value = cfg.get(name)
  source = f"config.distributed.{name}"
  if value is None and env.get(env_name, "") != "":
    value, source = env[env_name], f"env {env_name}"
  if value is None:
    return None
  try:
    return int(value)
  except (TypeError, ValueError):
    raise ValueError(f"{source}={value!r} is not an integer") from None


def parse_device_ids(value: Any) -> list[int] | None:
  """[0, 1] | (0, 1) | 3 | "0,1" | "" | None -> a list of ints, or None (all local devices)."""
  if value is None or value == "":
    return None
  if isinstance(value, int):
    return [value]
  items = value.split(",") if isinstance(value, str) else list(value)
  try:
    return [int(v) for v in items]
  except (TypeError, ValueError):
    raise ValueError(f"config.distributed.local_device_ids={value!r}; expected device ids such as "
                     "[0, 1] or '0,1'") from None


def _on_tpu_vm(env: Mapping[str, str]) -> bool:
  platforms = env.get("JAX_PLATFORMS", "")
  if platforms and "tpu" not in platforms.split(","):
    return False  # e.g. CPU tests run on a TPU VM
  if importlib.util.find_spec("libtpu") is None:
    return False
  return bool(glob.glob("/dev/accel[0-9]*") or glob.glob("/dev/vfio/[0-9]*"))


def _managed_cluster(env: Mapping[str, str]) -> str | None:
  """A launcher that tells jax every process's place itself: "slurm" | "openmpi" | "tpu" | None."""
  if int(env.get("SLURM_NTASKS", "1") or 1) > 1:
    return "slurm"
  if int(env.get("OMPI_COMM_WORLD_SIZE", "1") or 1) > 1:
    return "openmpi"
  if _on_tpu_vm(env):
    return "tpu"
  return None


def detect_cluster(cfg: Mapping[str, Any], env: Mapping[str, str]) -> str | None:
  """Which multi-process environment this is: "explicit" | "slurm" | "openmpi" | "tpu" | None."""
  if cfg.get("coordinator_address") or env.get(ENV_COORDINATOR):
    return "explicit"
  return _managed_cluster(env)


def resolve(cfg: Mapping[str, Any] | None, env: Mapping[str, str] | None = None
            ) -> tuple[str, dict[str, Any]] | None:
  """`config.distributed` + environment -> (cluster kind, kwargs of `jax.distributed.initialize`),
  or None when this run is a single process. Pure (no jax), so the decision is testable anywhere."""
  cfg = dict(cfg or {})
  env = os.environ if env is None else env
  enabled = _enabled(cfg.get("enabled", "auto"))
  if enabled == "false":
    return None
  kind = detect_cluster(cfg, env)
  if kind is None and enabled == "auto":
    return None
  kwargs: dict[str, Any] = {
    "coordinator_address": cfg.get("coordinator_address") or env.get(ENV_COORDINATOR) or None,
    "num_processes": _int_field(cfg, env, "num_processes", ENV_NUM_PROCESSES),
    "process_id": _int_field(cfg, env, "process_id", ENV_PROCESS_ID),
    "local_device_ids": parse_device_ids(cfg.get("local_device_ids")
                                         or env.get(ENV_LOCAL_DEVICE_IDS)),
  }
  if cfg.get("initialization_timeout"):
    kwargs["initialization_timeout"] = int(cfg["initialization_timeout"])
  if kind == "slurm" and "SLURM_STEP_NODELIST" not in env:
    raise ValueError("SLURM_NTASKS > 1 but SLURM_STEP_NODELIST is unset: start every task with "
                     "`srun` (inside sbatch), or set config.distributed.enabled=false for a single "
                     "process")
  # Slurm, Open MPI and TPU VMs tell jax what is left unset; a hand-rolled launch must say it all.
  if _managed_cluster(env) is None:
    for name, env_name in (("coordinator_address", ENV_COORDINATOR),
                           ("num_processes", ENV_NUM_PROCESSES), ("process_id", ENV_PROCESS_ID)):
      if kwargs[name] is None:
        why = "explicit coordinator" if kind else "enabled=true"
        raise ValueError(f"multi-process run ({why}) without config.distributed.{name} (or env "
                         f"{env_name}); set it on every process, or leave "
                         "config.distributed.enabled='auto' under Slurm, Open MPI or on a Cloud "
                         "TPU VM")
    n, i = kwargs["num_processes"], kwargs["process_id"]
    if n < 1 or not 0 <= i < n:
      raise ValueError(f"config.distributed.process_id={i} must be in [0, num_processes={n})")
  return kind or "explicit", {k: v for k, v in kwargs.items() if v is not None}


def maybe_initialize(config) -> bool:
  """Connect this process to the others if `config.distributed` and the environment say so.

  Must run before anything touches a jax backend (`jax.devices()`, any computation); returns whether
  the distributed system is up (also when it was initialized earlier by the caller).
  """
  import jax  # pylint: disable=g-import-not-at-top  (keeps `resolve` importable without jax)

  cfg = dict(config.get("distributed") or {})
  if jax.distributed.is_initialized():
    return True
  plan = resolve(cfg, os.environ)
  if plan is None:
    return False
  kind, kwargs = plan
  collectives = str(cfg.get("cpu_collectives") or "")
  if collectives not in CPU_COLLECTIVES:
    raise ValueError(f"config.distributed.cpu_collectives={collectives!r}; expected one of "
                     f"{CPU_COLLECTIVES}")
  if collectives:
    jax.config.update("jax_cpu_collectives_implementation", collectives)
  jax.distributed.initialize(**kwargs)
  local, devices = jax.local_devices(), jax.devices()
  logging.info("distributed (%s): process %d/%d, %d local / %d global %s devices, coordinator %s",
               kind, jax.process_index(), jax.process_count(), len(local), len(devices),
               local[0].platform, kwargs.get("coordinator_address", "auto-detected"))
  return True


def is_chief() -> bool:
  """Process 0 writes the files every process would otherwise write (config, results, events)."""
  import jax  # pylint: disable=g-import-not-at-top

  return jax.process_index() == 0


def broadcast_from_chief(value: Any) -> Any:
  """Process 0's JSON-serialisable `value` on every process (a decision all must take alike)."""
  import jax  # pylint: disable=g-import-not-at-top

  if jax.process_count() == 1:
    return value
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top

  payload = np.frombuffer(json.dumps(value).encode(), np.uint8) if is_chief() else None
  size = int(multihost_utils.broadcast_one_to_all(
    np.int32(len(payload) if payload is not None else 0)))
  buf = payload if payload is not None else np.zeros(size, np.uint8)
  return json.loads(bytes(np.asarray(multihost_utils.broadcast_one_to_all(buf))).decode())


def sum_counts(counts: Mapping[str, int]) -> dict[str, int]:
  """Per-process counters (keys may differ between processes) -> their sums over all processes."""
  import jax  # pylint: disable=g-import-not-at-top

  if jax.process_count() == 1:
    return dict(counts)
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top

  # Keys appear lazily (a skip reason only once it happened), so gather the JSON text: first the
  # lengths, then the texts padded to the longest, rounded up so the gather rarely recompiles.
  text = np.frombuffer(json.dumps(dict(counts)).encode(), np.uint8)
  sizes = np.asarray(multihost_utils.process_allgather(np.int32(len(text))))
  padded = np.zeros(-(-int(sizes.max()) // 256) * 256, np.uint8)
  padded[: len(text)] = text
  gathered = np.asarray(multihost_utils.process_allgather(padded))
  total: dict[str, int] = {}
  for row, n in zip(gathered, sizes):
    for k, v in json.loads(bytes(row[: int(n)]).decode()).items():
      total[k] = total.get(k, 0) + int(v)
  return total


def assert_same_on_all_processes(value: int, what: str) -> None:
  """Raise on every process when `value` differs between processes (e.g. the latest checkpoint step
  seen in a directory that is not shared storage), instead of hanging in a mismatched collective."""
  import jax  # pylint: disable=g-import-not-at-top

  if jax.process_count() == 1:
    return
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top

  values = np.asarray(multihost_utils.process_allgather(np.int64(value))).reshape(-1)
  if len(set(values.tolist())) > 1:
    raise RuntimeError(f"{what} differs between processes: {values.tolist()} (process i has entry "
                       "i); every process must see the same files (shared storage such as gs://)")
