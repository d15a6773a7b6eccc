"""Dense projections with logical axis names on their params.

Every projection in the library is a `DenseGeneral` so that each kernel carries the logical axis names
(`embed`, `mlp`, `heads`, `kv`, ...) that `vlm_jax.sharding` maps onto mesh axes. Kernels are created at
their true shape `[in..., out...]` (e.g. `q: [embed, heads, kv]`), so sharding sees the heads axis;
converters transpose and reshape PyTorch's `[out, in]`. (flax's own DenseGeneral creates a flat kernel and
reshapes it, which breaks rank-3 logical annotations under a mesh.)
"""

import math
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any


def _as_tuple(x: int | Sequence[int]) -> tuple[int, ...]:
  return (x,) if isinstance(x, int) else tuple(x)


class DenseGeneral(nn.Module):
  """y = x . W (+ b) contracting `axis` of x with the leading dims of W.

  x: float[..., *in]; kernel: [*in, *features]; y: float[..., *features]. Init: truncated normal with
  variance 1 / fan_in (LeCun), fan_in = prod(in).
  """

  features: int | Sequence[int]
  names: Sequence[str | None]
  axis: int | Sequence[int] = -1
  use_bias: bool = False
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    features = _as_tuple(self.features)
    axis = tuple(a % x.ndim for a in _as_tuple(self.axis))
    in_shape = tuple(x.shape[a] for a in axis)
    n_in = len(in_shape)
    if len(self.names) != n_in + len(features):
      raise ValueError(f"{self.name}: {len(self.names)} axis names for a kernel of rank "
                       f"{n_in + len(features)}")
    init = nn.initializers.variance_scaling(
      1.0, "fan_in", "truncated_normal", in_axis=tuple(range(n_in)),
      out_axis=tuple(range(n_in, n_in + len(features))))
    kernel = self.param("kernel", nn.with_logical_partitioning(init, tuple(self.names)),
                        in_shape + features, self.param_dtype)
    y = _project(x.astype(self.dtype), kernel.astype(self.dtype), axis, n_in)
    if self.use_bias:
      bias = self.param("bias", nn.with_logical_partitioning(
        nn.initializers.zeros_init(), tuple(self.names[n_in:])), features, self.param_dtype)
      y = y + bias.astype(y.dtype)
    return y.astype(self.dtype)


def _project(x: jax.Array, kernel: jax.Array, axis: tuple[int, ...], n_in: int) -> jax.Array:
  """x . kernel contracting `axis` of x with the first `n_in` dims of the kernel -> [free dims of x in
  order, kernel's output dims].

  When `axis` is x's trailing dims (every projection but a few), this is one 2-D matmul
  [prod(batch), prod(in)] x [prod(in), prod(out)] between free reshapes. Why: XLA:CPU lays out the
  backward of a rank-3 dot_general so that the weight gradient's operand (e.g. GELU' * g of a
  [B, T, 4D] activation) is written transposed by a fused elementwise loop at ~8 ns an element; the
  2-D form's weight gradient is one dot contracting the rows, no copy. The forward + backward of the
  resampler's [8, 64, 384] FFW took 14.1 ms rank-3 and 8.0 ms 2-D on a 2-core Zen 4. On GPU/TPU the
  reshapes are bitcasts.
  """
  free = tuple(d for i, d in enumerate(x.shape) if i not in axis)
  out = kernel.shape[n_in:]
  acc = _accumulator(x.dtype)
  if axis != tuple(range(x.ndim - n_in, x.ndim)):
    contract = (axis, tuple(range(n_in)))
    return jax.lax.dot_general(x, kernel, (contract, ((), ())), preferred_element_type=acc)
  k_in = math.prod(kernel.shape[:n_in])
  y = jax.lax.dot_general(x.reshape(-1, k_in), kernel.reshape(k_in, -1), (((1,), (0,)), ((), ())),
                          preferred_element_type=acc)
  return y.reshape(free + out)


def _accumulator(dtype: Dtype) -> Dtype | None:
  """float32 for a 16-bit dot on the CPU, else None (the dot's own type).

  GPU and TPU matmul units accumulate bf16 in float32 anyway; XLA:CPU's bf16 dot only takes its fast
  kernel when asked for a float32 result: a [16, 768] x [768, 2048] bf16 dot runs at 113 GFLOP/s
  (the float32 rate) without it and 169 GFLOP/s with it on a 2-core Zen 4. Not on GPU: there the
  float32 results would be what remat saves, twice the bytes.
  """
  if jnp.dtype(dtype).itemsize < 4 and jax.default_backend() == "cpu":
    return jnp.float32
  return None


def dense(
  features: int | Sequence[int],
  names: Sequence[str | None],
  *,
  axis: int | Sequence[int] = -1,
  use_bias: bool = False,
  dtype: Dtype = jnp.float32,
  param_dtype: Dtype = jnp.float32,
  name: str | None = None,
) -> DenseGeneral:
  """Shorthand used by every layer: `dense((heads, head_dim), ("embed", "heads", "kv"), name="q")`."""
  return DenseGeneral(features, tuple(names), axis, use_bias, dtype, param_dtype, name=name)
