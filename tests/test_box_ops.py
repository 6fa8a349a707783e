"""box_ops against float64 numpy re-derivations and hand-computed cases."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sized_detr_jax import box_ops


# IDEA-Research/DINO util/box_ops.py: iou = inter / (union + 1e-6), giou = iou - (hull - union) /
# (hull + 1e-6).
DINO_EPS = 1e-6


def _np_iou_giou(a, b):
  """Loop-based float64 reference of pairwise IoU and GIoU for xyxy boxes (DINO's eps form)."""
  iou = np.zeros((len(a), len(b)))
  giou = np.zeros((len(a), len(b)))
  for i, p in enumerate(a):
    for j, q in enumerate(b):
      iw = max(0.0, min(p[2], q[2]) - max(p[0], q[0]))
      ih = max(0.0, min(p[3], q[3]) - max(p[1], q[1]))
      inter = iw * ih
      union = (p[2] - p[0]) * (p[3] - p[1]) + (q[2] - q[0]) * (q[3] - q[1]) - inter
      hull = (max(p[2], q[2]) - min(p[0], q[0])) * (max(p[3], q[3]) - min(p[1], q[1]))
      iou[i, j] = inter / (union + DINO_EPS)
      giou[i, j] = iou[i, j] - (hull - union) / (hull + DINO_EPS)
  return iou, giou


def _random_xyxy(rng, n):
  cxcy = rng.uniform(0.1, 0.9, (n, 2))
  wh = rng.uniform(0.01, 0.5, (n, 2))
  return np.concatenate([cxcy - wh / 2, cxcy + wh / 2], axis=1)


def test_conversions_hand_computed():
  cxcywh = jnp.array([[10.0, 20.0, 4.0, 6.0]])
  np.testing.assert_allclose(box_ops.box_cxcywh_to_xyxy(cxcywh), [[8, 17, 12, 23]])
  np.testing.assert_allclose(box_ops.box_cxcywh_to_xywh(cxcywh), [[8, 17, 4, 6]])
  xywh = jnp.array([[8.0, 17.0, 4.0, 6.0]])
  np.testing.assert_allclose(box_ops.box_xywh_to_xyxy(xywh), [[8, 17, 12, 23]])
  np.testing.assert_allclose(box_ops.box_xywh_to_cxcywh(xywh), [[10, 20, 4, 6]])
  np.testing.assert_allclose(box_ops.box_xyxy_to_xywh(jnp.array([[8.0, 17, 12, 23]])), xywh)
  np.testing.assert_allclose(box_ops.box_area(jnp.array([[8.0, 17, 12, 23], [3, 3, 1, 5]])), [24, 0])


def test_conversions_round_trip_any_leading_shape():
  rng = np.random.default_rng(0)
  boxes = jnp.asarray(rng.uniform(0.05, 0.5, (2, 3, 5, 4)), jnp.float32)
  for fwd, back in [(box_ops.box_cxcywh_to_xyxy, box_ops.box_xyxy_to_cxcywh),
                    (box_ops.box_xywh_to_xyxy, box_ops.box_xyxy_to_xywh),
                    (box_ops.box_cxcywh_to_xywh, box_ops.box_xywh_to_cxcywh)]:
    out = back(fwd(boxes))
    assert out.shape == boxes.shape
    np.testing.assert_allclose(out, boxes, atol=1e-6)


def test_pairwise_iou_giou_match_numpy_float64():
  rng = np.random.default_rng(1)
  a, b = _random_xyxy(rng, 7), _random_xyxy(rng, 5)
  a[0] = b[0]  # an identical pair: IoU = GIoU = 1
  iou_ref, giou_ref = _np_iou_giou(a, b)
  iou, union = box_ops.box_iou(jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32))
  giou = box_ops.generalized_box_iou(jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32))
  assert iou.shape == giou.shape == union.shape == (7, 5)
  np.testing.assert_allclose(iou, iou_ref, atol=2e-6)
  np.testing.assert_allclose(giou, giou_ref, atol=2e-6)
  area0 = (a[0, 2] - a[0, 0]) * (a[0, 3] - a[0, 1])
  np.testing.assert_allclose(giou[0, 0], area0 / (area0 + 1e-6), atol=1e-6)
  # Elementwise variants agree with the diagonal of the pairwise ones.
  n = 5
  el_iou = box_ops.elementwise_box_iou(jnp.asarray(a[:n]), jnp.asarray(b))
  el_giou = box_ops.elementwise_generalized_box_iou(jnp.asarray(a[:n]), jnp.asarray(b))
  np.testing.assert_allclose(el_iou, np.diag(iou_ref[:n]), atol=2e-6)
  np.testing.assert_allclose(el_giou, np.diag(giou_ref[:n]), atol=2e-6)


def test_giou_hand_computed_disjoint_boxes():
  # Unit squares at x in [0,1] and [2,3]: IoU 0, hull 3 x 1, union 2 -> GIoU = -(3 - 2) / 3.
  a = jnp.array([[0.0, 0.0, 1.0, 1.0]])
  b = jnp.array([[2.0, 0.0, 3.0, 1.0]])
  np.testing.assert_allclose(box_ops.generalized_box_iou(a, b), [[-1.0 / 3.0]], atol=1e-6)
  # Half-overlapping squares: inter 0.5, union 1.5, hull 1.5 -> GIoU = IoU = 1/3.
  c = jnp.array([[0.5, 0.0, 1.5, 1.0]])
  np.testing.assert_allclose(box_ops.elementwise_generalized_box_iou(a, c), [1.0 / 3.0], atol=1e-6)


def test_eps_is_dinos_additive_form():
  # Two identical 0.01 x 0.01 boxes: union = hull = 1e-4, so IoU = GIoU = 1e-4 / (1e-4 + 1e-6)
  # = 100 / 101 (a max(union, eps) clamp would give exactly 1).
  a = jnp.array([[0.2, 0.2, 0.21, 0.21]])
  np.testing.assert_allclose(box_ops.box_iou(a, a)[0], [[100.0 / 101.0]], rtol=1e-4)
  np.testing.assert_allclose(box_ops.generalized_box_iou(a, a), [[100.0 / 101.0]], rtol=1e-4)
  # Disjoint 0.01-squares 0.01 apart: union 2e-4, hull 3e-4 -> GIoU = -(1e-4) / (3e-4 + 1e-6).
  b = jnp.array([[0.22, 0.2, 0.23, 0.21]])
  np.testing.assert_allclose(box_ops.elementwise_generalized_box_iou(a[0], b[0]),
                             -1e-4 / (3e-4 + 1e-6), rtol=1e-4)


def test_batched_pairwise_leading_dims():
  rng = np.random.default_rng(2)
  a = _random_xyxy(rng, 2 * 4).reshape(2, 4, 4)
  b = _random_xyxy(rng, 2 * 3).reshape(2, 3, 4)
  giou = box_ops.generalized_box_iou(jnp.asarray(a), jnp.asarray(b))
  assert giou.shape == (2, 4, 3)
  for i in range(2):
    np.testing.assert_allclose(giou[i], _np_iou_giou(a[i], b[i])[1], atol=2e-6)


@pytest.mark.parametrize("fn", [box_ops.generalized_box_iou, box_ops.elementwise_generalized_box_iou,
                                lambda a, b: box_ops.box_iou(a, b)[0]])
def test_zero_area_boxes_finite_values_and_gradients(fn):
  a = jnp.array([[0.3, 0.3, 0.3, 0.3], [0.2, 0.2, 0.2, 0.6], [0.1, 0.1, 0.4, 0.4]])
  b = jnp.array([[0.3, 0.3, 0.3, 0.3], [0.5, 0.5, 0.5, 0.5], [0.1, 0.1, 0.4, 0.4]])
  val = fn(a, b)
  grads = jax.grad(lambda a, b: jnp.sum(fn(a, b)), argnums=(0, 1))(a, b)
  assert np.all(np.isfinite(val))
  # Two identical points: inter = union = hull = 0, so IoU = GIoU = 0 / 1e-6 = 0.
  np.testing.assert_allclose(fn(a[:1], b[:1]), np.zeros(np.shape(fn(a[:1], b[:1]))), atol=0)
  for g in grads:
    assert np.all(np.isfinite(g))
