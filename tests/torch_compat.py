"""Make the PyTorch reference stack importable on CPU-only test machines.

The only torchvision build on PyPI for torch 2.13 is a CUDA build whose compiled operators do not load
with the CPU torch wheel: `import torchvision` fails with "operator torchvision::nms does not exist",
and transformers and open_clip import torchvision. Registering the schemas of the two operators its
Python side refers to (`nms`, `qnms`) lets the pure-Python parts import; no test uses those operators.
A working torchvision is left alone.
"""

import importlib.util
import sys


def ensure_torchvision_importable() -> None:
  if importlib.util.find_spec("torch") is None or importlib.util.find_spec("torchvision") is None:
    return
  try:
    import torchvision  # noqa: F401
    return
  except RuntimeError as e:
    if "torchvision::" not in str(e):
      raise
  for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
    del sys.modules[name]
  import torch

  lib = torch.library.Library("torchvision", "DEF")  # noqa: TID251
  lib.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
  lib.define("qnms(Tensor qdets, Tensor scores, float iou_threshold) -> Tensor")
  ensure_torchvision_importable.library = lib  # keep the registration alive
  import torchvision  # noqa: F401,F811
