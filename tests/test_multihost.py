"""Multi-host training: two local processes (4 fake CPU devices each, gloo collectives) train, stop,
resume, and end where one process on 8 devices does; checkpoints restore across mesh shapes.

The slow tests share one module-scoped set of runs of the tiny Flamingo with its LM-pretraining init
stage disabled (the stage would double the time and adds nothing multi-host specific), a constant
learning rate (so the first leg's shorter `total_steps` does not change the schedule) and small
evaluators of each kind (synthetic VQA, held-out loss, few-shot generation and ranked
classification; evaluations are collective too):
  two   `python -m vlm_jax.main` x 2 processes, steps 0-3, then both restarted to step 6 (resume)
  ref   1 process, 8 devices, steps 0-6; its global batch is made of the same two process shards
  check 1 process, 8 devices: restores both final checkpoints onto one mesh and compares; restores
        a checkpoint written under fsdp=8 onto data=2, fsdp=2, tensor=2
"""

import json
import os
import socket
import subprocess
import sys
import textwrap

import pytest

from tests.train.configs_loader import ROOT
from vlm_jax import distributed
from vlm_jax.config_base import base_config

STEPS_FIRST, STEPS = 3, 6
# The same global batch (8) and mesh sizes (data=2 x fsdp=4) in both runs, so the programs differ
# only in where devices live; what remains is float32 reduction order.
MESH = {"data": 2, "fsdp": 4, "tensor": 1}

CONFIG_FILE = textwrap.dedent("""
  import os
  from vlm_jax.config_base import load_config

  def get_config(arg=None):
    c = load_config(os.path.join({root!r}, "configs", "flamingo.py"), "tiny")
    c.init.stage = None
    c.evals = {{"vqa": {{"type": "synthetic_vqa", "num_examples": 8, "batch_size": 8}},
               "heldout": {{"type": "loss", "num_batches": 2}},
               "fewshot": {{"type": "fewshot", "shots": [0, 2], "trial_seeds": [0],
                           "num_beams": 2, "batch_size": 8, "tasks": {{
                             "vqa": {{"dataset": "synthetic_vqa", "num_train": 16, "num_test": 8}},
                             "shape": {{"dataset": "synthetic_classification", "num_train": 16,
                                       "num_test": 8}}}}}}}}
    c.optimizer.schedule = "constant"
    c.optimizer.warmup_steps = 0
    c.mesh.update({mesh!r})
    c.total_steps = {steps}
    c.log_every = 1
    c.checkpoint.every_steps = 3
    c.distributed.cpu_collectives = "gloo"
    c.distributed.initialization_timeout = 120
    return c
""")

# The single-process reference: the trainer's and the held-out evaluator's make_dataset replaced by
# the concatenation of the two processes' shards (each shard is what `make_dataset(process_index=i,
# process_count=2)` gives the 2-process run), then the real entry point.
REFERENCE = textwrap.dedent("""
  import json, runpy, sys
  import jax, numpy as np
  from vlm_jax.eval import evaluators
  from vlm_jax.train import trainer

  build = trainer.make_dataset

  class Merged:
    def __init__(self, its):
      self.its = its
    def __iter__(self):
      return self
    def __next__(self):
      parts = [next(it) for it in self.its]
      return jax.tree.map(lambda *xs: np.concatenate(xs), *parts)
    def get_state(self):  # grain's checkpoint handler stores bytes for non-grain iterators
      return json.dumps([it.get_state() for it in self.its]).encode()
    def set_state(self, state):
      for it, s in zip(self.its, json.loads(state)):
        it.set_state(s)
    def start_prefetch(self):
      pass

  class TwoShards:
    def __init__(self, data_config, *, split, batch_size, **kw):
      self.args = data_config, split, batch_size // 2, kw
    def __iter__(self):
      cfg, split, bs, kw = self.args
      return Merged([iter(build(cfg, split=split, batch_size=bs, process_index=i, process_count=2,
                                **kw)) for i in range(2)])

  trainer.make_dataset = evaluators.make_dataset = TwoShards
  sys.argv = ["vlm_jax.main", *sys.argv[1:]]
  runpy.run_module("vlm_jax.main", run_name="__main__")
""")

CHECK = textwrap.dedent("""
  import json, sys
  import jax, jax.numpy as jnp, numpy as np
  sys.path.insert(0, ".")
  from vlm_jax import sharding
  from vlm_jax.config_base import load_config
  from vlm_jax.data.pipeline import make_dataset
  from vlm_jax.models import build_model
  from vlm_jax.train.checkpointing import Checkpointer
  from vlm_jax.train.trainer import build_state

  config_path, two_dir, ref_dir, resaved_dir, step = sys.argv[1:6]
  step = int(step)
  c = load_config(config_path)
  model = build_model(c.model_name, c.model)
  rules = sharding.logical_rules(None)
  batch = next(iter(make_dataset(c.data, split="train", batch_size=1, process_index=0,
                                 process_count=1)))
  ex = jax.tree.map(lambda x: jnp.asarray(x[:1]), batch["inputs"])

  def abstract_on(mesh_cfg):
    return build_state(c, model, ex, sharding.make_mesh(mesh_cfg), rules)[2]

  def restore(directory, abstract):
    ckpt = Checkpointer(directory, max_to_keep=3, save_every=1, async_save=False)
    state = ckpt.restore(step, abstract)
    ckpt.close()
    return state

  def leaves(state):
    return {jax.tree_util.keystr(p): np.asarray(x)
            for p, x in jax.tree_util.tree_leaves_with_path(state)}

  out = {}
  on_run_mesh = abstract_on({"data": 2, "fsdp": 4, "tensor": 1})
  two, ref = leaves(restore(two_dir, on_run_mesh)), leaves(restore(ref_dir, on_run_mesh))
  assert two.keys() == ref.keys()
  out["max_abs_diff"] = max(float(np.max(np.abs(two[k] - ref[k]))) for k in two)
  out["max_rel_diff"] = max(float(np.max(np.abs(two[k] - ref[k]) / (np.abs(ref[k]) + 1e-6)))
                            for k in two)
  out["trained_moved"] = float(np.max(np.abs(ref[".trainable['xattn_0']['attn_gate']"])))

  # Save under fsdp=8, restore under data=2 x fsdp=2 x tensor=2.
  fsdp8 = restore(ref_dir, abstract_on({"data": 1, "fsdp": 8, "tensor": 1}))
  ckpt = Checkpointer(resaved_dir, max_to_keep=1, save_every=1, async_save=False)
  ckpt.save(step, fsdp8, None, force=True)
  ckpt.close()
  reshaped = restore(resaved_dir, abstract_on({"data": 2, "fsdp": 2, "tensor": 2}))
  a, b = leaves(fsdp8), leaves(reshaped)
  out["reshape_equal"] = a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
  q = lambda s: s.trainable["xattn_0"]["attn"]["q"]["kernel"]
  out["q_shards"] = [list(q(s).addressable_shards[0].data.shape) for s in (fsdp8, reshaped)]
  print("RESULT" + json.dumps(out))
""")


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _env(devices: int, cache, **extra) -> dict:
  """Fake CPU devices; compile time dominates these tiny runs, so XLA mostly skips optimising and
  the second leg reuses the first leg's executables (persistent compilation cache)."""
  return {**os.environ, "JAX_PLATFORMS": "cpu", "TF_CPP_MIN_LOG_LEVEL": "3",
          "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}",
          "JAX_DISABLE_MOST_OPTIMIZATIONS": "true", "JAX_COMPILATION_CACHE_DIR": str(cache),
          "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0", **extra}


def _finish(procs, logs) -> None:
  for i, p in enumerate(procs):
    try:
      rc = p.wait(timeout=300)
    except subprocess.TimeoutExpired:
      for q in procs:
        q.kill()
      rc = "timeout"
    assert rc == 0, f"process {i} ended with {rc}:\n{logs[i].read_text()[-4000:]}"


def _train_two(config: str, workdir: str, steps: int, tmp, leg: str) -> list[str]:
  """Both processes of the 2-process run; returns their logs. The first leg passes the process
  layout as config flags, the second as environment variables (both paths of maybe_initialize)."""
  port = _free_port()
  procs, logs = [], []
  for i in range(2):
    # The same data=2 x fsdp=4 mesh, declared as one data row per process (node) over the DCN.
    cmd = [sys.executable, "-m", "vlm_jax.main", f"--config={config}", f"--workdir={workdir}",
           f"--config.total_steps={steps}", "--config.mesh.data=1", "--config.dcn_mesh.data=2"]
    extra = {}
    if leg == "first":
      cmd += [f"--config.distributed.coordinator_address=127.0.0.1:{port}",
              "--config.distributed.num_processes=2", f"--config.distributed.process_id={i}"]
    else:
      extra = {distributed.ENV_COORDINATOR: f"127.0.0.1:{port}",
               distributed.ENV_NUM_PROCESSES: "2", distributed.ENV_PROCESS_ID: str(i)}
    logs.append(tmp / f"two_{leg}_{i}.log")
    with open(logs[-1], "w") as f:
      procs.append(subprocess.Popen(cmd, cwd=ROOT, env=_env(4, tmp / "cache", **extra),
                                    stdout=f, stderr=subprocess.STDOUT))
  _finish(procs, logs)
  return [p.read_text() for p in logs]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  tmp = tmp_path_factory.mktemp("multihost")
  config = tmp / "multihost_flamingo.py"
  config.write_text(CONFIG_FILE.format(root=ROOT, mesh=MESH, steps=STEPS))
  two, ref = tmp / "two", tmp / "ref"
  # The reference runs while the 2-process run does: on few cores their idle phases (startup,
  # coordination) overlap.
  ref_log = tmp / "ref.log"
  with open(ref_log, "w") as f:
    ref_proc = subprocess.Popen(
      [sys.executable, "-c", REFERENCE, f"--config={config}", f"--workdir={ref}"], cwd=ROOT,
      env=_env(8, tmp / "cache"), stdout=f, stderr=subprocess.STDOUT)
  first = _train_two(str(config), str(two), STEPS_FIRST, tmp, "first")
  second = _train_two(str(config), str(two), STEPS, tmp, "second")
  _finish([ref_proc], [ref_log])
  proc = subprocess.run([sys.executable, "-c", CHECK, str(config), str(two / "checkpoints"),
                         str(ref / "checkpoints"), str(tmp / "resaved"), str(STEPS)],
                        cwd=ROOT, env=_env(8, tmp / "cache"), capture_output=True, text=True,
                        timeout=300)
  assert proc.returncode == 0, proc.stderr[-4000:]
  return {"first": first, "second": second, "two": two, "ref": ref,
          "check": json.loads(proc.stdout.split("RESULT", 1)[1])}


@pytest.mark.slow
def test_two_processes_resume_and_match_one_process(runs):
  first, second = runs["first"], runs["second"]
  # Each process saw the whole job, and only process 0 printed progress.
  for leg in (first, second):
    for i, log in enumerate(leg):
      assert f"process {i}/2, 4 local / 8 global cpu devices" in log, log[-3000:]
      # config.dcn_mesh put one whole process (node) on each data row.
      assert "mesh data=2 x fsdp=4 x tensor=1 on 8 devices; processes of each data row: " \
             "[[0], [1]]" in log, log[-3000:]
    assert "[flamingo] step" in leg[0] and "[flamingo] step" not in leg[1]
  assert f"step {STEPS_FIRST}/{STEPS_FIRST}" in first[0]
  assert f"resuming from checkpoint step {STEPS_FIRST}" in second[0]
  assert f"step {STEPS_FIRST + 1}/{STEPS}" in second[0] and f"step 1/{STEPS}" not in second[0]
  two = json.loads((runs["two"] / "results.json").read_text())
  ref = json.loads((runs["ref"] / "results.json").read_text())
  assert two["step"] == ref["step"] == STEPS
  assert abs(two["train/loss"] - ref["train/loss"]) < 1e-4, (two, ref)
  # Evaluations are collective and see the same examples: synthetic_vqa feeds each process's
  # devices their rows of the whole set, the held-out loss reads per-process shards.
  assert {k: v for k, v in two.items() if k.startswith("eval/accuracy")} == \
         {k: v for k, v in ref.items() if k.startswith("eval/accuracy")}
  assert abs(two["eval/loss"] - ref["eval/loss"]) < 1e-4, (two, ref)
  # Few-shot (beam-search VQA and ranked classification) is collective too: the same scores.
  fewshot = {k for k in ref if k.startswith("eval/fewshot_")}
  assert {"eval/fewshot_vqa_0shot", "eval/fewshot_shape_2shot"} <= fewshot, sorted(ref)
  assert {k: two[k] for k in fewshot} == pytest.approx({k: ref[k] for k in fewshot}, abs=1e-6)
  check = runs["check"]
  assert check["trained_moved"] > 0  # the compared params did train
  # Same data, same mesh sizes: only the order of float32 reductions differs.
  assert check["max_abs_diff"] < 1e-5, check
  # Only process 0 writes TensorBoard events (the scalars are global).
  events = [f for f in os.listdir(runs["two"] / "tensorboard") if "tfevents" in f]
  assert len(events) == 2, events  # one file per leg


@pytest.mark.slow
def test_checkpoint_restores_onto_another_mesh(runs):
  check = runs["check"]
  assert check["reshape_equal"]
  # xattn q kernel [embed=32, heads=2, kv=16]: fsdp=8 splits embed 8 ways; fsdp=2 x tensor=2 splits
  # embed 2 ways and heads 2 ways.
  assert check["q_shards"] == [[4, 2, 16], [16, 1, 16]]


def test_single_process_unless_the_environment_says_otherwise():
  cfg = base_config().distributed
  assert distributed.resolve(cfg, {}) is None
  assert distributed.resolve(cfg, {"SLURM_NTASKS": "1", "SLURM_JOB_ID": "7"}) is None
  assert distributed.resolve({**cfg, "enabled": "false"},
                             {distributed.ENV_COORDINATOR: "10.0.0.1:1234"}) is None


def test_explicit_coordinator_from_config_or_env():
  cfg = {**base_config().distributed, "coordinator_address": "10.0.0.1:1234", "num_processes": 4,
         "process_id": 3, "local_device_ids": "0,1"}
  kind, kwargs = distributed.resolve(cfg, {})
  assert kind == "explicit"
  assert kwargs == {"coordinator_address": "10.0.0.1:1234", "num_processes": 4, "process_id": 3,
                    "local_device_ids": [0, 1], "initialization_timeout": 300}
  env = {distributed.ENV_COORDINATOR: "h:1", distributed.ENV_NUM_PROCESSES: "2",
         distributed.ENV_PROCESS_ID: "0"}
  kind, kwargs = distributed.resolve(base_config().distributed, env)
  assert kwargs == {"coordinator_address": "h:1", "num_processes": 2, "process_id": 0,
                    "initialization_timeout": 300}


def test_missing_fields_are_named():
  cfg = {**base_config().distributed, "coordinator_address": "h:1", "num_processes": 2}
  with pytest.raises(ValueError, match=r"distributed\.process_id \(or env JAX_PROCESS_ID\)"):
    distributed.resolve(cfg, {})
  with pytest.raises(ValueError, match=r"config\.distributed\.coordinator_address"):
    distributed.resolve({**base_config().distributed, "enabled": "true"}, {})
  with pytest.raises(ValueError, match=r"process_id=2 must be in \[0, num_processes=2\)"):
    distributed.resolve({**cfg, "process_id": 2}, {})
  with pytest.raises(ValueError, match="config.distributed.enabled='maybe'"):
    distributed.resolve({**cfg, "enabled": "maybe"}, {})
  with pytest.raises(ValueError, match="env JAX_NUM_PROCESSES='two' is not an integer"):
    distributed.resolve({"coordinator_address": "h:1"}, {distributed.ENV_NUM_PROCESSES: "two"})


def test_slurm_is_left_to_jax():
  env = {"SLURM_NTASKS": "8", "SLURM_JOB_ID": "7", "SLURM_PROCID": "3", "SLURM_LOCALID": "0",
         "SLURM_STEP_NODELIST": "node[1-2]"}
  kind, kwargs = distributed.resolve(base_config().distributed, env)
  assert kind == "slurm"
  assert kwargs == {"initialization_timeout": 300}  # jax reads SLURM_* itself
  with pytest.raises(ValueError, match="srun"):
    distributed.resolve(base_config().distributed,
                        {k: v for k, v in env.items() if k != "SLURM_STEP_NODELIST"})
