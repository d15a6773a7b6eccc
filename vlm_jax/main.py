"""Entry point: flags -> config -> train / evaluate. It only dispatches; the work lives in the library.

  python -m vlm_jax.main --config=configs/flamingo.py --workdir=runs/flamingo
  python -m vlm_jax.main --config=configs/flamingo.py:tiny --config.total_steps=20 --workdir=/tmp/x

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
_MODE = flags.DEFINE_enum("mode", "train", ["train"], "What to run.")


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
  from vlm_jax import distributed  # pylint: disable=g-import-not-at-top

  if _CONFIG.value is not None:  # a multi-host job connects its processes before any backend use
    distributed.maybe_initialize(_CONFIG.value)
  from vlm_jax.train.trainer import train_and_evaluate  # pylint: disable=g-import-not-at-top

  config = _CONFIG.value
  if config is None:
    sys.exit("--config is required, e.g. --config=configs/flamingo.py")
  workdir = _WORKDIR.value or default_workdir(flags.FLAGS["config"].serialize().split("=", 1)[-1])
  logging.info("workdir: %s", os.path.abspath(workdir))
  if _MODE.value == "train":
    results, _ = train_and_evaluate(config, workdir)
    logging.info("results: %s", results)


if __name__ == "__main__":
  app.run(main)
