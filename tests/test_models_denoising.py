"""Contrastive denoising queries and attention mask: layout, noise bounds, mask properties."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sized_detr_jax.models import denoising
from sized_detr_jax.models.layers import inverse_sigmoid

Q = 5
BUILD = jax.jit(denoising.build_denoising_queries, static_argnames=(
    "num_classes", "dn_number", "label_noise_ratio", "box_noise_scale", "dn_groups"))


@pytest.fixture(scope="module")
def dn():
  # Image 0: 2 valid boxes at columns 1 and 3; image 1: 3 valid; image 2: none.
  valid = np.array([[False, True, False, True], [True, True, True, False], [False] * 4])
  boxes = np.tile(np.array([0.5, 0.5, 0.2, 0.4], np.float32), (3, 4, 1))
  boxes[0, 1] = [0.3, 0.6, 0.1, 0.2]
  boxes[0, 3] = [0.7, 0.2, 0.3, 0.1]
  labels = np.array([[9, 4, 9, 7], [1, 2, 3, 9], [0, 0, 0, 0]], np.int32)
  out = BUILD(
      jax.random.PRNGKey(0), jnp.asarray(boxes), jnp.asarray(labels), jnp.asarray(valid),
      num_classes=10, dn_number=6, label_noise_ratio=0.5, box_noise_scale=0.4)
  out = jax.tree.map(np.asarray, out)
  mask = np.asarray(jax.jit(denoising.denoising_attention_mask, static_argnums=1)(
      jnp.asarray(out["group"]), Q))
  return boxes, labels, valid, out, mask


def test_layout_and_known_assignment(dn):
  boxes, labels, valid, out, _ = dn
  d = denoising.dn_slot_count(dn_number=6, max_boxes=4)
  assert out["gt_index"].shape == (3, d) and d == 12
  # Image 0: n=2 -> 3 groups of [pos pos neg neg] referring to columns 1 and 3.
  np.testing.assert_array_equal(out["gt_index"][0], [1, 3] * 6)
  np.testing.assert_array_equal(out["positive"][0], [1, 1, 0, 0] * 3)
  assert out["valid"][0].all()
  # Image 1: n=3 -> 2 groups of 6 slots.
  np.testing.assert_array_equal(out["gt_index"][1], [0, 1, 2] * 4)
  assert out["valid"][1].sum() == 12 and out["positive"][1].sum() == 6
  # Image 2: no ground truth -> no valid slot, gt_index -1.
  assert not out["valid"][2].any() and (out["gt_index"][2] == -1).all()
  assert not (out["positive"] & ~out["valid"]).any()


def test_noise_bounds(dn):
  boxes, labels, valid, out, _ = dn
  scale = 0.4
  for b in range(2):
    for s in np.flatnonzero(out["valid"][b]):
      gt = boxes[b, out["gt_index"][b, s]]
      cx, cy, w, h = 1 / (1 + np.exp(-out["boxes_unsigmoid"][b, s].astype(np.float64)))
      got_xyxy = np.array([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2])
      gt_xyxy = np.concatenate([gt[:2] - gt[2:] / 2, gt[:2] + gt[2:] / 2])
      half = np.concatenate([gt[2:], gt[2:]]) / 2 * scale
      move = np.abs(got_xyxy - gt_xyxy)
      clipped = (got_xyxy <= 1e-3) | (got_xyxy >= 1 - 1e-3)
      if out["positive"][b, s]:
        assert np.all(move <= half + 1e-3)
      else:
        assert np.all((move >= half - 1e-3) | clipped) and np.all(move <= 2 * half + 1e-3)
      assert 0 <= out["labels"][b, s] < 10


def test_label_noise_rate():
  valid = jnp.ones((64, 10), bool)
  labels = jnp.zeros((64, 10), jnp.int32)
  out = BUILD(
      jax.random.PRNGKey(1), jnp.full((64, 10, 4), 0.5), labels, valid, num_classes=1000,
      dn_number=100, label_noise_ratio=0.5, box_noise_scale=0.4)
  changed = np.asarray(out["labels"] != 0)[np.asarray(out["valid"])]
  assert abs(changed.mean() - 0.25) < 0.02  # flip prob 0.25, a flip hits label 0 w.p. 1e-3


def test_attention_mask_properties(dn):
  _, _, _, out, mask = dn
  d = out["group"].shape[1]
  assert mask.shape == (3, d + Q, d + Q)
  # Matching queries never see denoising slots, and see each other.
  assert mask[:, d:, :d].all()
  assert not mask[:, d:, d:].any()
  # Denoising slots see all matching queries.
  assert not mask[:, :d, d:].any()
  for b in range(3):
    g = out["group"][b]
    for i in range(d):
      for j in range(d):
        same = out["valid"][b, i] and out["valid"][b, j] and g[i] == g[j]
        assert mask[b, i, j] == (not same and i != j), (b, i, j)
  # No row fully blocked (softmax stays finite).
  assert not mask.all(-1).any()


def test_fixed_groups_and_inverse_sigmoid():
  valid = jnp.array([[True, False, True]])
  out = BUILD(
      jax.random.PRNGKey(2), jnp.full((1, 3, 4), 0.25), jnp.ones((1, 3), jnp.int32), valid,
      num_classes=3, dn_number=100, label_noise_ratio=0.0, box_noise_scale=0.0, dn_groups=2)
  assert out["gt_index"].shape == (1, 12)
  np.testing.assert_array_equal(np.asarray(out["gt_index"][0, :8]), [0, 2] * 4)
  assert not np.asarray(out["valid"][0, 8:]).any()
  np.testing.assert_allclose(np.asarray(out["boxes_unsigmoid"][0, 0]), np.log(0.25 / 0.75),
                             rtol=1e-6)
  np.testing.assert_allclose(np.asarray(jax.jit(inverse_sigmoid)(jnp.array([0.0, 1.0, 0.5]))),
                             [np.log(1e-3), -np.log(1e-3), 0.0], rtol=1e-6)
