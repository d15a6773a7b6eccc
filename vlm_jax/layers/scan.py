"""Stacks of identical layers: `nn.scan` over the layers, per-layer rematerialisation (`nn.remat`).

Scanning (MaxText's `scan_layers`): the L layers become one module whose params carry a leading
"layers" axis, and the body is traced and compiled once, so compile time stops growing with depth.
The body is a function of the layer module (flax's function form of the lifted transforms), so the
layer keeps its own name (`lm/layers/attn/q/kernel`, row i = layer i) and needs no wrapper module.

Rematerialisation: `remat_policy` names what a layer's backward pass may keep from its forward pass;
everything else is recomputed. The names map onto `jax.checkpoint_policies`:
  "none"                              no remat: keep every residual (fastest, most memory)
  "full"                              keep only the layer's inputs, recompute the rest
  "dots_saveable"                     keep the outputs of all matmuls
  "dots_with_no_batch_dims_saveable"  keep the outputs of weight matmuls (not attention's q.k, p.v)
  "save_qkv_proj"                     keep only the q/k/v projections (tagged by SelfAttention)
Remat changes memory and speed, never values: loss and gradients equal the unrematerialised ones.
"""

from typing import Any, Callable

import flax.linen as nn
import jax

# Names the attention layers tag with `jax.ad_checkpoint.checkpoint_name`.
QKV_PROJ_NAMES = ("query_proj", "key_proj", "value_proj")

REMAT_POLICIES: dict[str, Callable[..., bool] | None] = {
  "none": None,
  "full": jax.checkpoint_policies.nothing_saveable,
  "dots_saveable": jax.checkpoint_policies.dots_saveable,
  "dots_with_no_batch_dims_saveable": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
  "save_qkv_proj": jax.checkpoint_policies.save_only_these_names(*QKV_PROJ_NAMES),
}


def check_remat_policy(name: str, field: str) -> None:
  if name not in REMAT_POLICIES:
    raise ValueError(f"{field} {name!r} is not one of {sorted(REMAT_POLICIES)}")


def remat_call(module: nn.Module, policy: str, *args, scanned: bool = False, **static) -> Any:
  """`module(*args, **static)`, rematerialised per `policy` ("none": a plain call).

  `static` holds Python values (flags) the layer branches on; they are closed over, not traced.
  Inside a scan the loop already keeps the forward and backward copies apart, so common
  subexpression elimination need not be prevented there (MaxText does the same).
  """
  if policy == "none":
    return module(*args, **static)
  check_remat_policy(policy, "remat_policy")
  fn = nn.remat(lambda mdl, *a: mdl(*a, **static), policy=REMAT_POLICIES[policy],
                prevent_cse=not scanned)
  return fn(module, *args)


def scan_layers(body: Callable, module: nn.Module, carry: Any, xs: Any, *, length: int,
                broadcast: tuple = ()) -> tuple[Any, Any]:
  """Run `body(module, carry, *broadcast, xs) -> (carry, ys)` for `length` layers.

  `module`'s params get a leading axis of size `length` named "layers" (one row per layer, each
  initialised from its own rng); `xs` is sliced along its leading axis per layer, `broadcast` is
  the same for every layer, and `ys` come back stacked.
  """
  scan = nn.scan(body, variable_axes={"params": 0}, split_rngs={"params": True},
                 in_axes=(nn.broadcast,) * len(broadcast) + (0,), length=length,
                 metadata_params={nn.PARTITION_NAME: "layers"})
  return scan(module, carry, *broadcast, xs)
