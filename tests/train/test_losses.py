"""train/losses.next_token_ce: the loss equals torch's shifted cross-entropy with ignore_index=-100
(the loss OpenFlamingo and HF causal LMs train with); its gradient equals torch's; "correct" counts
the valid positions whose label is the argmax (ties for the maximum count as correct)."""

import jax
import jax.numpy as jnp
import numpy as np
import torch

from vlm_jax.train.losses import IGNORE, next_token_ce


def _torch_loss(logits: np.ndarray, labels: np.ndarray) -> tuple[float, np.ndarray]:
  x = torch.tensor(logits, requires_grad=True)
  loss = torch.nn.functional.cross_entropy(x[:, :-1].reshape(-1, x.shape[-1]),
                                           torch.tensor(labels[:, 1:]).reshape(-1).long(),
                                           ignore_index=IGNORE)
  loss.backward()
  return float(loss.detach()), x.grad.numpy()


def test_next_token_ce_equals_torch_loss_gradient_and_argmax_hits():
  rng = np.random.RandomState(0)
  logits = (rng.randn(3, 9, 50) * 3).astype(np.float32)
  labels = rng.randint(0, 50, (3, 9)).astype(np.int32)
  labels[0, :4] = IGNORE
  labels[2, 7:] = IGNORE
  # Make some labels the argmax so "correct" is not trivially 0.
  labels[1, 1:] = logits[1, :-1].argmax(-1)
  want_loss, want_grad = _torch_loss(logits, labels)
  (loss, aux), grad = jax.value_and_grad(lambda x: next_token_ce(x, jnp.asarray(labels)),
                                         has_aux=True)(jnp.asarray(logits))
  np.testing.assert_allclose(float(loss), want_loss, rtol=1e-6)
  np.testing.assert_allclose(np.asarray(grad), want_grad, atol=1e-7)
  targets, valid = labels[:, 1:], labels[:, 1:] != IGNORE
  assert int(aux["num_tokens"]) == int(valid.sum()) == 3 * 8 - 3 - 2
  hits = int(((logits[:, :-1].argmax(-1) == targets) & valid).sum())
  assert hits >= 8  # row 1's labels
  assert int(aux["correct"]) == hits


def test_a_tie_for_the_maximum_counts_as_correct():
  logits = jnp.zeros((1, 3, 4))
  labels = jnp.asarray([[0, 2, IGNORE]], jnp.int32)
  loss, aux = next_token_ce(logits, labels)
  np.testing.assert_allclose(float(loss), np.log(4.0), rtol=1e-6)
  assert int(aux["num_tokens"]) == 1 and int(aux["correct"]) == 1
