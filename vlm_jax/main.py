"""Entry point: flags -> config -> train / evaluate. It only dispatches; the work lives in the library.

  python -m vlm_jax.main --config=configs/flamingo.py --workdir=runs/flamingo
  python -m vlm_jax.main --config=configs/flamingo.py:tiny --config.total_steps=20 --workdir=runs/x
  python -m vlm_jax.main --mode=eval --config=configs/eval_flamingo.py:tiny --workdir=runs/x

Running the same command again resumes from the checkpoints in --workdir.
"""

import logging
import os
import sys

from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "configs/<family>.py[:preset]",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, TensorBoard events, "
                               "config.json and results.json (default: runs/<config>[_<preset>]).")
_MODE = flags.DEFINE_enum("mode", "train", ["train", "eval", "compile_only"], "What to run: train; "
                          "eval (few-shot evaluation of the workdir's latest checkpoint or of "
                          "config.init.checkpoint, see vlm_jax.eval.fewshot); or compile the train "
                          "step for the mesh and report per-device memory.")
_COMPILE_DEVICES = flags.DEFINE_integer("compile_devices", None, "compile_only: fake CPU devices "
                                        "(default: the mesh's size or the --target's)")
_TARGET = flags.DEFINE_string("target", None, "compile_only: v5e-8, v5p-8, 8xh100, ... or a TPU "
                              "topology like v5e:2x4 (see vlm_jax.compile_only.TARGETS)")
_DEVICE_MEMORY_GB = flags.DEFINE_float("device_memory_gb", None, "compile_only: per-device memory "
                                       "budget in GB (default: the --target's)")


def default_workdir(config_arg: str) -> str:
  path, _, preset = config_arg.partition(":")
  stem = os.path.splitext(os.path.basename(path))[0]
  return os.path.join("runs", stem + (f"_{preset}" if preset else ""))


def main(argv) -> None:
  del argv
  logging.getLogger().setLevel(logging.INFO)
  from absl import logging as absl_logging  # pylint: disable=g-import-not-at-top

  absl_logging.set_verbosity(absl_logging.INFO)
  # Orbax logs every file it writes at INFO; keep our progress lines readable.
  absl_logging.get_absl_handler().addFilter(
    lambda r: not any(p in r.pathname for p in ("/orbax/", "/grain/")) or r.levelno >= logging.WARNING)
  import jax  # pylint: disable=g-import-not-at-top

  jax.config.update("jax_threefry_partitionable", True)
  if _MODE.value == "compile_only":  # CPU and fake devices, set before any backend starts
    from vlm_jax import compile_only  # pylint: disable=g-import-not-at-top

    compile_only.setup_host_devices(_CONFIG.value, _COMPILE_DEVICES.value, _TARGET.value)
  from vlm_jax import distributed, paths  # pylint: disable=g-import-not-at-top

  if _CONFIG.value is not None:  # a multi-host job connects its processes before any backend use
    distributed.maybe_initialize(_CONFIG.value)
  from vlm_jax.train.trainer import train_and_evaluate  # pylint: disable=g-import-not-at-top

  config = _CONFIG.value
  if config is None:
    sys.exit("--config is required, e.g. --config=configs/flamingo.py")
  # Local paths absolute from here on (orbax requires it), URLs as given; each change is logged.
  workdir = paths.resolve(_WORKDIR.value or
                          default_workdir(flags.FLAGS["config"].serialize().split("=", 1)[-1]))
  logging.info("workdir: %s", workdir)
  paths.resolve_config(config)
  if _MODE.value == "train":
    results, _ = train_and_evaluate(config, workdir)
    logging.info("results: %s", results)
  elif _MODE.value == "eval":
    from vlm_jax.eval import fewshot  # pylint: disable=g-import-not-at-top
    from vlm_jax.train import restore  # pylint: disable=g-import-not-at-top

    loaded = restore.load_for_eval(config, workdir)
    fewshot.evaluate_and_write(config, workdir, loaded.model, loaded.params, loaded.mesh,
                               loaded.rules, step=loaded.step, source=loaded.source)
  elif _MODE.value == "compile_only":
    compile_only.run(config, workdir, num_devices=_COMPILE_DEVICES.value, target=_TARGET.value,
                     device_memory_gb=_DEVICE_MEMORY_GB.value)


if __name__ == "__main__":
  app.run(main)
