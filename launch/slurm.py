#!/usr/bin/env python3
r"""Write (and submit) a Slurm batch script that runs `python -m vlm_jax.main` on N GPU nodes.

  python launch/slurm.py --nodes 2 --gpus-per-node 8 --partition h100 --time 04:00:00 \
      --venv ~/venvs/vlm_jax -- --config=configs/flamingo.py --workdir=/shared/runs/flamingo

writes `<log-dir>/<job-name>.sbatch` and submits it with `sbatch`; `--no-submit` only writes it and
`--dry-run` prints the script and the `sbatch` command without writing or running anything.

Process layout (--procs-per-node):
- `node` (default): one JAX process per node driving all its G GPUs (`local_device_ids=0..G-1`).
  One process per host is JAX's own multi-host model (as on TPU VMs): one input pipeline per node
  whose grain workers get the node's CPUs instead of G competing copies, one host copy of
  host-side state, intra-node collectives between devices of one process, and
  `num_processes` = number of nodes for the coordinator.
- `gpu`: one process per GPU (`local_device_ids=$SLURM_LOCALID`), the layout jax's Slurm
  auto-detection assumes. Use it when a single process per node hangs in NCCL or when per-GPU
  fault isolation matters more than the above.

Either way every task sees all of its node's GPUs (no --gpus-per-task, which would renumber them),
and the distributed setup is passed explicitly as `--config.distributed.*` overrides:
`coordinator_address` is the first host of $SLURM_JOB_NODELIST (`scontrol show hostnames`) at a
port derived from the job id, `num_processes` is $SLURM_NTASKS and `process_id` is $SLURM_PROCID,
each read by the task itself when it starts. Each task writes its own log
(`<log-dir>/<job-name>-<jobid>-node<n>.log`, or `-task<t>.log` per GPU).

Only the standard library is used.
"""

import argparse
import os
import shlex
import subprocess
import sys
import textwrap
from cli_args import split_main_args

# Environment exported before `srun` (override or extend with --env KEY=VALUE, drop with
# --no-default-env). Each is a common setting for JAX on H100 clusters; the comment says why.
DEFAULT_ENV = (
  ("XLA_FLAGS", "--xla_gpu_enable_latency_hiding_scheduler=true",
   "let XLA's scheduler overlap collectives (FSDP all-gathers / reduce-scatters) with compute "
   "(JAX 'GPU performance tips'; on by default in NVIDIA's JAX-Toolbox images)"),
  ("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.90",
   "preallocate 90% of each GPU instead of JAX's 75% default; the rest is left to NCCL and cuDNN "
   "workspaces"),
  ("CUDA_DEVICE_MAX_CONNECTIONS", "1",
   "a single hardware work queue on Hopper so communication kernels launch in XLA's order "
   "(JAX-Toolbox setting for H100; do not set it on Blackwell)"),
  ("NCCL_DEBUG", "WARN",
   "NCCL prints warnings only; use INFO once to check topology, transports (NVLink, IB) and rings"),
)
# Interconnect settings are cluster-specific: they are written as comments to fill in, never set.
CLUSTER_ENV_HINTS = (
  "# export NCCL_SOCKET_IFNAME=<bootstrap NIC, e.g. eth0 or ens>  # if NCCL picks the wrong one",
  "# export NCCL_IB_HCA=<mlx5_0,...>                              # restrict NCCL to these IB HCAs",
)


def parse_args(argv: list[str]) -> argparse.Namespace:
  argv, main_args = split_main_args(argv)
  p = argparse.ArgumentParser(prog="launch/slurm.py", description=__doc__.split("\n\n")[0],
                              epilog="Arguments after `--` go to `python -m vlm_jax.main`.")
  p.add_argument("--nodes", type=int, required=True)
  p.add_argument("--gpus-per-node", type=int, default=8)
  p.add_argument("--procs-per-node", choices=("node", "gpu"), default="node",
                 help="one JAX process per node (default) or per GPU; see the module docstring")
  p.add_argument("--job-name", default="vlm_jax")
  p.add_argument("--partition", default=None)
  p.add_argument("--account", default=None)
  p.add_argument("--qos", default=None)
  p.add_argument("--time", default=None, help="wall-clock limit, e.g. 04:00:00")
  p.add_argument("--cpus-per-task", type=int, default=None,
                 help="CPUs per task (default: the node's share that Slurm gives)")
  p.add_argument("--mem", default="0", help="#SBATCH --mem (default 0 = all of the node's memory)")
  p.add_argument("--gres", action="store_true",
                 help="request GPUs with --gres=gpu:G instead of --gpus-per-node=G")
  p.add_argument("--no-exclusive", action="store_true", help="do not request whole nodes")
  p.add_argument("--sbatch-arg", action="append", default=[], metavar="ARG",
                 help="extra '#SBATCH ARG' line, e.g. --sbatch-arg=--constraint=h100 (repeatable)")
  p.add_argument("--chdir", default=None,
                 help="directory the job runs in (default: this one); --config paths are relative "
                      "to it")
  p.add_argument("--venv", default=None, help="virtual environment to activate before srun")
  p.add_argument("--setup", action="append", default=[], metavar="CMD",
                 help="shell line run before srun, e.g. 'module load cuda/12.4' (repeatable)")
  p.add_argument("--python", default="python", help="interpreter on the nodes (default 'python')")
  p.add_argument("--port", type=int, default=None,
                 help="coordinator port (default: 20000 + SLURM_JOB_ID %% 20000)")
  p.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                 help="extra or overriding environment variable (repeatable)")
  p.add_argument("--no-default-env", action="store_true", help="drop the default XLA/NCCL env")
  p.add_argument("--log-dir", default="runs/slurm",
                 help="where the .sbatch file and the per-node logs go (default runs/slurm)")
  p.add_argument("--no-submit", action="store_true", help="write the script, do not sbatch it")
  p.add_argument("--dry-run", action="store_true",
                 help="print the script and the sbatch command; write and run nothing")
  args = p.parse_args(argv)
  args.main_args = main_args
  if not main_args or not any(a == "--config" or a.startswith("--config=") for a in main_args):
    p.error("pass the vlm_jax.main arguments after `--`, including --config=<file>[:preset]")
  if args.nodes < 1 or args.gpus_per_node < 1:
    p.error("--nodes and --gpus-per-node must be >= 1")
  for e in args.env:
    if "=" not in e:
      p.error(f"--env {e!r}: expected KEY=VALUE")
  # Slurm opens the log files before the script runs, relative to the job's directory: make both
  # absolute so the files land where this launcher creates the directory.
  args.chdir = os.path.abspath(os.path.expanduser(args.chdir or os.getcwd()))
  args.log_dir = os.path.join(args.chdir, os.path.expanduser(args.log_dir))
  return args


def environment(args: argparse.Namespace) -> list[str]:
  lines, overridden = [], {e.split("=", 1)[0] for e in args.env}
  if not args.no_default_env:
    for key, value, why in DEFAULT_ENV:
      if key not in overridden:
        lines += textwrap.wrap(why, 98, initial_indent="# ", subsequent_indent="# ",
                               break_on_hyphens=False)
        lines.append(f"export {key}={shlex.quote(value)}")
    lines += CLUSTER_ENV_HINTS
  for e in args.env:
    key, value = e.split("=", 1)
    lines.append(f"export {key}={shlex.quote(value)}")
  return lines


def task_command(args: argparse.Namespace) -> str:
  """The command each task runs: vlm_jax.main with the distributed overrides. The $SLURM_* values
  are expanded by each task's own shell, so every task gets its own rank."""
  if args.procs_per_node == "node":
    local_ids = ",".join(str(i) for i in range(args.gpus_per_node))
  else:
    local_ids = "$SLURM_LOCALID"
  main = shlex.join([args.python, "-u", "-m", "vlm_jax.main", *args.main_args])
  overrides = [
    "--config.distributed.enabled=true",
    '--config.distributed.coordinator_address="$COORDINATOR_ADDRESS"',
    '--config.distributed.num_processes="$SLURM_NTASKS"',
    '--config.distributed.process_id="$SLURM_PROCID"',
    f'--config.distributed.local_device_ids="{local_ids}"',
  ]
  return "exec " + main + " " + " ".join(overrides)


def srun_command(args: argparse.Namespace) -> list[str]:
  per_node = args.procs_per_node == "node"
  log = os.path.join(args.log_dir, f"%x-%j-{'node%n' if per_node else 'task%t'}.log")
  return ["srun", "--kill-on-bad-exit=1", f"--nodes={args.nodes}",
          f"--ntasks-per-node={1 if per_node else args.gpus_per_node}", f"--output={log}",
          "bash", "-c", task_command(args)]


def sbatch_script(args: argparse.Namespace, argv: list[str]) -> str:
  per_node = args.procs_per_node == "node"
  ntasks = 1 if per_node else args.gpus_per_node
  sb = [f"--job-name={args.job_name}", f"--nodes={args.nodes}", f"--ntasks-per-node={ntasks}",
        f"--gres=gpu:{args.gpus_per_node}" if args.gres else
        f"--gpus-per-node={args.gpus_per_node}"]
  sb += [f"--{k}={v}" for k, v in (("partition", args.partition), ("account", args.account),
                                    ("qos", args.qos), ("time", args.time),
                                    ("cpus-per-task", args.cpus_per_task), ("mem", args.mem)) if v]
  sb += [] if args.no_exclusive else ["--exclusive"]
  sb += [f"--chdir={args.chdir}",
         f"--output={os.path.join(args.log_dir, '%x-%j.out')}", *args.sbatch_arg]
  port = str(args.port) if args.port else "$((20000 + SLURM_JOB_ID % 20000))"
  lines = [
    "#!/bin/bash",
    "# Generated by: python launch/slurm.py "
    + shlex.join(a for a in argv if a not in ("--dry-run", "--no-submit")),
    f"# {args.nodes} node(s) x {args.gpus_per_node} GPU(s), one JAX process per "
    f"{'node' if per_node else 'GPU'} ({args.nodes * ntasks} in all).",
    *[f"#SBATCH {s}" for s in sb],
    "",
    "set -euo pipefail",
    f"mkdir -p {shlex.quote(args.log_dir)}",
  ]
  setup = list(args.setup)
  if args.venv:
    setup.append(f"source {shlex.quote(os.path.join(args.venv, 'bin', 'activate'))}")
  if setup:  # module / conda / venv scripts often read unset variables: no `set -u` around them
    lines += ["set +u", *setup, "set -u"]
  lines += [
    "",
    "# jax.distributed coordinator: the first host of the allocation; the port is derived from the",
    "# job id so two jobs sharing a node do not collide. (`sed -n 1p`, not `head -n 1`: head",
    "# closes the pipe early, scontrol dies of SIGPIPE and pipefail would end the job.)",
    'COORDINATOR_HOST=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | sed -n 1p)',
    f"export COORDINATOR_ADDRESS=\"$COORDINATOR_HOST:{port}\"",
    'echo "coordinator $COORDINATOR_ADDRESS, $SLURM_JOB_NUM_NODES node(s): $SLURM_JOB_NODELIST"',
    "",
    *environment(args),
    "",
    "# srun exports this environment to every task; each task's log is its own file.",
    " \\\n  ".join(shlex.join(srun_command(args)[i:j]) for i, j in ((0, 3), (3, 5), (5, None))),
    "",
  ]
  return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
  argv = sys.argv[1:] if argv is None else argv
  args = parse_args(argv)
  script = sbatch_script(args, argv)
  path = os.path.join(args.log_dir, f"{args.job_name}.sbatch")
  submit = ["sbatch", path]
  if args.dry_run:
    print(f"# ---- {path} ----")
    print(script, end="")
    print(f"# ---- submit with ----\n{shlex.join(submit)}")
    return 0
  os.makedirs(args.log_dir, exist_ok=True)
  with open(path, "w") as f:
    f.write(script)
  print(f"slurm.py: wrote {path}", file=sys.stderr)
  if args.no_submit:
    print(shlex.join(submit))
    return 0
  try:
    code = subprocess.call(submit)
  except FileNotFoundError:
    print("slurm.py: step 'submit' failed: sbatch not found (not on a Slurm login node?)",
          file=sys.stderr)
    return 127
  if code:
    print(f"slurm.py: step 'submit' failed with exit code {code}", file=sys.stderr)
  return code


if __name__ == "__main__":
  sys.exit(main())
