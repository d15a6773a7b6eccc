"""Token and position embeddings with logical axis names.

`token_embed` returns a `nn.Embed` whose table is `[vocab, embed]`; its `attend` method gives tied output
logits (MPT, OpenFlamingo-3B). Position embeddings are plain learned tables `[positions, embed]`.
"""

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

Dtype = Any


def token_embed(
  vocab_size: int, features: int, *, dtype: Dtype = jnp.float32, param_dtype: Dtype = jnp.float32,
  stddev: float = 0.02, name: str = "embed",
) -> nn.Embed:
  return nn.Embed(
    vocab_size, features, dtype=dtype, param_dtype=param_dtype, name=name,
    embedding_init=nn.with_logical_partitioning(nn.initializers.normal(stddev), ("vocab", "embed")))


def learned_positions(module: nn.Module, name: str, num: int, features: int, param_dtype=jnp.float32,
                      stddev: float = 0.02):
  """Declare a learned table float[num, features] on `module` (call inside its compact method)."""
  return module.param(
    name, nn.with_logical_partitioning(nn.initializers.normal(stddev), (None, "embed")),
    (num, features), param_dtype)
