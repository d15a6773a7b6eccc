"""`layers.resize` equals `torch.nn.functional.interpolate` (bicubic align_corners=False, with and
without antialias; bilinear with antialias=True) on random inputs, up and down, square and not.
tests/layers/test_dual_perspective.py checks the bicubic matrices at 336 <-> 1008 too."""

import jax.numpy as jnp
import numpy as np
import pytest

from vlm_jax.layers import resize

torch = pytest.importorskip("torch")


@pytest.mark.parametrize("method, torch_kw", [
  ("bicubic", dict(mode="bicubic", align_corners=False)),
  ("bicubic_aa", dict(mode="bicubic", align_corners=False, antialias=True)),
  ("bilinear_aa", dict(mode="bilinear", align_corners=False, antialias=True)),
])
@pytest.mark.parametrize("size_in, size_out", [((24, 24), (72, 72)), ((63, 63), (21, 21)),
                                               ((10, 7), (4, 15)), ((5, 5), (5, 5))])
def test_equals_torch_interpolate(method, torch_kw, size_in, size_out):
  x = np.random.default_rng(0).normal(size=(2, *size_in, 3)).astype(np.float32)
  want = torch.nn.functional.interpolate(torch.tensor(x).permute(0, 3, 1, 2), size=size_out,
                                         **torch_kw).permute(0, 2, 3, 1).numpy()
  got = np.asarray(resize.resize(jnp.asarray(x), size_out, method))
  np.testing.assert_allclose(got, want, atol=2e-5, rtol=1e-5)


def test_rows_sum_to_one_and_cubic_differs_from_keys():
  for method in resize.METHODS:
    np.testing.assert_allclose(resize.resize_matrix(24, 72, method).sum(1), 1.0, atol=1e-6)
  x = np.random.default_rng(1).normal(size=(1, 24, 24, 1)).astype(np.float32)
  keys = np.asarray(__import__("jax").image.resize(jnp.asarray(x), (1, 72, 72, 1), "cubic"))
  assert np.abs(np.asarray(resize.resize(jnp.asarray(x), (72, 72))) - keys).max() > 1e-3
  with pytest.raises(ValueError, match="not one of"):
    resize.resize_matrix(4, 8, "lanczos")
