"""Launch scripts: the TPU VM and Slurm command sequences (dry runs, and real runs against stub
gcloud / scontrol / srun / python executables on PATH), and the Colab notebook."""

import json
import os
import shlex
import stat
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TPU_VM = os.path.join(ROOT, "launch", "tpu_vm.py")
SLURM = os.path.join(ROOT, "launch", "slurm.py")
NOTEBOOK = os.path.join(ROOT, "launch", "colab.ipynb")
MAIN_ARGS = ["--config=configs/flamingo.py:tiny", "--workdir=gs://bucket/runs/fl",
             "--config.total_steps=20"]
TPU_ARGS = ["--name", "fl-test", "--zone", "us-west4-a", "--project", "proj",
            "--accelerator", "v5litepod-8", "--install", "git+https://github.com/ORG/vlm_jax.git@main"]


def run(script, *args, env=None, cwd=ROOT):
  return subprocess.run([sys.executable, script, *args], capture_output=True, text=True, env=env,
                        cwd=cwd, timeout=60)


def commands(stdout: str) -> list[list[str]]:
  """The dry-run's commands (comment lines dropped), each split back into its argv."""
  return [shlex.split(line) for line in stdout.splitlines() if line and not line.startswith("#")]


def stub(directory, name: str, body: str) -> None:
  path = os.path.join(directory, name)
  with open(path, "w") as f:
    f.write("#!/bin/bash\n" + body)
  os.chmod(path, os.stat(path).st_mode | stat.S_IXUSR)


def with_path(directory) -> dict:
  return {**os.environ, "PATH": f"{directory}{os.pathsep}{os.environ['PATH']}"}


# ---------------------------------------------------------------------------------------------
# Cloud TPU VM


def test_tpu_vm_dry_run_sequence():
  out = run(TPU_VM, "--dry-run", "--spot", *TPU_ARGS, "--", *MAIN_ARGS)
  assert out.returncode == 0, out.stderr
  cmds = commands(out.stdout)
  assert [c[:5] for c in cmds] == [["gcloud", "compute", "tpus", "tpu-vm", v] for v in
                                   ("create", "ssh", "scp", "ssh", "ssh", "delete")]
  create, prepare, scp, install, main, delete = cmds
  assert create[5:] == ["fl-test", "--zone=us-west4-a", "--project=proj",
                        "--accelerator-type=v5litepod-8", "--version=v2-alpha-tpuv5-lite", "--spot"]
  for ssh in (prepare, install, main):
    assert ssh[5] == "fl-test" and "--worker=all" in ssh and ssh[-2] == "--command"
  assert scp[5:] == ["--recurse", "configs", "fl-test:vlm_jax_run/", "--zone=us-west4-a",
                     "--project=proj", "--worker=all"]
  assert shlex.split(install[-1]) == ["python3", "-m", "pip", "install", "-U", "jax[tpu]",
                                      "git+https://github.com/ORG/vlm_jax.git@main"]
  remote = main[-1]
  assert "set -o pipefail" in remote and "cd ~/vlm_jax_run" in remote
  assert "python3 -m vlm_jax.main " + " ".join(MAIN_ARGS) + " 2>&1 | tee -a logs/" in remote
  assert delete[5:] == ["fl-test", "--zone=us-west4-a", "--project=proj", "--quiet"]


def test_tpu_vm_dry_run_queued_sdist_keep():
  args = [a for a in TPU_ARGS if not a.startswith(("--install", "git+"))]
  args[args.index("v5litepod-8")] = "v5p-16"
  out = run(TPU_VM, "--dry-run", "--queued", "--keep", "--sdist", "dist/vlm_jax-0.1.0.tar.gz",
            "--env", "A=b c", *args, "--", *MAIN_ARGS)
  assert out.returncode == 0, out.stderr
  cmds = commands(out.stdout)
  assert cmds[0][3:6] == ["queued-resources", "create", "fl-test"]
  assert "--node-id=fl-test" in cmds[0] and "--runtime-version=v2-alpha-tpuv5" in cmds[0]
  assert cmds[1][3:5] == ["queued-resources", "describe"]  # the wait-until-ACTIVE poll
  assert "fl-test:vlm_jax_run/" in cmds[4] and "dist/vlm_jax-0.1.0.tar.gz" in cmds[4]
  assert shlex.split(cmds[5][-1])[-1] == "~/vlm_jax_run/vlm_jax-0.1.0.tar.gz"
  assert "export 'A=b c';" in cmds[6][-1]
  assert not any("delete" in c for c in cmds)  # --keep: only a comment says how to delete
  assert "queued-resources delete fl-test" in out.stdout and "--force" in out.stdout
  assert "v5p-16, 2 host(s)" in out.stdout
  assert out.stderr == ""  # 2 hosts share a gs:// workdir: no warning


def test_tpu_vm_warns_on_local_workdir_for_multi_host():
  args = [*TPU_ARGS]
  args[args.index("v5litepod-8")] = "v5litepod-16"
  out = run(TPU_VM, "--dry-run", *args, "--", "--config=configs/flamingo.py", "--workdir=runs/x")
  assert out.returncode == 0 and "2 hosts; --workdir should be a gs:// path" in out.stderr


def test_tpu_vm_rejects_bad_arguments():
  assert run(TPU_VM, "--dry-run", *TPU_ARGS[:-2]).returncode == 2  # no --install / --sdist
  out = run(TPU_VM, "--dry-run", *TPU_ARGS, "--", "--workdir=x")
  assert out.returncode == 2 and "--config" in out.stderr
  out = run(TPU_VM, "--dry-run", *TPU_ARGS, "--", "--config=/abs/cfg.py")
  assert out.returncode == 2 and "relative" in out.stderr


@pytest.mark.parametrize("fail_on,code,deleted", [("vlm_jax.main", 3, True), ("create", 5, False)])
def test_tpu_vm_failure_exit_code_and_cleanup(tmp_path, fail_on, code, deleted):
  """A failing step's exit code comes back, stderr names the step, and the VM is deleted after a
  failed run, but never after a failed create (the name may belong to someone else's VM)."""
  calls = tmp_path / "calls"
  stub(tmp_path, "gcloud", f'echo "$*" >> {calls}\n'
       f'case "$*" in *{fail_on}*) echo "stub failure" >&2; exit {code};; esac\necho ok\n')
  out = run(TPU_VM, *TPU_ARGS, "--", *MAIN_ARGS, env=with_path(tmp_path))
  assert out.returncode == code, out.stderr
  failed = "run" if fail_on == "vlm_jax.main" else "create"
  assert f"step '{failed}' failed with exit code {code}" in out.stderr
  lines = calls.read_text().splitlines()
  assert lines[-1].startswith("compute tpus tpu-vm delete fl-test") == deleted
  if deleted:
    assert "ok" in out.stdout  # the earlier steps' output streamed through


# ---------------------------------------------------------------------------------------------
# Slurm


def slurm_args(tmp_path, *extra):
  return ["--nodes", "2", "--gpus-per-node", "8", "--partition", "h100", "--time", "01:00:00",
          "--chdir", str(tmp_path), "--log-dir", "logs", *extra, "--", *MAIN_ARGS]


def test_slurm_dry_run_script(tmp_path):
  out = run(SLURM, "--dry-run", *slurm_args(tmp_path))
  assert out.returncode == 0, out.stderr
  text = out.stdout
  for line in ("#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=1", "#SBATCH --gpus-per-node=8",
               "#SBATCH --partition=h100", "#SBATCH --exclusive", f"#SBATCH --chdir={tmp_path}",
               'COORDINATOR_HOST=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | sed -n 1p)',
               'export COORDINATOR_ADDRESS="$COORDINATOR_HOST:$((20000 + SLURM_JOB_ID % 20000))"',
               "export XLA_FLAGS=--xla_gpu_enable_latency_hiding_scheduler=true",
               f"sbatch {tmp_path}/logs/vlm_jax.sbatch"):
    assert line in text.splitlines(), line
  srun = shlex.split(text[text.index("\nsrun ") + 1:].split("\n# ----")[0].replace("\\\n", " "))
  assert srun[:2] == ["srun", "--kill-on-bad-exit=1"] and srun[-3:-1] == ["bash", "-c"]
  assert f"--output={tmp_path}/logs/%x-%j-node%n.log" in srun
  task = shlex.split(srun[-1])
  assert task[:6] == ["exec", "python", "-u", "-m", "vlm_jax.main", *MAIN_ARGS[:1]]
  assert task[6:] == MAIN_ARGS[1:] + [
    "--config.distributed.enabled=true",
    "--config.distributed.coordinator_address=$COORDINATOR_ADDRESS",
    "--config.distributed.num_processes=$SLURM_NTASKS",
    "--config.distributed.process_id=$SLURM_PROCID",
    "--config.distributed.local_device_ids=0,1,2,3,4,5,6,7"]
  assert not (tmp_path / "logs").exists()  # a dry run writes nothing


# srun stand-in: starts nodes x ntasks-per-node copies of the command with the task's Slurm
# variables, as srun does (sequentially here).
SRUN_STUB = """\
nodes=1; per=1
while [[ "$1" == --* ]]; do
  case "$1" in --nodes=*) nodes=${1#*=};; --ntasks-per-node=*) per=${1#*=};; esac; shift
done
export SLURM_NTASKS=$((nodes * per))
for ((n = 0; n < nodes; n++)); do for ((l = 0; l < per; l++)); do
  SLURM_PROCID=$((n * per + l)) SLURM_LOCALID=$l SLURM_NODEID=$n "$@" || exit $?
done; done
"""


@pytest.mark.parametrize("layout", ["node", "gpu"])
def test_slurm_script_runs_with_stub_slurm(tmp_path, layout):
  """The generated script itself, run by bash with stand-ins for scontrol, srun and python: every
  task gets the coordinator of the first node and its own rank and devices."""
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  # `scontrol show hostnames gpu-a17,gpu-b03`, plus many more lines: a reader that stops after the
  # first line would kill it with SIGPIPE (and the job with it, under pipefail).
  stub(bin_dir, "scontrol", 'echo gpu-a17; echo gpu-b03; seq 1 100000\n')
  stub(bin_dir, "srun", SRUN_STUB)
  stub(bin_dir, "python", f'printf "%s\\n" "$@" > {tmp_path}/argv.$SLURM_PROCID\n'
       f'echo "$SETUP_RAN $XLA_PYTHON_CLIENT_MEM_FRACTION" > {tmp_path}/env.$SLURM_PROCID\n')
  out = run(SLURM, "--no-submit", "--gpus-per-node", "4", "--nodes", "2", "--procs-per-node",
            layout, "--chdir", str(tmp_path), "--log-dir", "logs", "--setup", "export SETUP_RAN=1",
            "--", *MAIN_ARGS)
  assert out.returncode == 0, out.stderr
  script = tmp_path / "logs" / "vlm_jax.sbatch"
  assert out.stdout.strip() == f"sbatch {script}"
  env = {**with_path(bin_dir), "SLURM_JOB_NODELIST": "gpu-a17,gpu-b03", "SLURM_JOB_ID": "4321",
         "SLURM_JOB_NUM_NODES": "2"}
  done = subprocess.run(["bash", str(script)], capture_output=True, text=True, env=env,
                        cwd=tmp_path, timeout=30)
  assert done.returncode == 0, done.stderr
  assert "coordinator gpu-a17:24321" in done.stdout
  n = 2 if layout == "node" else 8
  assert sorted(p.name for p in tmp_path.glob("argv.*")) == sorted(f"argv.{i}" for i in range(n))
  for rank in range(n):
    assert (tmp_path / f"env.{rank}").read_text().split() == ["1", "0.90"]  # srun passes the env
    argv = (tmp_path / f"argv.{rank}").read_text().splitlines()
    assert argv[:4 + len(MAIN_ARGS)] == ["-u", "-m", "vlm_jax.main", *MAIN_ARGS,
                                         "--config.distributed.enabled=true"]
    flags = dict(a.split("=", 1) for a in argv[4 + len(MAIN_ARGS):])
    assert flags == {
      "--config.distributed.coordinator_address": "gpu-a17:24321",
      "--config.distributed.num_processes": str(n),
      "--config.distributed.process_id": str(rank),
      "--config.distributed.local_device_ids": "0,1,2,3" if layout == "node" else str(rank % 4)}


def test_slurm_submit_failure_propagates(tmp_path):
  stub(tmp_path, "sbatch", "echo 'sbatch: error: invalid partition' >&2; exit 1\n")
  out = run(SLURM, *slurm_args(tmp_path), env=with_path(tmp_path))
  assert out.returncode == 1
  assert "step 'submit' failed with exit code 1" in out.stderr
  assert (tmp_path / "logs" / "vlm_jax.sbatch").is_file()


# ---------------------------------------------------------------------------------------------
# Colab notebook


def test_colab_notebook(tmp_path):
  with open(NOTEBOOK) as f:
    text = f.read()
  nb = json.loads(text)
  assert nb["nbformat"] == 4 and nb["metadata"]["kernelspec"]["name"] == "python3"
  code = ["".join(c["source"]) for c in nb["cells"] if c["cell_type"] == "code"]
  notes = "".join("".join(c["source"]) for c in nb["cells"] if c["cell_type"] == "markdown")
  for src in code:
    compile(src, "<cell>", "exec")
  joined = "\n".join(code)
  for needle in ('"pip", "install"', '"-e", f".{EXTRA}"', '"tpu": "[tpu]"', '"git", "clone"',
                 "jax.devices()", '"vlm_jax.main", f"--config={CONFIG}", f"--workdir={WORKDIR}"',
                 'CONFIG = "configs/flamingo.py"', 'WORKDIR = "runs/flamingo"', "plt.subplots"):
    assert needle in joined, needle
  assert 'CONFIG = "configs/flamingo.py:tiny"' in notes  # the quick-check note
  try:
    import nbformat
  except ImportError:
    pass
  else:
    nbformat.validate(nbformat.reads(text, as_version=4))
  # The committed notebook is what launch/make_colab.py writes.
  out = subprocess.run([sys.executable, os.path.join(ROOT, "launch", "make_colab.py"),
                        str(tmp_path / "nb.ipynb")], capture_output=True, text=True, timeout=60)
  assert out.returncode == 0, out.stderr
  assert (tmp_path / "nb.ipynb").read_text() == text


def test_colab_loss_reader(tmp_path):
  """The notebook's event-file reader (both backends it tries) and its log-line fallback."""
  from tensorboardX import SummaryWriter

  with open(NOTEBOOK) as f:
    cells = ["".join(c["source"]) for c in json.load(f)["cells"] if c["cell_type"] == "code"]
  reader = next(c for c in cells if "def read_scalars" in c)
  ns = {}
  exec(reader, ns)  # noqa: S102 - our own notebook's cell
  writer = SummaryWriter(str(tmp_path))
  for step, loss in [(1, 4.0), (2, 3.0), (3, 2.5)]:
    writer.add_scalar("train/loss", loss, step)
  writer.close()
  # A resumed run rewrites step 3 in a second file.
  writer = SummaryWriter(str(tmp_path), filename_suffix=".resumed")
  writer.add_scalar("train/loss", 2.0, 3)
  writer.close()
  steps, values = ns["read_scalars"](str(tmp_path))["train/loss"]
  assert steps == [1, 2, 3] and values == pytest.approx([4.0, 3.0, 2.0])
  raw = ns["_scalars_tensorboardx"](str(tmp_path))["train/loss"]
  assert [s for s, _ in raw] == [1, 2, 3, 3]
  log = ("I1 metrics.py:59] [lm_pretrain] step 1/4 | loss 4.5828 | lr 3.00e-03\n"
         "I1 metrics.py:59] [flamingo] step 2/6 | loss 3.7531 | lr 9.05e-04 | 3.28 steps/s\n")
  assert ns["loss_from_log"](log) == {"lm_pretrain": ([1], [4.5828]), "flamingo": ([2], [3.7531])}


def test_readme_dry_run_examples_are_current():
  """launch/README.md shows these dry runs verbatim; regenerate them there if this fails."""
  with open(os.path.join(ROOT, "launch", "README.md")) as f:
    readme = f.read()
  runs = [
    (TPU_VM, "--name fl-v5e --zone us-west4-a --project my-proj --accelerator v5litepod-8 --spot "
             "--install git+https://github.com/ORG/vlm_jax.git@main -- "
             "--config=configs/flamingo.py --workdir=gs://my-bucket/runs/flamingo"),
    (TPU_VM, "--name fl-v5p --zone us-east5-a --project my-proj --accelerator v5p-16 --queued "
             "--sdist dist/vlm_jax-0.1.0.tar.gz -- --config=configs/flamingo.py:of3b "
             "--workdir=gs://my-bucket/runs/of3b"),
    (SLURM, "--nodes 2 --gpus-per-node 8 --partition h100 --time 04:00:00 --venv "
            "/shared/venvs/vlm_jax --chdir /shared/vlm_jax -- --config=configs/flamingo.py "
            "--workdir=/shared/runs/flamingo"),
  ]
  for script, args in runs:
    out = run(script, "--dry-run", *args.split())
    assert out.returncode == 0 and f"```\n{out.stdout}```" in readme, args
