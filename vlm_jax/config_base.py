"""Shared pieces of the `configs/<family>.py` files (big_vision style `get_config(arg)`).

`base_config()` holds every trainer field with its default and a comment; model files fill in
`model_name`, `model`, `data`, `trainable` and their presets. `check_preset` gives the one error message
for an unknown preset.
"""

import importlib.util
import os

import ml_collections


def load_config_module(path: str):
  """The config file at `path` as a module (configs/ is not a package; config files that build on
  each other, e.g. llava_flex.py on llava.py, load their siblings this way)."""
  if not os.path.exists(path):
    raise FileNotFoundError(f"config file {path} does not exist")
  name = "_vlm_jax_config_" + os.path.splitext(os.path.basename(path))[0]
  spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def load_config(path: str, arg: str | None = None) -> ml_collections.ConfigDict:
  """`get_config(arg)` of the config file at `path`, as `--config=<path>:<arg>` gives it (for code that
  builds configs without flags: tests, benchmarks, notebooks)."""
  return load_config_module(path).get_config(arg)


def check_preset(arg: str | None, presets, file: str) -> str:
  preset = (arg or "default").strip()
  if preset not in presets:
    raise ValueError(f"{file}: unknown preset {preset!r} (the text after ':' in --config); "
                     f"expected one of {sorted(presets)}")
  return preset


def base_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.name = "train"                 # stage name, used in log lines
  c.seed = 0                       # init and step RNG seed
  c.model_name = ""                # vlm_jax.models.<model_name>.Model(**model)
  c.model = ml_collections.ConfigDict()
  c.loss = "next_token_ce"         # vlm_jax.train.losses
  c.trainable = ".*"               # regex over param paths; the rest is frozen
  c.frozen_param_dtype = ""        # e.g. "bfloat16" to keep frozen towers in bf16; "" = as initialised
  c.batch_size = 32                # global batch size (all processes)
  c.total_steps = 1000
  c.log_every = 50                 # one progress line + TensorBoard scalars every N steps
  c.eval_every = 0                 # periodic evaluation (0 = only at the end)
  c.mesh = ml_collections.ConfigDict({"data": -1, "fsdp": 1, "tensor": 1})  # -1 = remaining devices
  # Multi-slice TPU / multi-node GPU: sizes ACROSS slices (nodes); config.mesh then sizes one slice
  # (node) and each axis is their product. Keep tensor (and usually fsdp) inside a slice.
  c.dcn_mesh = ml_collections.ConfigDict({"data": 1, "fsdp": 1, "tensor": 1})
  c.sharding_rules = ml_collections.FieldReference(None, field_type=list)   # None = sharding.DEFAULT_RULES
  c.max_replicated_fraction = 0.05  # fail if more param bytes than this are not split over fsdp>1
  c.optimizer = ml_collections.ConfigDict(dict(
    name="adamw", learning_rate=1e-4, schedule="constant", warmup_steps=0, total_steps=c.get_ref(
      "total_steps"), b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.0, weight_decay_regex="",
    grad_clip_norm=1.0, trainable_rows={}, end_lr_fraction=0.0))
  c.checkpoint = ml_collections.ConfigDict(dict(every_steps=100, max_to_keep=3, async_save=True))
  c.data = ml_collections.ConfigDict()
  c.evals = ml_collections.ConfigDict()
  # Multi-host runs (vlm_jax.distributed): every host runs the same command. "auto" connects the
  # processes under Slurm / Open MPI / on Cloud TPU VMs, or when a coordinator address is given;
  # fields left unset fall back to env JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID
  # / JAX_LOCAL_DEVICE_IDS, then to jax's auto-detection.
  c.distributed = ml_collections.ConfigDict(dict(
    enabled="auto",                                                 # "auto" | "true" | "false"
    coordinator_address=ml_collections.config_dict.placeholder(str),  # "host:port" of process 0
    num_processes=ml_collections.config_dict.placeholder(int),
    process_id=ml_collections.config_dict.placeholder(int),
    local_device_ids=ml_collections.FieldReference(None, field_type=object),  # [0, 1] or "0,1"
    cpu_collectives="",            # CPU backend only: "gloo" | "mpi" | "" (jax's default)
    initialization_timeout=300,    # seconds to wait for all processes to connect
  ))
  # Initial weights: an earlier stage (trained first) and/or a directory from `python -m vlm_jax.convert`
  # (with config.model_name = "" its model.json also supplies the model config).
  c.init = ml_collections.ConfigDict({"stage": None, "stage_prefix": "",
                                      "checkpoint": ml_collections.config_dict.placeholder(str),
                                      "checkpoint_prefix": "",
                                      "checkpoints": ml_collections.ConfigDict()})
  return c
