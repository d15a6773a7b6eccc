"""`load_config("flamingo", "tiny")` for tests: the repository's `configs/<name>.py`."""

import os

from vlm_jax.config_base import load_config as _load

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def load_config(name: str, arg: str | None = None):
  return _load(os.path.join(ROOT, "configs", f"{name}.py"), arg)
