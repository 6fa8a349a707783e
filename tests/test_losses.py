"""losses against float64 numpy re-derivations, hand-computed cases and sharded execution."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from sized_detr_jax import losses


def _boxes(rng, shape, lo=0.02, hi=0.6):
  cxcy = rng.uniform(0.2, 0.8, shape + (2,))
  wh = rng.uniform(lo, hi, shape + (2,))
  return np.concatenate([cxcy, wh], axis=-1)


def _np_sized_l1(pred, target, valid, rescale=False, eps=losses.SIZED_L1_EPS):
  """float64 reference written from the paper's weight definition w^N_ij (section 3.4)."""
  pred, target = np.float64(pred), np.float64(target)
  out = np.zeros(valid.shape)
  mean_w = target[..., 2][valid].mean() if valid.any() else 0.0
  mean_h = target[..., 3][valid].mean() if valid.any() else 0.0
  for idx in np.ndindex(valid.shape):
    if not valid[idx]:
      continue
    w, h = max(target[idx][2], eps), max(target[idx][3], eps)
    weights = np.array([1 / w, 1 / h, 1 / w, 1 / h])  # coordinate order cx, cy, w, h
    if rescale:
      weights *= np.array([mean_w, mean_h, mean_w, mean_h])
    out[idx] = np.sum(weights * np.abs(pred[idx] - target[idx]))
  return out


@pytest.fixture(scope="module")
def data():
  rng = np.random.default_rng(0)
  target = _boxes(rng, (8, 6))
  pred = target + rng.normal(0, 0.05, target.shape)
  pred[..., 2:] = np.abs(pred[..., 2:]) + 1e-3  # predicted sizes are positive (sigmoid outputs)
  valid = rng.uniform(size=(8, 6)) < 0.7
  valid[3] = False  # an image with no ground truth
  return (jnp.asarray(pred, jnp.float32), jnp.asarray(target, jnp.float32), jnp.asarray(valid))


def test_sized_l1_hand_computed():
  pred = jnp.array([[0.52, 0.5, 0.25, 0.1]])
  target = jnp.array([[0.5, 0.5, 0.2, 0.1]])
  # x/w errors 0.02 + 0.05 over width 0.2 -> 0.35; y/h errors 0 -> 0.
  np.testing.assert_allclose(losses.sized_l1_loss(pred, target, jnp.array([True])), [0.35], rtol=1e-5)
  np.testing.assert_allclose(losses.l1_loss(pred, target, jnp.array([True])), [0.07], rtol=1e-5)
  # One box: the mean width is its own width, so rescale gives back plain L1.
  np.testing.assert_allclose(
      losses.sized_l1_loss(pred, target, jnp.array([True]), rescale=True), [0.07], rtol=1e-5)


@pytest.mark.parametrize("rescale", [False, True])
def test_sized_l1_matches_numpy_float64(data, rescale):
  pred, target, valid = data
  out = jax.jit(functools.partial(losses.sized_l1_loss, rescale=rescale))(pred, target, valid)
  ref = _np_sized_l1(np.asarray(pred), np.asarray(target), np.asarray(valid), rescale)
  assert out.shape == valid.shape
  np.testing.assert_allclose(out, ref, rtol=2e-5, atol=1e-6)
  assert np.all(np.asarray(out)[~np.asarray(valid)] == 0)


def test_l1_matches_numpy(data):
  pred, target, valid = data
  ref = np.abs(np.float64(pred) - np.float64(target)).sum(-1) * np.asarray(valid)
  np.testing.assert_allclose(losses.l1_loss(pred, target, valid), ref, rtol=1e-5, atol=1e-7)


def test_sized_l1_scale_invariance(data):
  """Scaling every box by s leaves Sized L1 unchanged; with rescale it scales like L1 (by s)."""
  pred, target, valid = data
  s = 0.125
  base = losses.sized_l1_loss(pred, target, valid)
  scaled = losses.sized_l1_loss(pred * s, target * s, valid)
  np.testing.assert_allclose(scaled, base, rtol=1e-4, atol=1e-6)
  base_r = losses.sized_l1_loss(pred, target, valid, rescale=True)
  scaled_r = losses.sized_l1_loss(pred * s, target * s, valid, rescale=True)
  np.testing.assert_allclose(scaled_r, s * base_r, rtol=1e-4, atol=1e-7)
  # Plain L1 is not invariant: it shrinks by s.
  np.testing.assert_allclose(losses.l1_loss(pred * s, target * s, valid),
                             s * losses.l1_loss(pred, target, valid), rtol=1e-4, atol=1e-7)


def test_sized_l1_equalises_small_and_large_boxes():
  """Same relative error on a small and a large box: equal Sized L1, L1 10x apart."""
  target = jnp.array([[0.5, 0.5, 0.02, 0.02], [0.5, 0.5, 0.2, 0.2]])
  pred = target.at[:, 0].add(target[:, 2] * 0.1)
  valid = jnp.array([True, True])
  sized = losses.sized_l1_loss(pred, target, valid)
  l1 = losses.l1_loss(pred, target, valid)
  np.testing.assert_allclose(sized[0], sized[1], rtol=1e-4)
  np.testing.assert_allclose(l1[1] / l1[0], 10.0, rtol=1e-4)


def test_sized_l1_gradient_on_tiny_and_zero_boxes():
  target = jnp.array([[0.5, 0.5, 1e-3, 2e-3], [0.3, 0.3, 0.0, 0.0], [0.1, 0.1, 0.0, 0.0]])
  pred = jnp.array([[0.5004, 0.499, 1.2e-3, 1.5e-3], [0.31, 0.29, 0.01, 0.02], [0.2, 0.2, 0.1, 0.1]])
  valid = jnp.array([True, True, False])
  grad = jax.grad(lambda p: jnp.sum(losses.sized_l1_loss(p, target, valid)))(pred)
  eps = losses.SIZED_L1_EPS
  w = np.maximum(np.asarray(target)[:, 2], eps)[:, None]
  h = np.maximum(np.asarray(target)[:, 3], eps)[:, None]
  expected = np.sign(np.asarray(pred) - np.asarray(target)) / np.concatenate([w, h, w, h], axis=1)
  expected[2] = 0.0  # padded box: no gradient
  assert np.all(np.isfinite(grad))
  np.testing.assert_allclose(grad, expected, rtol=1e-4)
  # Rescaled gradients (w.r.t. pred and target) also stay finite with zero-size targets.
  g_pred, g_tgt = jax.grad(
      lambda p, t: jnp.sum(losses.sized_l1_loss(p, t, valid, rescale=True)), argnums=(0, 1))(pred, target)
  assert np.all(np.isfinite(g_pred)) and np.all(np.isfinite(g_tgt))


def test_vmap_and_leading_dims(data):
  pred, target, valid = data
  direct = losses.sized_l1_loss(pred, target, valid)
  mapped = jax.vmap(losses.sized_l1_loss)(pred, target, valid)
  np.testing.assert_allclose(mapped, direct, rtol=1e-6)
  stacked = losses.sized_l1_loss(pred.reshape(2, 4, 6, 4), target.reshape(2, 4, 6, 4), valid.reshape(2, 4, 6))
  np.testing.assert_allclose(stacked.reshape(8, 6), direct, rtol=1e-6)


def test_no_valid_boxes_gives_zero_not_nan(data):
  pred, target, _ = data
  none = jnp.zeros(target.shape[:-1], bool)
  for out in [losses.sized_l1_loss(pred, target, none, rescale=True),
              losses.giou_loss(pred, target, none), losses.l1_loss(pred, target, none)]:
    assert np.all(np.asarray(out) == 0)


def test_rescale_sharded_jit_and_shard_map_equal_unsharded(data):
  pred, target, valid = data
  assert jax.device_count() >= 4, "tests/conftest.py forces 4 CPU devices"
  mesh = jax.make_mesh((4,), ("data",))
  sharding = NamedSharding(mesh, P("data"))
  unsharded = losses.sized_l1_loss(pred, target, valid, rescale=True)
  p_s, t_s, v_s = (jax.device_put(x, sharding) for x in (pred, target, valid))
  # Under jit the program has the global view: the mean is global without any psum.
  jitted = jax.jit(functools.partial(losses.sized_l1_loss, rescale=True))(p_s, t_s, v_s)
  assert jitted.sharding.spec[0] == "data"  # output stays sharded on the batch axis
  np.testing.assert_allclose(jitted, unsharded, rtol=1e-6)
  # Under shard_map each shard sees its own rows; axis_name psums the mean's sums and counts.
  mapped = jax.jit(jax.shard_map(
      functools.partial(losses.sized_l1_loss, rescale=True, axis_name="data"),
      mesh=mesh, in_specs=P("data"), out_specs=P("data")))(p_s, t_s, v_s)
  np.testing.assert_allclose(mapped, unsharded, rtol=1e-6)
  # Without axis_name the shards use local means, which differ here: the argument matters.
  local = jax.jit(jax.shard_map(
      functools.partial(losses.sized_l1_loss, rescale=True),
      mesh=mesh, in_specs=P("data"), out_specs=P("data")))(p_s, t_s, v_s)
  assert not np.allclose(local, unsharded, rtol=1e-3)


def test_giou_loss_matches_numpy(data):
  pred, target, valid = data
  def xyxy(b):
    b = np.float64(b)
    return np.concatenate([b[..., :2] - b[..., 2:] / 2, b[..., :2] + b[..., 2:] / 2], -1)
  p, t = xyxy(pred), xyxy(target)
  inter = np.prod(np.clip(np.minimum(p[..., 2:], t[..., 2:]) - np.maximum(p[..., :2], t[..., :2]), 0, None), -1)
  area = lambda b: np.prod(b[..., 2:] - b[..., :2], -1)
  union = area(p) + area(t) - inter
  hull = np.prod(np.maximum(p[..., 2:], t[..., 2:]) - np.minimum(p[..., :2], t[..., :2]), -1)
  # IDEA-Research/DINO's denominators: union + 1e-6, hull + 1e-6.
  ref = (1 - (inter / (union + 1e-6) - (hull - union) / (hull + 1e-6))) * np.asarray(valid)
  np.testing.assert_allclose(losses.giou_loss(pred, target, valid), ref, rtol=1e-5, atol=1e-6)


def test_giou_loss_zero_area_finite_gradient():
  pred = jnp.array([[0.5, 0.5, 0.0, 0.0], [0.4, 0.4, 0.1, 0.0]])
  target = jnp.array([[0.5, 0.5, 0.0, 0.0], [0.4, 0.4, 0.1, 0.1]])
  valid = jnp.array([True, True])
  val, grad = jax.value_and_grad(lambda p: jnp.sum(losses.giou_loss(p, target, valid)))(pred)
  assert np.isfinite(val) and np.all(np.isfinite(grad))


def test_sigmoid_focal_loss_matches_numpy_and_optax():
  rng = np.random.default_rng(3)
  logits = rng.normal(0, 3, (2, 5, 7))
  targets = (rng.uniform(size=logits.shape) < 0.3).astype(np.float64)
  p = 1 / (1 + np.exp(-logits))
  ce = -(targets * np.log(p) + (1 - targets) * np.log(1 - p))
  p_t = p * targets + (1 - p) * (1 - targets)
  alpha_t = 0.25 * targets + 0.75 * (1 - targets)
  ref = alpha_t * ce * (1 - p_t) ** 2
  out = losses.sigmoid_focal_loss(jnp.asarray(logits, jnp.float32), jnp.asarray(targets))
  assert out.shape == logits.shape
  np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-7)
  np.testing.assert_allclose(
      out, optax.sigmoid_focal_loss(jnp.asarray(logits, jnp.float32), jnp.asarray(targets, jnp.float32),
                                    alpha=0.25, gamma=2.0), rtol=1e-4, atol=1e-7)
  # alpha < 0 switches the class weighting off; gamma = 0 is plain binary cross-entropy.
  np.testing.assert_allclose(
      losses.sigmoid_focal_loss(jnp.asarray(logits, jnp.float32), jnp.asarray(targets), alpha=-1, gamma=0.0),
      ce, rtol=1e-4, atol=1e-6)


def test_sigmoid_focal_loss_extreme_logits_finite():
  logits = jnp.array([-200.0, -30.0, 0.0, 30.0, 200.0])
  for t in (0.0, 1.0):
    val, grad = jax.value_and_grad(
        lambda x: jnp.sum(losses.sigmoid_focal_loss(x, jnp.full_like(x, t))))(logits)
    assert np.isfinite(val) and np.all(np.isfinite(grad))


def test_wrong_shapes_fail_at_the_boundary_with_a_clear_message():
  pred = jnp.zeros((2, 5, 4))
  with pytest.raises(AssertionError, match="4"):  # boxes must end in 4 coordinates
    losses.sized_l1_loss(pred[..., :3], pred[..., :3], jnp.ones((2, 5), bool))
  with pytest.raises(AssertionError, match="rank"):  # a valid mask of the wrong rank
    losses.l1_loss(pred, pred, jnp.ones((2,), bool))
  with pytest.raises(ValueError, match="box loss must be one of"):
    losses.box_loss("smooth_l1", pred, pred, jnp.ones((2, 5), bool))
  # The registry's entries are the public losses.
  valid = jnp.ones((2, 5), bool)
  np.testing.assert_array_equal(losses.box_loss("l1", pred + 0.1, pred + 0.2, valid),
                                losses.l1_loss(pred + 0.1, pred + 0.2, valid))


def _np_qfl(logits, labels, scores, valid, beta=2.0):
  """float64 reference written as mmdet's quality_focal_loss: every element a negative towards
  0, then the matched class of each positive (0 <= label < C) overwritten with BCE(x, s) *
  |s - p|^beta; rows with valid False zeroed."""
  x = np.float64(logits)
  n, c = x.shape[:-1], x.shape[-1]
  p = 1.0 / (1.0 + np.exp(-x))
  bce = lambda x, t: np.maximum(x, 0) - x * t + np.log1p(np.exp(-np.abs(x)))
  loss = bce(x, 0.0) * p**beta
  for idx in np.ndindex(n):
    k = labels[idx]
    if 0 <= k < c:
      s = np.float64(scores[idx])
      loss[idx + (k,)] = bce(x[idx + (k,)], s) * abs(s - p[idx + (k,)])**beta
    if not valid[idx]:
      loss[idx] = 0.0
  return loss


@pytest.fixture(scope="module")
def qfl_data():
  rng = np.random.default_rng(7)
  logits = rng.normal(0, 3, (2, 6, 5)).astype(np.float32)
  labels = rng.integers(-1, 6, (2, 6)).astype(np.int32)  # -1 and 5 (= C) are background
  scores = rng.uniform(0, 1, (2, 6)).astype(np.float32)
  valid = rng.uniform(size=(2, 6)) < 0.8
  valid[0, :2] = True
  labels[0, :2] = (2, 5)
  valid[1, 0] = False
  labels[1, 0] = 3  # a masked positive
  return logits, labels, scores, valid


def test_quality_focal_loss_hand_computed():
  # x = 0 -> p = 1/2: a positive with s = 1/2 costs 0; a negative ln2 * (1/2)^2; s = 1 on the
  # matched class: ln2 * (1/2)^2 as well.
  logits = jnp.zeros((2, 2))
  out = losses.quality_focal_loss(logits, jnp.array([0, 1]), jnp.array([0.5, 1.0]))
  ln2 = np.log(2.0)
  np.testing.assert_allclose(out, [[0.0, ln2 / 4], [ln2 / 4, ln2 / 4]], rtol=1e-6)


def test_quality_focal_loss_matches_numpy_float64(qfl_data):
  logits, labels, scores, valid = qfl_data
  want = _np_qfl(logits, labels, scores, valid)
  fn = jax.jit(functools.partial(losses.quality_focal_loss, beta=2.0))
  got = fn(jnp.asarray(logits), jnp.asarray(labels), jnp.asarray(scores), jnp.asarray(valid))
  assert got.shape == logits.shape
  np.testing.assert_allclose(got, want, rtol=2e-5, atol=1e-7)
  # The one-hot form gives the same values (background rows all zero).
  onehot = np.zeros(logits.shape, bool)
  for idx in np.ndindex(labels.shape):
    if 0 <= labels[idx] < 5:
      onehot[idx + (labels[idx],)] = True
  np.testing.assert_allclose(fn(jnp.asarray(logits), jnp.asarray(onehot), jnp.asarray(scores),
                                jnp.asarray(valid)), want, rtol=2e-5, atol=1e-7)
  with pytest.raises(ValueError, match="labels must be"):
    losses.quality_focal_loss(jnp.asarray(logits), jnp.zeros((2,), jnp.int32), jnp.asarray(scores))


def test_quality_focal_loss_gradient(qfl_data):
  """jax.grad against central differences of the float64 reference; masked rows and the
  (constant) scores get zero gradient."""
  logits, labels, scores, valid = qfl_data
  total = lambda x, s: jnp.sum(losses.quality_focal_loss(x, jnp.asarray(labels), s,
                                                         jnp.asarray(valid)))
  g_x, g_s = jax.grad(total, argnums=(0, 1))(jnp.asarray(logits), jnp.asarray(scores))
  assert np.all(np.isfinite(g_x))
  np.testing.assert_array_equal(g_s, 0.0)
  np.testing.assert_array_equal(np.asarray(g_x)[~valid], 0.0)
  h = 1e-5
  numeric = np.zeros(logits.shape)
  for idx in np.ndindex(logits.shape):
    up, down = np.float64(logits), np.float64(logits)
    up[idx] += h
    down[idx] -= h
    numeric[idx] = (_np_qfl(up, labels, scores, valid).sum()
                    - _np_qfl(down, labels, scores, valid).sum()) / (2 * h)
  np.testing.assert_allclose(g_x, numeric, rtol=1e-3, atol=1e-5)
