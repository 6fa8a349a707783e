"""Attention core (custom VJP keeping only the softmax) vs a float64 numpy re-derivation."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sized_detr_jax.models import attention


def _softmax_np(x):
  x = x - x.max(-1, keepdims=True)
  e = np.exp(x)
  return e / e.sum(-1, keepdims=True)


def _attention_np(q, k, v, blocked):
  logits = np.einsum("bqhd,bkhd->bhqk", q, k)
  if blocked is not None:
    logits = np.where(blocked[:, None], -np.inf, logits)
  return np.einsum("bhqk,bkhd->bqhd", _softmax_np(logits), v)


def _grads_np(q, k, v, blocked, d_out):
  """Gradients of sum(out * d_out) by the textbook softmax Jacobian (float64)."""
  logits = np.einsum("bqhd,bkhd->bhqk", q, k)
  if blocked is not None:
    logits = np.where(blocked[:, None], -np.inf, logits)
  p = _softmax_np(logits)
  d_v = np.einsum("bhqk,bqhd->bkhd", p, d_out)
  d_p = np.einsum("bqhd,bkhd->bhqk", d_out, v)
  # dS_ij = sum_l dP_il * P_il (delta_jl - P_ij): the Jacobian applied row by row.
  d_s = p * d_p - p * np.sum(p * d_p, -1, keepdims=True)
  return (np.einsum("bhqk,bkhd->bqhd", d_s, k), np.einsum("bhqk,bqhd->bkhd", d_s, q), d_v)


@pytest.fixture(scope="module")
def inputs():
  rng = np.random.default_rng(0)
  b, t, heads, d = 2, 7, 3, 4
  q, k, v, d_out = (rng.normal(size=(b, t, heads, d)) for _ in range(4))
  blocked = rng.uniform(size=(b, t, t)) < 0.4
  blocked[:, np.arange(t), np.arange(t)] = False  # every row keeps one key
  blocked[1, 2, :] = True  # ... except this one: a fully blocked row
  blocked[1, 2, 5] = False
  return q, k, v, blocked, d_out


@pytest.mark.parametrize("masked", [True, False])
def test_forward_and_gradients_match_float64(inputs, masked):
  q, k, v, blocked, d_out = inputs
  blocked = blocked if masked else None
  f32 = lambda x: jnp.asarray(x, jnp.float32)
  out, vjp = jax.vjp(lambda a, b_, c: attention.dot_product_attention(a, b_, c, blocked),
                     f32(q), f32(k), f32(v))
  np.testing.assert_allclose(np.asarray(out), _attention_np(q, k, v, blocked), atol=1e-5)
  for got, want in zip(vjp(f32(d_out)), _grads_np(q, k, v, blocked, d_out)):
    np.testing.assert_allclose(np.asarray(got), want, atol=2e-5)


def test_blocked_keys_get_no_gradient(inputs):
  q, k, v, blocked, _ = inputs
  blocked = np.zeros_like(blocked)
  blocked[:, :, 3] = True  # key 3 blocked for every query
  grads = jax.grad(lambda k_, v_: jnp.sum(jnp.sin(attention.dot_product_attention(
      jnp.asarray(q, jnp.float32), k_, v_, blocked))), argnums=(0, 1))(
          jnp.asarray(k, jnp.float32), jnp.asarray(v, jnp.float32))
  for g in grads:
    assert float(jnp.abs(g[:, 3]).max()) == 0.0
    assert float(jnp.abs(g[:, 2]).max()) > 0.0
