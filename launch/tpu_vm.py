#!/usr/bin/env python3
r"""Run `python -m vlm_jax.main` on a Cloud TPU VM (single host or pod slice) from your own machine.

One command does the whole life cycle, each step one `gcloud` call:

  1. create     `gcloud compute tpus tpu-vm create` (or, with --queued, `queued-resources create` and
                a poll of `queued-resources describe` until the request is ACTIVE)
  2. copy       `tpu-vm scp --worker=all`: the local config directory (the one --config names) and,
                with --sdist, a locally built source distribution
  3. install    `tpu-vm ssh --worker=all`: `pip install -U 'jax[tpu]' <package>` on every host
  4. run        `tpu-vm ssh --worker=all`: the same `python -m vlm_jax.main ...` on every host (JAX
                pod slices need one process per host, all started together). Output streams here
                (and to --log-file); each host also keeps its own log in ~/vlm_jax_run/logs/.
  5. delete     `tpu-vm delete` / `queued-resources delete --force`, also after a failed step or
                Ctrl-C, unless --keep. Nothing is deleted if the create step itself failed.

Everything after `--` is passed to `vlm_jax.main` unchanged:

  python launch/tpu_vm.py --name fl-v5e --zone us-west4-a --project my-proj \
      --accelerator v5litepod-8 --install 'git+https://github.com/ORG/vlm_jax.git@main' \
      -- --config=configs/flamingo.py --workdir=gs://my-bucket/runs/flamingo

--dry-run prints every command, one per line, shell-quoted (so the output is itself a shell script)
instead of running it. The exit code is the failing step's; stderr names the step.

Only the standard library is used, so this runs wherever `gcloud` does.
"""

import argparse
import os
import posixpath
import re
import shlex
import subprocess
import sys
import time
from cli_args import split_main_args

# The JAX runtime ("software version") per TPU generation, from the Cloud TPU docs' "TPU software
# versions" table: the base images on which `pip install jax[tpu]` is the recommended setup.
RUNTIME_VERSIONS = (
  ("v6e", "v2-alpha-tpuv6e"),
  ("v5p", "v2-alpha-tpuv5"),
  ("v5litepod", "v2-alpha-tpuv5-lite"),
  ("v5e", "v2-alpha-tpuv5-lite"),
  ("v4", "tpu-ubuntu2204-base"),
  ("v3", "tpu-ubuntu2204-base"),
  ("v2", "tpu-ubuntu2204-base"),
)
REMOTE_DIR = "vlm_jax_run"  # under the remote home directory, on every worker


class StepFailed(Exception):

  def __init__(self, step: str, code: int):
    super().__init__(f"step {step!r} failed with exit code {code}")
    self.step, self.code = step, code


def default_runtime(accelerator: str) -> str:
  for prefix, version in RUNTIME_VERSIONS:
    if accelerator.startswith(prefix + "-"):
      return version
  raise SystemExit(f"tpu_vm.py: no default --runtime-version for accelerator {accelerator!r}; "
                   "pass --runtime-version (see `gcloud compute tpus tpu-vm versions list`)")


def num_hosts(accelerator: str) -> int:
  """Hosts (TPU VM workers) of a slice: every generation puts 8 of the counted units on one host
  (v2/v3/v4/v5p count TensorCores, 2 per chip, 4 chips per host; v5e/v6e count chips, 8 per host)."""
  m = re.search(r"-(\d+)$", accelerator)
  return max(1, int(m.group(1)) // 8) if m else 1


def config_path(main_args: list[str]) -> str | None:
  """The file of `--config=<path>[:preset]` among the vlm_jax.main arguments."""
  for i, a in enumerate(main_args):
    if a.startswith("--config="):
      return a.split("=", 1)[1].partition(":")[0]
    if a == "--config" and i + 1 < len(main_args):
      return main_args[i + 1].partition(":")[0]
  return None


def workdir_arg(main_args: list[str]) -> str | None:
  for i, a in enumerate(main_args):
    if a.startswith("--workdir="):
      return a.split("=", 1)[1]
    if a == "--workdir" and i + 1 < len(main_args):
      return main_args[i + 1]
  return None


class Plan:
  """The gcloud commands of one launch, built from the parsed flags."""

  def __init__(self, args: argparse.Namespace):
    self.a = args
    self.where = [f"--zone={args.zone}"] + ([f"--project={args.project}"] if args.project else [])
    self.runtime = args.runtime_version or default_runtime(args.accelerator)

  def _tpu(self, *verb: str) -> list[str]:
    return ["gcloud", "compute", "tpus", "tpu-vm", *verb]

  def _qr(self, *verb: str) -> list[str]:
    return ["gcloud", "compute", "tpus", "queued-resources", *verb]

  def create(self) -> list[str]:
    a = self.a
    spot = ["--spot"] if a.spot else []
    if a.queued:
      return self._qr("create", a.name, f"--node-id={a.name}", *self.where,
                      f"--accelerator-type={a.accelerator}", f"--runtime-version={self.runtime}",
                      *spot)
    return self._tpu("create", a.name, *self.where, f"--accelerator-type={a.accelerator}",
                     f"--version={self.runtime}", *spot)

  def describe_queued(self) -> list[str]:
    return self._qr("describe", self.a.name, *self.where, "--format=value(state.state)")

  def ssh_all(self, remote: str) -> list[str]:
    return self._tpu("ssh", self.a.name, *self.where, "--worker=all", "--command", remote)

  def scp_all(self, local: str, remote: str, recurse: bool = False) -> list[str]:
    return self._tpu("scp", *(["--recurse"] if recurse else []), local, f"{self.a.name}:{remote}",
                     *self.where, "--worker=all")

  def delete(self) -> list[str]:
    if self.a.queued:  # --force deletes the node first, then the request
      return self._qr("delete", self.a.name, *self.where, "--force", "--quiet")
    return self._tpu("delete", self.a.name, *self.where, "--quiet")

  def config_dir(self) -> str:
    """The directory of the --config file, relative to where the launcher runs ('' = here)."""
    return os.path.dirname(os.path.normpath(config_path(self.a.main_args) or ""))

  def copy_steps(self) -> list[tuple[str, list[str]]]:
    """(step name, command) pairs that put the config directory and the sdist on every worker."""
    cdir = self.config_dir()
    parent = os.path.dirname(cdir)
    dirs = [f"~/{REMOTE_DIR}/logs"] + ([f"~/{REMOTE_DIR}/{parent}"] if parent else [])
    steps = [("prepare", self.ssh_all("mkdir -p " + " ".join(dirs)))]
    if self.a.main_args:
      # Configs are not part of the installed package: copy the directory --config points into, so
      # the same relative --config path works from ~/vlm_jax_run on every worker. (scp's remote
      # paths are relative to the remote home directory.)
      if cdir:
        remote = posixpath.join(REMOTE_DIR, parent, "")
        steps.append(("copy", self.scp_all(cdir, remote, recurse=True)))
      else:
        steps.append(("copy", self.scp_all(config_path(self.a.main_args), f"{REMOTE_DIR}/")))
    if self.a.sdist:
      steps.append(("copy", self.scp_all(self.a.sdist, f"{REMOTE_DIR}/")))
    return steps

  def install_command(self) -> str | None:
    a = self.a
    if a.sdist:
      package = f"~/{REMOTE_DIR}/{shlex.quote(os.path.basename(a.sdist))}"
    elif a.install:
      package = shlex.quote(a.install)
    else:
      return None
    return f'python3 -m pip install -U "{a.jax_spec}" {package}'

  def run_command(self) -> str:
    env = "".join(f"export {shlex.quote(e)}; " for e in self.a.env)
    main = shlex.join(["python3", "-m", "vlm_jax.main", *self.a.main_args])
    # pipefail: the exit status is python's, not tee's. The log name carries the host name so logs
    # copied together from all workers stay apart.
    return (f"set -o pipefail; cd ~/{REMOTE_DIR} && {env}{main} 2>&1 | "
            f"tee -a logs/vlm_jax_main.$(hostname).log")


def run_streaming(cmd: list[str], log_file) -> int:
  """Runs cmd with its stdout+stderr copied line by line to our stdout (and to log_file)."""
  if log_file is None:
    return subprocess.call(cmd)
  with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                        bufsize=1) as proc:
    for line in proc.stdout:
      sys.stdout.write(line)
      sys.stdout.flush()
      log_file.write(line)
      log_file.flush()
    return proc.wait()


class Runner:

  def __init__(self, dry_run: bool, log_file=None):
    self.dry_run, self.log_file = dry_run, log_file

  def step(self, name: str, cmd: list[str], note: str = "") -> None:
    if self.dry_run:
      print(f"# [{name}]{' ' + note if note else ''}")
      print(shlex.join(cmd), flush=True)
      return
    print(f"tpu_vm.py: [{name}] {shlex.join(cmd)}", file=sys.stderr, flush=True)
    code = run_streaming(cmd, self.log_file)
    if code != 0:
      raise StepFailed(name, code)

  def wait_active(self, plan: Plan, poll_s: float, timeout_s: float) -> None:
    cmd = plan.describe_queued()
    if self.dry_run:
      print("# [wait] repeat until it prints ACTIVE (FAILED / SUSPENDED stop the launch)")
      print(shlex.join(cmd), flush=True)
      return
    deadline = time.monotonic() + timeout_s
    while True:
      out = subprocess.run(cmd, capture_output=True, text=True)
      state = out.stdout.strip()
      if out.returncode != 0:
        sys.stderr.write(out.stderr)
        raise StepFailed("wait", out.returncode)
      print(f"tpu_vm.py: [wait] queued resource {plan.a.name}: {state}", file=sys.stderr,
            flush=True)
      if state == "ACTIVE":
        return
      if state in ("FAILED", "SUSPENDED"):
        raise StepFailed("wait", 1)
      if time.monotonic() > deadline:
        print(f"tpu_vm.py: [wait] not ACTIVE after {timeout_s:.0f}s", file=sys.stderr)
        raise StepFailed("wait", 124)
      time.sleep(poll_s)


def parse_args(argv: list[str]) -> argparse.Namespace:
  argv, main_args = split_main_args(argv)
  p = argparse.ArgumentParser(
    prog="launch/tpu_vm.py", description=__doc__.split("\n\n")[0],
    formatter_class=argparse.RawDescriptionHelpFormatter,
    epilog="Arguments after `--` go to `python -m vlm_jax.main` on every worker.")
  p.add_argument("--name", required=True, help="TPU VM name (and queued resource id)")
  p.add_argument("--zone", required=True, help="e.g. us-west4-a (v5e), us-east5-a (v5p)")
  p.add_argument("--project", default=None, help="GCP project (default: gcloud's core/project)")
  p.add_argument("--accelerator", default="v5litepod-8",
                 help="accelerator type: v5litepod-8, v5litepod-16, v5p-8, v6e-8, v4-8, ...")
  p.add_argument("--runtime-version", default=None,
                 help="TPU software version (default by generation: v5e v2-alpha-tpuv5-lite, v5p "
                      "v2-alpha-tpuv5, v6e v2-alpha-tpuv6e, v4 and older tpu-ubuntu2204-base)")
  p.add_argument("--spot", action="store_true", help="Spot capacity (preemptible, cheaper)")
  p.add_argument("--queued", action="store_true",
                 help="request through a queued resource and wait until it is ACTIVE")
  p.add_argument("--wait-timeout", type=float, default=3600.0,
                 help="seconds to wait for a queued resource (default 3600)")
  p.add_argument("--poll", type=float, default=30.0, help="seconds between queue polls")
  src = p.add_mutually_exclusive_group()
  src.add_argument("--install", default=None,
                   help="pip requirement installed on every worker, e.g. "
                        "'git+https://github.com/ORG/vlm_jax.git@main' or 'vlm_jax==0.1.0'")
  src.add_argument("--sdist", default=None,
                   help="local source distribution to copy and install (python -m build --sdist)")
  p.add_argument("--jax-spec", default="jax[tpu]",
                 help="JAX requirement installed with the package (default 'jax[tpu]')")
  p.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                 help="environment variable exported before the run on every worker (repeatable)")
  p.add_argument("--reuse", action="store_true",
                 help="use an existing TPU VM of this name instead of creating one")
  p.add_argument("--skip-install", action="store_true", help="the workers already have the package")
  p.add_argument("--keep", action="store_true", help="do not delete the TPU VM at the end")
  p.add_argument("--log-file", default=None, help="also write the streamed output to this file")
  p.add_argument("--dry-run", action="store_true",
                 help="print the commands (one per line, shell-quoted) instead of running them")
  args = p.parse_args(argv)
  args.main_args = main_args
  if not (args.install or args.sdist or args.skip_install):
    p.error("one of --install, --sdist or --skip-install is required")
  if args.sdist and not args.dry_run and not os.path.isfile(args.sdist):
    p.error(f"--sdist {args.sdist}: no such file")
  if not re.fullmatch(r"[\w\[\]<>=!~.,-]+", args.jax_spec):
    p.error(f"--jax-spec {args.jax_spec!r}: expected a plain requirement such as 'jax[tpu]==0.6.2'")
  for e in args.env:
    if "=" not in e:
      p.error(f"--env {e!r}: expected KEY=VALUE")
  if main_args:
    cfg = config_path(main_args)
    if cfg is None:
      p.error("the vlm_jax.main arguments after `--` need --config=<file>[:preset]")
    if os.path.isabs(cfg) or os.path.normpath(cfg).startswith(".."):
      p.error(f"--config={cfg}: use a path relative to this directory (it is copied to the same "
              f"relative path under ~/{REMOTE_DIR} on every worker)")
  return args


def main(argv: list[str] | None = None) -> int:
  args = parse_args(sys.argv[1:] if argv is None else argv)
  plan = Plan(args)
  hosts = num_hosts(args.accelerator)
  workdir = workdir_arg(args.main_args)
  if hosts > 1 and args.main_args and not (workdir or "").startswith("gs://"):
    print(f"tpu_vm.py: warning: {args.accelerator} has {hosts} hosts; --workdir should be a gs:// "
          "path every host can write (checkpoints are written by all hosts)", file=sys.stderr)
  log_file = open(args.log_file, "a") if args.log_file and not args.dry_run else None
  runner = Runner(args.dry_run, log_file)
  created = args.reuse  # delete only what exists: a failed create must not delete a same-named VM
  failure = None
  try:
    if not args.reuse:
      runner.step("create", plan.create(), f"{args.accelerator}, {hosts} host(s), {plan.runtime}")
      created = True
      if args.queued:
        runner.wait_active(plan, args.poll, args.wait_timeout)
    for name, cmd in plan.copy_steps():
      runner.step(name, cmd)
    install = None if args.skip_install else plan.install_command()
    if install:
      runner.step("install", plan.ssh_all(install), "on every worker")
    if args.main_args:
      runner.step("run", plan.ssh_all(plan.run_command()), "the same command on every worker")
  except StepFailed as e:
    failure = e
  except KeyboardInterrupt:
    failure = StepFailed("interrupted", 130)
  finally:
    if created and not args.keep:
      try:
        runner.step("delete", plan.delete(), "(--keep skips this)")
      except StepFailed as e:
        print(f"tpu_vm.py: {e}; delete {args.name} by hand: {shlex.join(plan.delete())}",
              file=sys.stderr)
        failure = failure or e
    elif created and args.dry_run:
      print(f"# [keep] {args.name} is left running; delete it with:\n# {shlex.join(plan.delete())}")
    if log_file:
      log_file.close()
  if failure:
    print(f"tpu_vm.py: {failure}", file=sys.stderr)
    return failure.code
  return 0


if __name__ == "__main__":
  sys.exit(main())
