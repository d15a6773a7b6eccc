#!/usr/bin/env python3
"""Writes launch/colab.ipynb (nbformat 4) with the json module: edit the cells here, then run
`python launch/make_colab.py`. tests/test_launch.py checks that the committed notebook is what this
script writes.

The notebook installs vlm_jax from a GitHub clone (or a local copy, e.g. on Google Drive) with the
extra for the runtime's accelerator, prints the devices, runs the embedded default of
configs/flamingo.py and plots the loss curves from the run's TensorBoard event files.
"""

import json
import os
import sys

NOTEBOOK = os.path.join(os.path.dirname(os.path.abspath(__file__)), "colab.ipynb")

INTRO = """\
# vlm_jax on Colab: train the embedded Flamingo and plot its loss

This notebook installs `vlm_jax`, shows the devices JAX sees, trains the **embedded default** of
`configs/flamingo.py` (a small Flamingo on the built-in synthetic corpus: nothing is downloaded) and
plots the loss curves from the run's TensorBoard event files.

Pick a runtime first (*Runtime > Change runtime type*): CPU, a GPU, or a TPU (Colab's TPU runtimes are
TPU VMs, where `pip install "jax[tpu]"` is the supported JAX install). The install cell detects which
one it got and installs the matching extra: `.[tpu]`, `.[cuda]` or plain `.`.

JAX only ever runs in child processes here (`python -m ...`): a TPU can be opened by one process at a
time, and on a GPU the notebook's own JAX would preallocate 75% of the memory the training run needs."""

PARAMS_NOTE = """\
## 1. Settings

`CONFIG = "configs/flamingo.py"` is the embedded default: stage 1 trains a tiny LLaMA on the corpus
text, stage 2 trains the Flamingo with both towers frozen, then it evaluates colour/shape questions
(about 6.5 minutes on 2 CPU cores, faster on a GPU/TPU).

**Quick check:** `CONFIG = "configs/flamingo.py:tiny"` runs the same two stages at toy size in about
a minute; use it to check the install before the real run. Its accuracy is meaningless (a handful of
steps)."""

PARAMS = """\
# Where the code comes from: a git URL to clone, or a local copy of the repository (e.g. on Google
# Drive: from google.colab import drive; drive.mount("/content/drive")). LOCAL_COPY wins if set.
REPO_URL = "https://github.com/<you>/vlm_jax.git"  # edit: your fork or the upstream repository
REPO_REF = "main"
LOCAL_COPY = ""  # e.g. "/content/drive/MyDrive/vlm_jax"
CLONE_DIR = "/content/vlm_jax"

CONFIG = "configs/flamingo.py"  # the embedded default; "configs/flamingo.py:tiny" = quick check
WORKDIR = "runs/flamingo"       # relative to the repository; running again resumes from it
EXTRA_ARGS = []                 # e.g. ["--config.total_steps=600"]"""

INSTALL_NOTE = """\
## 2. Install

Clones the repository (or uses `LOCAL_COPY`) and runs `pip install -e ".[<extra>]"` in it. If pip
replaced a package this session had already imported, use *Runtime > Restart session* and continue
with the next cell (the settings cell must run again after a restart)."""

INSTALL = """\
import glob
import os
import shutil
import subprocess
import sys


def sh(*cmd, cwd=None):
  \"\"\"Runs a command with its output streamed into the notebook; returns the output, raises on
  failure.\"\"\"
  print("$", " ".join(cmd), flush=True)
  proc = subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  out = []
  for line in proc.stdout:
    print(line, end="", flush=True)
    out.append(line)
  if proc.wait():
    raise RuntimeError(f"{cmd[0]} exited with code {proc.returncode}")
  return "".join(out)


def accelerator():
  \"\"\"'tpu', 'gpu' or 'cpu' for this runtime.\"\"\"
  if glob.glob("/dev/accel*") or glob.glob("/dev/vfio/[0-9]*"):  # TPU VM chips (v4- / v5e+)
    return "tpu"
  if shutil.which("nvidia-smi") and subprocess.run(["nvidia-smi", "-L"],
                                                   capture_output=True).returncode == 0:
    return "gpu"
  return "cpu"


if LOCAL_COPY:
  REPO_DIR = LOCAL_COPY
else:
  if "<you>" in REPO_URL:
    raise ValueError("set REPO_URL (or LOCAL_COPY) in the settings cell first")
  REPO_DIR = CLONE_DIR
  if not os.path.isdir(os.path.join(REPO_DIR, ".git")):
    sh("git", "clone", "--depth", "1", "--branch", REPO_REF, REPO_URL, REPO_DIR)
ACCEL = accelerator()
EXTRA = {"tpu": "[tpu]", "gpu": "[cuda]", "cpu": ""}[ACCEL]
print(f"runtime: {ACCEL}; installing {REPO_DIR} with '.{EXTRA}'")
sh(sys.executable, "-m", "pip", "install", "-q", "-e", f".{EXTRA}", cwd=REPO_DIR)"""

DEVICES = """\
# In a child process, so the notebook itself never holds the TPU / GPU memory.
sh(sys.executable, "-c", "import jax; print('jax', jax.__version__, '-', jax.default_backend()); "
   "print(jax.devices())", cwd=REPO_DIR)"""

RUN_NOTE = """\
## 3. Train

The same command as on any machine; its log lines
(`[flamingo] step 400/2400 | loss 0.2998 | lr 9.46e-04 | ... | ETA 4m41s`) stream below. If the
session dies, run the cell again: it resumes from the last checkpoint in `WORKDIR`."""

RUN = """\
import json

cmd = [sys.executable, "-m", "vlm_jax.main", f"--config={CONFIG}", f"--workdir={WORKDIR}",
       *EXTRA_ARGS]
run_log = sh(*cmd, cwd=REPO_DIR)
RUN_DIR = os.path.join(REPO_DIR, WORKDIR)
with open(os.path.join(RUN_DIR, "colab_run.log"), "a") as f:  # the plot's last-resort source
  f.write(run_log)
with open(os.path.join(RUN_DIR, "results.json")) as f:
  print(json.dumps(json.load(f), indent=2))"""

READER_NOTE = """\
## 4. Loss curves

The trainer writes TensorBoard event files with tensorboardX (`<workdir>/tensorboard`, stage 1 in
`<workdir>/lm_pretrain/tensorboard`). They are read with TensorBoard's `EventAccumulator` when
`tensorboard` is importable (Colab ships it; reading needs no TensorFlow); otherwise the records
are decoded with tensorboardX's own protobuf classes (installed with vlm_jax); if neither works, the
loss comes from the log lines of the run above. A resumed run rewrites the steps after its last
checkpoint: the last value of each step is kept."""

READER = """\
import re
import struct


def _scalars_tensorboard(logdir):
  from tensorboard.backend.event_processing import event_accumulator

  acc = event_accumulator.EventAccumulator(logdir, size_guidance={event_accumulator.SCALARS: 0})
  acc.Reload()
  return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def _scalars_tensorboardx(logdir):
  import glob
  import os

  from tensorboardX.proto import event_pb2

  out = {}
  for path in sorted(glob.glob(os.path.join(logdir, "events.out.tfevents.*"))):
    with open(path, "rb") as f:
      data = f.read()
    pos = 0
    while pos + 12 <= len(data):  # TFRecord: u64 length, u32 crc, payload, u32 crc
      (length,) = struct.unpack("<Q", data[pos:pos + 8])
      payload = data[pos + 12:pos + 12 + length]
      pos += 12 + length + 4
      if len(payload) < length:  # a record still being written
        break
      event = event_pb2.Event.FromString(payload)
      for v in event.summary.value:
        kind = v.WhichOneof("value")
        if kind == "simple_value":
          out.setdefault(v.tag, []).append((event.step, v.simple_value))
        elif kind == "tensor" and v.tensor.float_val:
          out.setdefault(v.tag, []).append((event.step, v.tensor.float_val[0]))
  return out


def read_scalars(logdir):
  \"\"\"{tag: (steps, values)} from the TensorBoard event files in logdir, last value per step.\"\"\"
  raw = {}
  for reader in (_scalars_tensorboard, _scalars_tensorboardx):
    try:
      raw = reader(logdir)
      break
    except ImportError:
      continue
  out = {}
  for tag, points in raw.items():
    by_step = dict(points)  # later records (a resumed run) win
    steps = sorted(by_step)
    out[tag] = (steps, [by_step[s] for s in steps])
  return out


def loss_from_log(text):
  \"\"\"{stage: (steps, losses)} from the trainer's '[stage] step N/M | loss X' log lines.\"\"\"
  out = {}
  for stage, step, loss in re.findall(r"\\[(\\w+)\\] step (\\d+)/\\d+ \\| loss ([-+.\\deE]+)", text):
    out.setdefault(stage, {})[int(step)] = float(loss)
  return {k: (sorted(v), [v[s] for s in sorted(v)]) for k, v in out.items()}"""

PLOT = """\
import matplotlib.pyplot as plt

stages = [("stage 1: LM on the corpus text", os.path.join(RUN_DIR, "lm_pretrain")),
          ("stage 2: Flamingo", RUN_DIR)]
curves = {name: read_scalars(os.path.join(d, "tensorboard")) for name, d in stages
          if os.path.isdir(os.path.join(d, "tensorboard"))}
if not any("train/loss" in c for c in curves.values()):  # fall back to the log lines
  with open(os.path.join(RUN_DIR, "colab_run.log")) as f:
    logged = loss_from_log(f.read())
  curves = {name: {"train/loss": logged[key]} for (name, _), key
            in zip(stages, ("lm_pretrain", "flamingo")) if key in logged}

fig, axes = plt.subplots(1, len(curves), figsize=(6 * len(curves), 4), squeeze=False)
for ax, (name, scalars) in zip(axes[0], curves.items()):
  steps, loss = scalars["train/loss"]
  ax.plot(steps, loss, label="train/loss")
  ax.set(title=name, xlabel="step", ylabel="loss")
  if "eval/accuracy" in scalars:  # evaluated at eval_every steps and at the end
    ax2 = ax.twinx()
    ax2.plot(*scalars["eval/accuracy"], "o-", color="tab:green", label="eval/accuracy")
    ax2.set(ylabel="accuracy", ylim=(0, 1.05))
    ax2.legend(loc="center right")
  ax.legend(loc="upper right")
plt.tight_layout()
plt.show()"""


def _cell(kind: str, text: str, idx: int) -> dict:
  cell = {"cell_type": kind, "id": f"cell-{idx}", "metadata": {},
          "source": text.splitlines(keepends=True)}
  if kind == "code":
    cell.update(execution_count=None, outputs=[])
  return cell


def notebook() -> dict:
  cells = [("markdown", INTRO), ("markdown", PARAMS_NOTE), ("code", PARAMS),
           ("markdown", INSTALL_NOTE), ("code", INSTALL), ("code", DEVICES),
           ("markdown", RUN_NOTE), ("code", RUN), ("markdown", READER_NOTE), ("code", READER),
           ("code", PLOT)]
  return {
    "nbformat": 4,
    "nbformat_minor": 5,
    "metadata": {
      "kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"},
      "language_info": {"name": "python"},
      "colab": {"provenance": []},
    },
    "cells": [_cell(kind, text, i) for i, (kind, text) in enumerate(cells)],
  }


def render() -> str:
  return json.dumps(notebook(), indent=1, ensure_ascii=False) + "\n"


def main() -> int:
  out = sys.argv[1] if len(sys.argv) > 1 else NOTEBOOK
  with open(out, "w") as f:
    f.write(render())
  print(f"wrote {out}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
