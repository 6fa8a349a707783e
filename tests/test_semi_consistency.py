"""Cross-view consistency: the loss vs a numpy re-derivation, gradient only to the student; the
projector's shapes, masked batch-norm statistics vs numpy, and padding invariance."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sized_detr_jax.semi import consistency as cons


def _numpy_loss(s, t, valid, coef=10.0):
  s = np.asarray(s, np.float64)
  t = np.asarray(t, np.float64)
  ns = s / np.maximum(np.linalg.norm(s, axis=-1, keepdims=True), 1e-12)
  nt = t / np.maximum(np.linalg.norm(t, axis=-1, keepdims=True), 1e-12)
  rows = np.asarray(valid, bool)
  # torch: F.mse_loss(..., reduction='none').mean() over the selected rows, then x 10.
  return [coef * ((ns[l][rows] - nt[l][rows])**2).mean() for l in range(s.shape[0])]


def test_consistency_loss_matches_numpy_and_grads_student_only():
  rng = np.random.default_rng(0)
  L, B, N, D = 3, 2, 5, 8
  s = rng.normal(size=(L, B, N, D)).astype(np.float32)
  t = rng.normal(size=(L, B, N, D)).astype(np.float32)
  valid = np.array([[1, 1, 0, 1, 0], [0, 1, 1, 0, 0]], bool)
  out = jax.jit(cons.consistency_loss)(s, t, valid)
  want = _numpy_loss(s, t, valid)
  for l in range(L):
    assert float(out[f"loss_consistency_d{l}"]) == pytest.approx(want[l], rel=1e-5)
  assert float(out["loss_consistency"]) == pytest.approx(sum(want), rel=1e-5)
  # Padded rows do not matter.
  s2 = s.copy()
  s2[:, ~valid] = 1e3
  assert float(cons.consistency_loss(s2, t, valid)["loss_consistency"]) == pytest.approx(
      sum(want), rel=1e-5)

  gs, gt = jax.grad(lambda a, b: cons.consistency_loss(a, b, valid)["loss_consistency"],
                    argnums=(0, 1))(jnp.asarray(s), jnp.asarray(t))
  assert float(jnp.abs(gt).max()) == 0.0
  assert float(jnp.abs(gs[:, valid]).min(axis=-1).max()) > 0.0
  assert float(jnp.abs(gs[:, ~valid]).max()) == 0.0


def test_nothing_valid_is_zero():
  z = np.ones((2, 1, 3, 4), np.float32)
  assert float(cons.consistency_loss(z, -z, np.zeros((1, 3), bool))["loss_consistency"]) == 0.0


def test_masked_batch_norm_matches_numpy():
  rng = np.random.default_rng(1)
  x = rng.normal(2.0, 3.0, (6, 3, 3, 4)).astype(np.float32)
  mask = np.array([1, 0, 1, 1, 0, 1], bool)
  bn = cons.MaskedBatchNorm()
  params = bn.init(jax.random.key(0), x, mask)
  y = np.asarray(bn.apply(params, x, mask))
  sel = x[mask].astype(np.float64)
  want = (sel - sel.mean(axis=(0, 1, 2))) / np.sqrt(sel.var(axis=(0, 1, 2)) + 1e-5)
  np.testing.assert_allclose(y[mask], want, atol=1e-5)


@pytest.fixture(scope="module")
def projector():
  model = cons.Projector(conv_dim=8, fc_dim=16, out_dim=6)
  rng = np.random.default_rng(2)
  feats = rng.normal(size=(2, 4, 7, 7, 5)).astype(np.float32)
  valid = np.array([[1, 1, 0, 1], [1, 0, 0, 1]], bool)
  params = model.init(jax.random.key(0), feats, valid)
  return model, params, feats, valid


def test_projector_shapes_and_padding(projector):
  model, params, feats, valid = projector
  apply = jax.jit(model.apply)
  out = np.asarray(apply(params, feats, valid))
  assert out.shape == (2, 4, 6)
  assert (out >= 0).all() and (out[~valid] == 0).all() and out[valid].any()
  # Garbage in padded RoIs changes nothing (they are out of the batch-norm statistics).
  noisy = feats.copy()
  noisy[~valid] = 50.0
  np.testing.assert_allclose(apply(params, noisy, valid), out, atol=1e-5)
  kernel = params["params"]["fc1"]["kernel"]
  assert kernel.shape == (7 * 7 * 8, 16)


def test_roi_features_feed_projector_and_no_grad_to_teacher_features(projector):
  model, params, _, valid = projector
  rng = np.random.default_rng(3)
  maps = [jnp.asarray(rng.normal(size=(2, 64 // s, 64 // s, 5)).astype(np.float32))
          for s in (8, 16, 32, 64)]
  boxes = jnp.asarray(np.array([[[2, 3, 30, 40], [0, 0, 64, 64], [5, 5, 9, 9], [10, 4, 60, 20]],
                                [[1, 1, 8, 8], [0, 0, 1, 1], [3, 3, 50, 61], [20, 20, 40, 44]]],
                               np.float32))

  def loss(params, maps):
    rois = cons.roi_features(maps, boxes)
    return jnp.sum(model.apply(params, rois, valid) ** 2)

  gp, gm = jax.jit(jax.grad(loss, argnums=(0, 1)))(params, maps)
  assert all(float(jnp.abs(g).max()) == 0.0 for g in gm)
  assert float(jnp.abs(gp["params"]["fc2"]["kernel"]).max()) > 0.0


def test_consistency_queries_layout_and_attention_rules():
  from sized_detr_jax.models import denoising
  rng = np.random.default_rng(4)
  b, m, d, groups = 2, 3, 4, 5
  boxes = rng.uniform(0.2, 0.8, (b, m, 4)).astype(np.float32)
  content = rng.normal(size=(b, m, d)).astype(np.float32)
  valid = np.array([[1, 0, 1], [0, 0, 0]], bool)
  q = cons.consistency_queries(boxes, content, valid, groups=groups)
  assert q["content"].shape == (b, groups * m, d) and q["valid"].shape == (b, groups * m)
  for k in range(groups):
    np.testing.assert_array_equal(q["valid"][:, k * m:(k + 1) * m], valid)
    np.testing.assert_allclose(q["content"][0, k * m], content[0, 0])
    np.testing.assert_allclose(q["boxes_unsigmoid"][0, k * m + 2],
                               np.log(boxes[0, 2] / (1 - boxes[0, 2])), rtol=1e-5)
  # With a denoising block after it: one mask over [consistency, denoising, matching].
  dn = denoising.build_denoising_queries(
      jax.random.key(0), boxes, np.zeros((b, m), np.int32), valid, num_classes=3, dn_number=4,
      label_noise_ratio=0.5, box_noise_scale=0.4)
  num_q = 2
  mask = np.asarray(denoising.denoising_attention_mask(
      jnp.concatenate([q["group"], dn["group"]], axis=1), num_q))[0]
  c_slots = groups * m
  total = mask.shape[0]
  is_c = np.arange(total) < c_slots
  is_match = np.arange(total) >= total - num_q
  is_dn = ~is_c & ~is_match
  c_valid = np.asarray(q["valid"][0])
  c_group = np.arange(c_slots) // m
  for i in np.flatnonzero(c_valid):
    seen = ~mask[i]
    want = np.zeros(total, bool)
    want[:c_slots] = c_valid & (c_group == c_group[i])
    want[i] = True
    want[is_match] = True
    np.testing.assert_array_equal(seen, want)
  assert mask[np.ix_(is_dn, is_c)].all() and mask[np.ix_(is_match, is_c | is_dn)].all()
  assert np.asarray(dn["valid"][0]).any()


def test_consistency_set():
  targets = {"valid": np.array([[1, 0, 0, 0]], bool),
             "initial_valid": np.array([[1, 1, 1, 0]], bool)}
  mined = np.array([[0, 1, 0, 1]], bool)
  np.testing.assert_array_equal(cons.consistency_set(targets, mined), [[1, 1, 0, 0]])
