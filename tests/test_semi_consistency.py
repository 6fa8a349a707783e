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


@pytest.mark.slow
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


@pytest.mark.slow
def test_masked_consistency_queries_change_only_their_group():
  """`semi.consistency_queries`: queries for the whole initial set with the loss masked to the
  chosen boxes ("initial") leave the matching queries' outputs (so the detection losses and the
  mining) exactly as without any consistency query, but the chosen queries' decoder states,
  and so the consistency loss, change: the masked queries share self-attention with them. The
  official set ("chosen") is what the decode sees when only the chosen boxes get queries."""
  import pathlib
  from sized_detr_jax import config_lib
  from sized_detr_jax.models import dino
  from sized_detr_jax.models.testing import random_params
  old = jax.config.read("jax_disable_most_optimizations")
  jax.config.update("jax_disable_most_optimizations", True)
  try:
    config = config_lib.load_config_module(
        str(pathlib.Path(__file__).parents[1] / "experiments" / "dino_r50.py")).get_config("smoke")
    model = dino.build_dino(config.model)
    images = jax.random.normal(jax.random.PRNGKey(0), (2, 64, 64, 3))
    mask = jnp.ones((2, 64, 64), bool)
    shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), images, mask)["params"]
    variables = {"params": random_params(shapes, seed=1)}
    enc = jax.jit(lambda x, m: model.apply(variables, x, m, method=model.encode))(images, mask)
    rng = np.random.default_rng(0)
    m, d = 4, model.hidden_dim
    boxes = np.concatenate([rng.uniform(0.3, 0.7, (2, m, 2)), rng.uniform(0.1, 0.3, (2, m, 2))],
                           -1).astype(np.float32)
    content = rng.normal(size=(2, m, d)).astype(np.float32)
    initial = np.array([[1, 1, 1, 0], [1, 1, 0, 0]], bool)
    chosen = np.array([[1, 0, 1, 0], [0, 1, 0, 0]], bool)

    @jax.jit
    def decode(valid):
      extra = cons.consistency_queries(boxes, content, valid, groups=2)
      return model.apply(variables, enc, None, False, extra, method=model.decode)

    plain = jax.jit(lambda: model.apply(variables, enc, method=model.decode))()
    out_initial, out_chosen = decode(initial), decode(chosen)
  finally:
    jax.config.update("jax_disable_most_optimizations", old)
  # Equal up to float rounding (the softmax runs over more, blocked, keys).
  close = lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
  for out in (out_initial, out_chosen):
    for key in ("pred_logits", "pred_boxes"):
      close(out[key], plain[key])
      np.testing.assert_array_equal(out["interm_outputs"][key], plain["interm_outputs"][key])
      for a, b in zip(out["aux_outputs"], plain["aux_outputs"]):
        close(a[key], b[key])
  loss_mask = np.concatenate([chosen] * 2, axis=1)
  h_initial = np.asarray(out_initial["extra_outputs"]["hidden"])
  h_chosen = np.asarray(out_chosen["extra_outputs"]["hidden"])
  # The first decoder layer's self-attention already mixes the group: the chosen queries'
  # states differ, and so does the loss against the same teacher states.
  diff = np.abs(h_initial - h_chosen)[:, loss_mask].max(axis=(1, 2))
  assert (diff > 1e-3).all(), diff
  teacher = np.asarray(jax.random.normal(jax.random.PRNGKey(3), h_chosen.shape))
  loss_i = float(cons.consistency_loss(h_initial, teacher, loss_mask)["loss_consistency"])
  loss_c = float(cons.consistency_loss(h_chosen, teacher, loss_mask)["loss_consistency"])
  ref_c = sum(_numpy_loss(h_chosen, teacher, loss_mask))
  assert loss_c == pytest.approx(ref_c, rel=1e-5)
  assert abs(loss_i - loss_c) > 1e-4 * abs(loss_c)
