"""Orbax checkpointing of the train state together with the grain data iterator.

All orbax calls live here so the move to orbax's v1 API stays local. Each checkpoint step directory holds
two items: `state` (the `TrainState`, restored into an abstract tree that carries the target shardings, so
a checkpoint written on one mesh restores onto another) and `data_iter` (grain's iterator state, so a
resumed run continues the same data order). Saves are asynchronous; orbax writes into a temporary
directory and renames it when complete, so a run killed mid-save leaves the previous checkpoint intact.

Multi-host: `save`, `restore` and `close` are collective: every process calls them at the same
step. Each process writes the shards of `state` it holds (orbax coordinates the directory and
metadata through process 0) and its own iterator state (`data_iter/process_<i>-of-<n>.json`), so the
directory must be storage all processes see (gs://, NFS), and a resume needs the same process count.
"""

import logging
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp

from vlm_jax import paths
from vlm_jax.param_paths import flatten, unflatten


class Checkpointer:
  """Thin wrapper over `ocp.CheckpointManager` with items `state` and `data_iter`."""

  def __init__(self, directory: str, *, max_to_keep: int, save_every: int, async_save: bool = True):
    options = ocp.CheckpointManagerOptions(
      max_to_keep=max_to_keep,
      save_interval_steps=save_every,
      enable_async_checkpointing=async_save,
      create=True,
    )
    directory = paths.resolve(directory)  # orbax takes only absolute paths (or URLs)
    self.directory = directory
    self._manager = ocp.CheckpointManager(directory, options=options,
                                          item_names=("state", "data_iter"))

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self._manager.all_steps())

  def save(self, step: int, state: Any, data_iter: Any | None, *, force: bool = False) -> bool:
    """Save if `step` is due (every `save_every`) or `force`; returns whether a save started."""
    items = {"state": ocp.args.StandardSave(state)}
    if data_iter is not None:
      items["data_iter"] = grain.checkpoint.CheckpointSave(data_iter)
    saved = self._manager.save(step, args=ocp.args.Composite(**items), force=force)
    if saved:
      logging.info("checkpoint: saving step %d to %s", step, self.directory)
    return saved

  def restore(self, step: int, abstract_state: Any, data_iter: Any | None = None) -> Any:
    """Restore `state` into `abstract_state` (ShapeDtypeStructs with shardings); `data_iter` in place."""
    items = {"state": ocp.args.StandardRestore(abstract_state)}
    if data_iter is not None:
      items["data_iter"] = grain.checkpoint.CheckpointRestore(data_iter)
    restored = self._manager.restore(step, args=ocp.args.Composite(**items))
    return restored["state"]

  def restore_params(self, step: int, shardings: dict[str, jax.sharding.Sharding] | None = None
                     ) -> dict[str, jax.Array]:
    """Only the params of step's `state` (trainable and frozen, flat `{path: Array}`), each in its
    stored dtype on `shardings[path]` (default device if absent); the optimizer state is not read.
    For evaluation, which does not know (or need) the optimizer that trained the params."""
    # A read-only manager of the `state` item alone (data_iter is not ours to read here), with a
    # handler that restores a subtree.
    reader = ocp.CheckpointManager(self.directory, item_names=("state",),
                                   item_handlers={"state": ocp.PyTreeCheckpointHandler()},
                                   options=ocp.CheckpointManagerOptions(read_only=True))
    meta = reader.item_metadata(step)["state"]
    tree = getattr(meta, "tree", meta)
    shardings = shardings or {}
    default = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    item = {part: unflatten({k: jax.ShapeDtypeStruct(m.shape, m.dtype,
                                                     sharding=shardings.get(k, default))
                             for k, m in flatten(tree[part]).items()})
            for part in ("trainable", "frozen") if tree.get(part)}
    args = ocp.args.PyTreeRestore(item=item, partial_restore=True,
                                  restore_args=ocp.checkpoint_utils.construct_restore_args(item))
    restored = reader.restore(step, args=ocp.args.Composite(state=args))["state"]
    reader.close()
    return {k: v for part in item for k, v in flatten(restored[part]).items()}

  def wait(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()


def abstract_with_shardings(tree: Any, shardings: Any) -> Any:
  """Arrays or ShapeDtypeStructs + shardings -> ShapeDtypeStructs carrying those shardings."""
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)
