"""Device mesh and logical-axis sharding.

The mesh has named axes `data`, `fsdp`, `tensor` with sizes from `config.mesh` (-1 = all remaining
devices; default: every device on `data`).

Multi-slice TPU and multi-node GPU jobs have two networks: fast links inside a slice / node (ICI,
NVLink) and the slower data-centre network between them (DCN). `config.mesh` then gives the sizes
inside one slice (or node) and `config.dcn_mesh` the sizes across slices (nodes); each mesh axis is
their product, laid out so that an axis's DCN part is outermost (MaxText's `dcn_*_parallelism`).
Put only the axes that communicate least on the DCN, normally `data` (one all-reduce of the grads
per step) and perhaps `fsdp`, never `tensor`. A slice is a device's `slice_index` (TPU multislice);
elsewhere a node is one process (GPU clusters: one process per node). Params and large activations carry logical axis names
(MaxText's vocabulary) and `config.sharding_rules` maps them onto mesh axes. This module imports nothing
from the rest of vlm_jax.
"""

import math
from typing import Any, Mapping, Sequence

import jax
import numpy as np
from flax import linen as nn
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")
# Batch rows are split fsdp-major. The other order, ("data", "fsdp") as in MaxText, hits an XLA SPMD
# partitioner bug (jax 0.10.2, Shardy or GSPMD): with data, fsdp and tensor all > 1, a matmul whose
# kernel is split over (tensor, fsdp) and whose output is constrained to batch over ("data",
# "fsdp") is computed on rows permuted by a collective-permute that is never undone, so rows of
# different data/fsdp blocks swap (the attention output projection at few tokens per device, e.g.
# every decode step). tests/test_sharding.py keeps the minimal case and checks the model per row.
BATCH_AXES = ("fsdp", "data")

# Logical name -> mesh axes. Weights: FSDP shards the embed dim, tensor parallelism the heads/mlp/vocab
# dims. Activations: batch over data+fsdp, features over tensor.
DEFAULT_RULES: tuple[tuple[str, Any], ...] = (
  ("activation_batch", BATCH_AXES),
  ("activation_length", None),
  ("activation_embed", "tensor"),
  ("activation_mlp", "tensor"),
  ("embed", "fsdp"),
  ("mlp", "tensor"),
  ("heads", "tensor"),
  ("kv_heads", "tensor"),
  ("kv", None),
  ("vocab", "tensor"),
  ("layers", None),
)


def mesh_shape(mesh_config: Mapping[str, int], num_devices: int) -> dict[str, int]:
  """Resolve `{"data": -1, "fsdp": 1, "tensor": 1}` against the device count; errors name the field."""
  unknown = set(mesh_config) - set(MESH_AXES)
  if unknown:
    raise ValueError(f"config.mesh has unknown axes {sorted(unknown)}; expected {MESH_AXES}")
  sizes = {a: int(mesh_config.get(a, 1)) for a in MESH_AXES}
  auto = [a for a, s in sizes.items() if s == -1]
  if len(auto) > 1:
    raise ValueError(f"at most one of config.mesh.{{{','.join(MESH_AXES)}}} may be -1, got {auto}")
  for a, s in sizes.items():
    if s == 0 or s < -1:
      raise ValueError(f"config.mesh.{a} must be a positive size or -1, got {s}")
  fixed = math.prod(s for s in sizes.values() if s != -1)
  if auto:
    if num_devices % fixed:
      raise ValueError(f"config.mesh fixes {fixed} devices, which does not divide the "
                       f"{num_devices} available devices (config.mesh.{auto[0]}=-1)")
    sizes[auto[0]] = num_devices // fixed
  elif fixed != num_devices:
    raise ValueError(f"config.mesh {sizes} needs {fixed} devices but {num_devices} are available")
  return sizes


def granules(devices: Sequence[Any]) -> tuple[str, list[list[Any]]]:
  """Devices grouped by slice (TPU multislice: `slice_index`) or else by process (a GPU node),
  in key order -> (the grouping attribute, groups). CPU and GPU devices report a slice_index too
  (always 0), so only TPUs group by it."""
  attr = "slice_index" if devices[0].platform == "tpu" else "process_index"
  groups: dict[int, list[Any]] = {}
  for d in devices:
    groups.setdefault(getattr(d, attr), []).append(d)
  return attr, [groups[k] for k in sorted(groups)]


def is_multi_granule(dcn_config: Mapping[str, int] | None) -> bool:
  return bool(dcn_config) and any(int(v) != 1 for v in dict(dcn_config).values())


def combined_sizes(mesh_config: Mapping[str, int],
                   dcn_config: Mapping[str, int] | None) -> dict[str, int]:
  """Per-axis sizes of the whole mesh, mesh[a] * dcn[a] (-1 stays -1: the rest of the devices).
  For planning on one host, where the slice layout does not change any per-device size."""
  mesh, dcn = dict(mesh_config), dict(dcn_config or {})
  out = {}
  for a in MESH_AXES:
    m, d = int(mesh.get(a, 1)), int(dcn.get(a, 1))
    out[a] = -1 if -1 in (m, d) else m * d
  return out


def device_array(mesh_config: Mapping[str, int], devices: Sequence[Any],
                 dcn_config: Mapping[str, int] | None = None) -> np.ndarray:
  """Devices arranged as an array of shape (data, fsdp, tensor) for `Mesh`.

  Without `dcn_config` (or with all its sizes 1) every device is one pool sized by `mesh_config`.
  With it, `mesh_config` sizes one slice / node (-1 = the rest of its devices) and `dcn_config`
  the grid of slices / nodes (-1 = the rest of them); axis a then has size mesh[a] * dcn[a], and
  the devices of one slice are contiguous in each axis, so collectives over an ICI-only axis never
  leave the slice.
  """
  from jax.experimental import mesh_utils  # pylint: disable=g-import-not-at-top

  if not is_multi_granule(dcn_config):
    sizes = mesh_shape(mesh_config, len(devices))
    shape = tuple(sizes[a] for a in MESH_AXES)
    try:
      return mesh_utils.create_device_mesh(shape, devices)
    except (ValueError, NotImplementedError, AssertionError):
      return np.asarray(devices).reshape(shape)
  attr, groups = granules(devices)
  kind = "slices" if attr == "slice_index" else "processes (nodes)"
  if len({len(g) for g in groups}) != 1:
    raise ValueError(f"config.dcn_mesh needs the same number of devices in each of the "
                     f"{len(groups)} {kind}, got {[len(g) for g in groups]}")
  try:
    dcn = mesh_shape(dcn_config, len(groups))
  except ValueError as e:
    msg = str(e).replace("config.mesh", "config.dcn_mesh").replace("devices", kind)
    raise ValueError(f"{msg} (config.dcn_mesh sizes the grid of {kind}, {len(groups)} here)") \
      from None
  ici = mesh_shape(mesh_config, len(groups[0]))
  return mesh_utils.create_hybrid_device_mesh(
    [ici[a] for a in MESH_AXES], [dcn[a] for a in MESH_AXES], list(devices),
    process_is_granule=attr == "process_index")


def make_mesh(mesh_config: Mapping[str, int], devices: Sequence[jax.Device] | None = None,
              dcn_config: Mapping[str, int] | None = None) -> Mesh:
  """The (data, fsdp, tensor) mesh of `config.mesh` (and `config.dcn_mesh`, see `device_array`)."""
  devices = list(jax.devices() if devices is None else devices)
  return Mesh(device_array(mesh_config, devices, dcn_config), MESH_AXES)


def config_mesh(config: Any, devices: Sequence[jax.Device] | None = None) -> Mesh:
  """The mesh a run's config asks for: `config.mesh` (per slice / node) and `config.dcn_mesh`."""
  return make_mesh(config.mesh, devices, config.get("dcn_mesh"))


def describe(mesh: Mesh) -> str:
  """One log line: the axis sizes and, per `data` row, which processes hold its devices."""
  rows = [sorted({d.process_index for d in np.asarray(mesh.devices)[i].ravel()})
          for i in range(mesh.shape["data"])]
  sizes = " x ".join(f"{a}={mesh.shape[a]}" for a in MESH_AXES)
  if jax.process_count() == 1:
    return f"mesh {sizes} on {mesh.size} devices"
  return f"mesh {sizes} on {mesh.size} devices; processes of each data row: {rows}"


def logical_rules(rules: Sequence[Sequence[Any]] | None = None) -> tuple[tuple[str, Any], ...]:
  """Config rules (list of [name, axes]) -> hashable tuple; None -> DEFAULT_RULES."""
  if rules is None:
    return DEFAULT_RULES
  return tuple((r[0], tuple(r[1]) if isinstance(r[1], list) else r[1]) for r in rules)


def logical_shardings(boxed_abstract_tree: Any, mesh: Mesh, rules) -> Any:
  """Tree with `nn.LogicallyPartitioned` leaves -> the same (unboxed) tree of `NamedSharding`s."""
  specs = nn.get_partition_spec(boxed_abstract_tree)
  return nn.logical_to_mesh_sharding(specs, mesh, rules)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) dim split over the data-parallel axes, the rest replicated."""
  return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def data_shards(mesh: Mesh) -> int:
  """How many ways the batch is split: the product of the batch axes' sizes."""
  return math.prod(mesh.shape[a] for a in BATCH_AXES)


def full_batch(x: Any, mesh: Mesh) -> Any:
  """A host or single-device array every process holds in full -> a global array whose leading
  (batch) axis is split over the batch axes when it divides, else replicated; each process supplies
  just its own devices' rows (`global_batch` instead takes each process's array as its share).
  Already-global arrays and None pass through."""
  if x is None or (isinstance(x, jax.Array) and not x.is_fully_addressable):
    return x
  x = np.asarray(x)
  x = x.astype(jax.dtypes.canonicalize_dtype(x.dtype))  # int64 ids -> int32 without x64
  split = x.ndim > 0 and x.shape[0] % data_shards(mesh) == 0
  spec = batch_sharding(mesh) if split else replicated(mesh)
  return jax.make_array_from_callback(x.shape, spec, lambda idx: x[idx])


def global_batch(local_batch: Any, mesh: Mesh) -> Any:
  """Per-process numpy batch -> global `jax.Array`s split over the batch axes of `mesh`."""
  sharding = batch_sharding(mesh)
  return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)),
                      local_batch)


def _path_str(path) -> str:
  """A tree path as the library's '/'-joined param path (`lm/layers_3/attn/q/kernel`)."""
  return "/".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)


def _nbytes(x) -> int:
  return int(np.prod(x.shape, dtype=np.int64)) * np.dtype(x.dtype).itemsize


def per_device_bytes(abstract_tree: Any) -> int:
  """Bytes of the largest per-device share of a tree of `ShapeDtypeStruct`s/arrays with shardings.

  Exact for the layout the shardings describe: every leaf counts its shard on each device (uneven
  splits included), and the device holding the most is reported.
  """
  per_device: dict[Any, int] = {}
  for x in jax.tree.leaves(abstract_tree):
    itemsize = np.dtype(x.dtype).itemsize
    for device, index in x.sharding.devices_indices_map(tuple(x.shape)).items():
      n = math.prod(len(range(*s.indices(d))) for s, d in zip(index, x.shape))
      per_device[device] = per_device.get(device, 0) + n * itemsize
  return max(per_device.values(), default=0)


def _split_over(sharding_: jax.sharding.Sharding, axis: str) -> bool:
  if isinstance(sharding_, NamedSharding):
    for entry in sharding_.spec:
      if entry == axis or (isinstance(entry, tuple) and axis in entry):
        return True
    return False
  return not sharding_.is_fully_replicated


def replicated_params(abstract_params: Any, axis: str = "fsdp") -> list[tuple[str, int]]:
  """[(param path, bytes)] of the params whose sharding does not split them over mesh `axis`,
  largest first. Leaves are `ShapeDtypeStruct`s (or arrays) carrying their `.sharding`."""
  leaves = jax.tree_util.tree_leaves_with_path(abstract_params)
  out = [(_path_str(p), _nbytes(x)) for p, x in leaves if not _split_over(x.sharding, axis)]
  return sorted(out, key=lambda item: -item[1])


def replicated_fraction(abstract_params: Any, mesh: Mesh, axis: str = "fsdp") -> float:
  """Fraction of parameter bytes held whole on every device of an `axis` group of `mesh`.

  With `fsdp > 1` every large param should be split over `fsdp` (the rules map `embed` to it); a
  param that is not is replicated on all `fsdp` devices (on every device of a pure-FSDP mesh), which
  costs `fsdp` times its share of memory. Small params (norm scales, biases, gates) are fine and
  count here only by their size. With `mesh.shape[axis] == 1` nothing can be split over the axis and
  the result is 0.0.
  """
  if mesh.shape.get(axis, 1) == 1:
    return 0.0
  total = sum(_nbytes(x) for x in jax.tree.leaves(abstract_params))
  return sum(b for _, b in replicated_params(abstract_params, axis)) / max(total, 1)


def check_replication(abstract_params: Any, mesh: Mesh, max_fraction: float,
                      axis: str = "fsdp", show: int = 10) -> float:
  """Fail fast (MaxText's `sharding_tolerance` idea) when more than `max_fraction` of the param
  bytes are not split over `axis` although `mesh.shape[axis] > 1`: usually a param without logical
  axis names, or rules (`config.sharding_rules`) that map its names to no mesh axis.
  -> the fraction."""
  fraction = replicated_fraction(abstract_params, mesh, axis)
  if fraction > max_fraction:
    worst = replicated_params(abstract_params, axis)[:show]
    listing = "\n".join(f"  {path}: {b / 2**20:.1f} MiB" for path, b in worst)
    raise ValueError(
      f"{100 * fraction:.1f}% of the parameter bytes are replicated over the '{axis}' mesh axis "
      f"(size {mesh.shape[axis]}), more than config.max_replicated_fraction={max_fraction}. Give "
      f"these params logical axis names that config.sharding_rules map to '{axis}' (e.g. 'embed'), "
      f"or raise the limit. Largest:\n{listing}")
  return fraction
