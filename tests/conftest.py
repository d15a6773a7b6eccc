"""Shared test setup: CPU only, quiet logs, small deterministic numerics."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from tests.torch_compat import ensure_torchvision_importable  # noqa: E402

ensure_torchvision_importable()
