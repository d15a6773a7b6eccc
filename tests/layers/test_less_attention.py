"""LaViT layers: LA re-uses the previous scores, VA matches a PyTorch reference, attention residual,
DP loss values, Theta/Psi param shapes, jit + grad through a two-stage toy."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from vlm_jax.layers.less_attention import (AttentionResidual, LABlock, LessAttention, VABlock,
                                           diagonality_preserving_loss, dp_loss_over_layers)

B, N, D, H, MLP = 2, 16, 8, 2, 16  # N = a 4 x 4 token grid


def _np(tree):
  return jax.tree.map(np.asarray, nn.unbox(tree))


def _softmax(x):
  e = np.exp(x - x.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


@pytest.fixture(scope="module")
def data():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(B, N, D)).astype(np.float32)
  scores = (2.0 * rng.normal(size=(B, H, N, N))).astype(np.float32)
  return x, scores


@pytest.fixture(scope="module")
def la(data):
  x, scores = data
  mdl = LessAttention(H)
  params = _np(mdl.init(jax.random.PRNGKey(1), x, scores)["params"])
  return mdl, params, jax.jit(lambda p, x, s: mdl.apply({"params": p}, x, s))


def test_la_with_identity_transforms_is_attention_from_previous_scores(data, la):
  x, prev = data
  _, p, fn = la
  out, aux = fn(p, x, prev)
  np.testing.assert_array_equal(p["theta"]["kernel"], np.eye(N, dtype=np.float32))
  np.testing.assert_allclose(np.asarray(aux["scores"]), prev, atol=1e-6)  # scores passed on as is
  v = np.einsum("bnd,dhk->bnhk", x, p["v"]["kernel"]) + p["v"]["bias"]
  z = np.einsum("bhij,bjhk->bihk", _softmax(prev), v)
  ref = np.einsum("bihk,hkd->bid", z, p["o"]["kernel"]) + p["o"]["bias"]
  np.testing.assert_allclose(np.asarray(aux["probs"]), _softmax(prev), atol=1e-6)
  np.testing.assert_allclose(np.asarray(out), ref, atol=1e-6)
  assert set(p) == {"theta", "psi", "v", "o"}  # no q/k projections


@pytest.mark.parametrize("per_head", [False, True])
def test_la_transform_is_psi_of_theta_transposed(data, per_head):
  """A^l = Psi(Theta(A)^T)^T with Linear(x) = x W + b, written out with explicit transposes."""
  x, prev = data
  mdl = LessAttention(H, per_head_transform=per_head)
  p = _np(mdl.init(jax.random.PRNGKey(0), x, prev)["params"])
  rng = np.random.default_rng(1)
  for name in ("theta", "psi"):
    p[name] = {k: rng.normal(size=v.shape).astype(np.float32) for k, v in p[name].items()}
  _, aux = mdl.apply({"params": p}, x, prev)
  ref = np.empty_like(prev)
  for h in range(H):
    th, ps = (p[n] if not per_head else {k: v[h] for k, v in p[n].items()} for n in ("theta", "psi"))
    t = prev[:, h] @ th["kernel"] + th["bias"]
    ref[:, h] = (t.swapaxes(-1, -2) @ ps["kernel"] + ps["bias"]).swapaxes(-1, -2)
  np.testing.assert_allclose(np.asarray(aux["scores"]), ref, rtol=1e-5, atol=1e-4)
  np.testing.assert_allclose(np.asarray(aux["probs"]), _softmax(ref), atol=1e-5)


def test_theta_psi_param_shapes_shared_vs_per_head(data):
  x, prev = data
  for per_head, lead in ((False, ()), (True, (H,))):
    mdl = LABlock(H, MLP, per_head_transform=per_head)
    shapes = jax.tree.map(np.shape, _np(mdl.init(jax.random.PRNGKey(0), x, prev)["params"]))
    for name in ("theta", "psi"):
      assert shapes["attn"][name] == {"kernel": lead + (N, N), "bias": lead + (N,)}
    count = sum(int(np.prod(s)) for n in ("theta", "psi") for s in shapes["attn"][n].values())
    # shared: 2 (N^2 + N) transform params per LA layer, as the notes count; per head: H times
    assert count == 2 * (N * N + N) * (H if per_head else 1)


def _torch_va_block(p, x, residual, eps):
  """Pre-LN ViT block from the equations: A = QK^T/sqrt(d) + R, Z = softmax(A) V W_O, then MLP."""
  t = {k: torch.from_numpy(np.asarray(v)) for k, v in _flat(p).items()}
  x = torch.from_numpy(x)

  def ln(z, n):
    return torch.nn.functional.layer_norm(z, (D,), t[f"{n}/scale"], t[f"{n}/bias"], eps)

  def proj(z, n):  # kernel [D, H, dh] -> per-head features
    return torch.einsum("bnd,dhk->bhnk", z, t[f"attn/{n}/kernel"]) + t[f"attn/{n}/bias"].unsqueeze(1)

  h = ln(x, "norm1")
  q, k, v = proj(h, "q"), proj(h, "k"), proj(h, "v")
  scores = q @ k.transpose(-1, -2) / (D // H) ** 0.5 + torch.from_numpy(residual)
  z = torch.softmax(scores, -1) @ v  # [B, H, N, dh]
  z = z.transpose(1, 2).reshape(B, N, D)
  x = x + z @ t["attn/o/kernel"].reshape(D, D) + t["attn/o/bias"]
  h = ln(x, "norm2")
  h = torch.nn.functional.gelu(h @ t["mlp/fc1/kernel"] + t["mlp/fc1/bias"])
  return (x + h @ t["mlp/fc2/kernel"] + t["mlp/fc2/bias"]).numpy(), scores.numpy()


def _flat(tree, prefix=""):
  out = {}
  for k, v in tree.items():
    out.update(_flat(v, f"{prefix}{k}/") if isinstance(v, dict) else {f"{prefix}{k}": v})
  return out


def test_va_block_matches_torch_reference(data):
  x, residual = data
  mdl = VABlock(H, MLP, norm_eps=1e-6)
  p = _np(mdl.init(jax.random.PRNGKey(2), x, residual)["params"])
  rng = np.random.default_rng(3)  # non-trivial norms and biases
  p = jax.tree.map(lambda a: a + 0.1 * rng.normal(size=a.shape).astype(np.float32), p)
  out, aux = mdl.apply({"params": p}, x, residual)
  ref_out, ref_scores = _torch_va_block(p, x, residual, 1e-6)
  np.testing.assert_allclose(np.asarray(aux["scores"]), ref_scores, atol=1e-5)
  np.testing.assert_allclose(np.asarray(out), ref_out, atol=1e-5)
  out0, aux0 = mdl.apply({"params": p}, x)  # no residual: scores are Q K^T / sqrt(d) only
  np.testing.assert_allclose(np.asarray(aux0["scores"]), ref_scores - residual, atol=1e-5)
  assert not np.allclose(np.asarray(out0), ref_out, atol=1e-3)


P3 = np.array([[0.5, 0.3, 0.2], [0.1, 0.6, 0.3], [0.4, 0.4, 0.2]], np.float32)


def test_dp_loss_hand_worked_3x3():
  # sum |P - P^T| = 2 (0.2 + 0.2 + 0.1) = 1.0; diag terms 2*.5-.5, 2*.6-.4, 2*.2-.8 = .5 + .8 - .4
  assert float(diagonality_preserving_loss(P3, "paper_literal")) == pytest.approx(1.9, abs=1e-6)
  # 1.0 / 9 + mean(relu(.25 - .5), relu(.2 - .6), relu(.4 - .2)) = 1/9 + 0.2/3
  assert float(diagonality_preserving_loss(P3, "hinge")) == pytest.approx(1 / 9 + 0.2 / 3, abs=1e-6)


def test_dp_loss_zero_and_positive_cases():
  eye = jnp.broadcast_to(jnp.eye(4), (B, H, 4, 4))
  uniform = jnp.full((B, H, 4, 4), 0.25)
  assert float(diagonality_preserving_loss(eye, "hinge")) == 0.0
  assert float(diagonality_preserving_loss(uniform, "paper_literal")) == pytest.approx(0.0, abs=1e-6)
  # the literal formula's sign: identity costs B H N (N - 1)
  assert float(diagonality_preserving_loss(eye, "paper_literal")) == pytest.approx(B * H * 12)
  shifted = jnp.roll(jnp.eye(4), 1, axis=-1)  # a non-symmetric permutation, zero diagonal
  assert float(diagonality_preserving_loss(shifted, "hinge")) == pytest.approx(0.5 + 1 / 3)
  layers = [jnp.asarray(P3), eye[..., :3, :3]]
  assert float(dp_loss_over_layers(layers, "paper_literal")) == pytest.approx(1.9 + B * H * 6)
  assert float(dp_loss_over_layers(layers, "hinge")) == pytest.approx((1 / 9 + 0.2 / 3) / 2)
  with pytest.raises(ValueError, match="mode"):
    diagonality_preserving_loss(eye, "nope")


def _ar_apply(mdl, prev, unit=False):
  p = _np(mdl.init(jax.random.PRNGKey(0), prev)["params"])
  if unit:  # 1x1 conv = identity over heads, LayerScale 1: only the depthwise average pool is left
    p["pointwise"]["kernel"] = np.eye(prev.shape[1], mdl.num_heads, dtype=np.float32)
    p["layerscale"] = np.ones_like(p["layerscale"])
  return np.asarray(mdl.apply({"params": p}, prev)), p


def test_attention_residual_shapes_and_params(data):
  _, prev = data
  out, p = _ar_apply(AttentionResidual(3), prev)
  assert out.shape == (B, 3, 4, 4)  # 4 x 4 grid -> 2 x 2 grid
  assert p["dw_kernel"].shape == (H, 2, 2) and p["pointwise"]["kernel"].shape == (H, 3)
  np.testing.assert_allclose(p["layerscale"], 1e-2)
  assert _ar_apply(AttentionResidual(3, mode="paper_flat"), prev)[0].shape == (B, 3, 8, 8)
  assert _ar_apply(AttentionResidual(3, prev_grid=(2, 8)), prev)[0].shape == (B, 3, 4, 4)
  with pytest.raises(ValueError, match="prev_grid"):
    _ar_apply(AttentionResidual(3, prev_grid=(3, 5)), prev)
  with pytest.raises(ValueError, match="not square"):
    _ar_apply(AttentionResidual(3), prev[..., :8, :8])


def test_attention_residual_grid_hand_case():
  # 4 x 4 grid, token i = (y, x) = divmod(i, 4); patch of i = (y // 2, x // 2) -> 2 x 2 next grid.
  patch = np.array([(i // 4 // 2) * 2 + (i % 4) // 2 for i in range(16)])
  block_diag = (patch[:, None] == patch[None, :]).astype(np.float32)[None, None]
  out, _ = _ar_apply(AttentionResidual(1), block_diag, unit=True)
  np.testing.assert_allclose(out[0, 0], np.eye(4), atol=1e-6)  # stays (block-)diagonal
  rng = np.random.default_rng(4)
  a = rng.normal(size=(1, 1, 16, 16)).astype(np.float32)
  out, _ = _ar_apply(AttentionResidual(1), a, unit=True)
  ref = np.zeros((4, 4))
  for i in range(16):
    for j in range(16):
      ref[patch[i], patch[j]] += a[0, 0, i, j] / 16
  np.testing.assert_allclose(out[0, 0], ref, atol=1e-5)


def test_attention_residual_paper_flat_hand_case():
  a = np.arange(16, dtype=np.float32).reshape(1, 1, 4, 4)
  out, _ = _ar_apply(AttentionResidual(1, mode="paper_flat"), a, unit=True)
  np.testing.assert_allclose(out[0, 0], [[2.5, 4.5], [10.5, 12.5]], atol=1e-6)


class _TwoStages(nn.Module):
  """VA, LA, LA on a 4 x 4 grid; 2 x 2 token merge; AR into a VA, LA on the 2 x 2 grid."""

  @nn.compact
  def __call__(self, x):
    x, a = VABlock(H, MLP)(x)
    probs = []
    for _ in range(2):
      x, a = LABlock(H, MLP)(x, a["scores"])
      probs.append(a["probs"])
    res = AttentionResidual(2 * H)(a["scores"])
    x = x.reshape(B, 2, 2, 2, 2, D).mean((2, 4)).reshape(B, 4, D)
    x = nn.Dense(2 * D)(x)
    x, a = VABlock(2 * H, MLP)(x, res)
    x, a = LABlock(2 * H, MLP, per_head_transform=True)(x, a["scores"])
    probs.append(a["probs"])
    return x, dp_loss_over_layers(probs, "hinge")


def test_two_stage_forward_backward_finite(data):
  x, _ = data
  mdl = _TwoStages()
  params = mdl.init(jax.random.PRNGKey(0), x)["params"]

  @jax.jit
  def loss_fn(p):
    out, dp = mdl.apply({"params": p}, x)
    return jnp.mean(out**2) + 0.1 * dp, (out, dp)

  (loss, (out, dp)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
  assert out.shape == (B, 4, 2 * D) and np.isfinite(float(loss)) and float(dp) > 0.0
  leaves = jax.tree.leaves(nn.unbox(grads))
  assert all(np.isfinite(np.asarray(g)).all() for g in leaves)
  g = _np(grads)
  assert np.abs(g["LABlock_0"]["attn"]["theta"]["kernel"]).max() > 0
  assert np.abs(g["AttentionResidual_0"]["layerscale"]).max() > 0


def test_la_rejects_mismatched_scores(data, la):
  x, prev = data
  _, p, _ = la
  with pytest.raises(ValueError, match="prev_scores"):
    LessAttention(H).apply({"params": p}, x[:, :8], prev)
