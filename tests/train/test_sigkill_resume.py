"""The real thing: `python -m vlm_jax.main` killed with SIGKILL mid-run, then the same command again,
ends with the same results.json as an uninterrupted run."""

import json
import os
import signal
import subprocess
import sys

import pytest

from tests.train.configs_loader import ROOT

ARGS = ["--config=configs/flamingo.py:tiny", "--config.total_steps=60", "--config.log_every=5",
        "--config.checkpoint.every_steps=10"]


def _run(workdir, kill_at_line: str | None = None) -> int:
  cmd = [sys.executable, "-m", "vlm_jax.main", *ARGS, f"--workdir={workdir}"]
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True)
  for line in proc.stdout:
    if kill_at_line and kill_at_line in line:
      proc.send_signal(signal.SIGKILL)
      break
  proc.stdout.close()
  return proc.wait(timeout=600)


@pytest.mark.slow
def test_sigkill_then_rerun_matches_uninterrupted(tmp_path):
  assert _run(tmp_path / "a") == 0
  # Kill as soon as step 25 is logged: checkpoint 20 exists (or is being written) and 30 does not.
  rc = _run(tmp_path / "b", kill_at_line="[flamingo] step 25/60")
  assert rc == -signal.SIGKILL
  assert not (tmp_path / "b" / "results.json").exists()
  assert _run(tmp_path / "b") == 0
  a = json.loads((tmp_path / "a" / "results.json").read_text())
  b = json.loads((tmp_path / "b" / "results.json").read_text())
  assert a == b
  assert a["step"] == 60
