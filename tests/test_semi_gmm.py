"""Cost-based mining: the on-device 1-D GMM EM vs a float64 numpy EM written from sklearn's
GaussianMixture(diag) equations, and Semi-DETR's threshold rule on synthetic bimodal costs."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sized_detr_jax.semi import gmm as gmm_lib


def _numpy_em(x, max_iter=100, tol=1e-3, reg=1e-5):
  """sklearn GaussianMixture(2, 'diag', weights_init=.5, means_init=[min, max],
  precisions_init=1) fit + predict + score_samples, float64."""
  x = np.asarray(x, np.float64)
  w, mu, var = np.array([0.5, 0.5]), np.array([x.min(), x.max()]), np.ones(2)

  def log_p(w, mu, var):
    return (np.log(w) - 0.5 * (np.log(2 * np.pi) + np.log(var))
            - 0.5 * (x[:, None] - mu)**2 / var)

  lower, it = -np.inf, 0
  for it in range(1, max_iter + 1):
    prev = lower
    lp = log_p(w, mu, var)
    norm = np.log(np.exp(lp).sum(1))
    resp = np.exp(lp - norm[:, None])
    nk = resp.sum(0) + 10 * np.finfo(np.float64).eps
    mu = resp.T @ x / nk
    var = (resp.T @ (x * x)) / nk - mu**2 + reg
    w = nk / nk.sum()
    lower = norm.mean()
    if abs(lower - prev) < tol:
      break
  lp = log_p(w, mu, var)
  return w, mu, var, it, lp.argmax(1), np.log(np.exp(lp).sum(1))


def _reference_threshold(x):
  if len(x) == 0:
    return 0.0
  if len(x) == 1:
    return float(x[0])
  *_, assign, score = _numpy_em(x)
  group = 0 if (assign == 0).any() else 1
  sel = np.flatnonzero(assign == group)
  return float(x[sel[np.argmax(score[sel])]])


@pytest.fixture(scope="module")
def costs():
  rng = np.random.default_rng(0)
  good = rng.normal(1.5, 0.4, 70)  # well-matched pseudo boxes: low cost
  bad = rng.normal(6.0, 1.2, 30)  # noisy ones
  x = rng.permutation(np.concatenate([good, bad])).astype(np.float32)
  # Pad into a [B, G] array with invalid slots holding garbage.
  padded = np.full((4, 40), 1e3, np.float32)
  valid = np.zeros((4, 40), bool)
  per_image = [30, 25, 40, 5]
  start = 0
  for i, n in enumerate(per_image):
    padded[i, :n] = x[start:start + n]
    valid[i, :n] = True
    start += n
  rows = rng.permutation(40)  # valid entries need not come first
  return padded[:, rows], valid[:, rows], x


_threshold = jax.jit(gmm_lib.gmm_cost_threshold)


def test_em_matches_numpy(costs):
  padded, valid, x = costs
  for tol in (1e-3, 0.0):
    fit = gmm_lib.fit_gmm_1d(jnp.asarray(padded.ravel()), jnp.asarray(valid.ravel()), tol=tol)
    w, mu, var, it, _, _ = _numpy_em(x, tol=tol)
    assert int(fit.num_iter) == it
    np.testing.assert_allclose(fit.weights, w, rtol=1e-4)
    np.testing.assert_allclose(fit.means, mu, rtol=1e-4)
    np.testing.assert_allclose(fit.variances, var, rtol=1e-3)
  assert it == 100 and mu[0] < 2.0 < 5.0 < mu[1]  # tol 0: fixed count; two clusters found


def test_threshold_rule(costs):
  padded, valid, x = costs
  thr, _ = _threshold(padded, valid)
  want = _reference_threshold(x)
  assert float(thr) == pytest.approx(want, rel=1e-6)
  assert 1.0 < want < 2.0  # the highest-density point of the low-cost cluster
  mined, thr2 = gmm_lib.mine_by_cost(jnp.asarray(padded), jnp.asarray(valid))
  np.testing.assert_array_equal(mined, valid & (padded <= want))
  assert float(thr2) == pytest.approx(want, rel=1e-6)


def test_threshold_edge_cases():
  x = np.array([[3.0, 7.0, 1.0]], np.float32)
  assert float(_threshold(x, np.array([[False, False, False]]))[0]) == 0.0
  assert float(_threshold(x, np.array([[False, True, False]]))[0]) == 7.0
  # Two points: each is its own component's mean; the low one is the threshold.
  two = np.array([[3.0, 7.0, 1e4]], np.float32)
  assert float(_threshold(two, np.array([[True, True, False]]))[0]) == pytest.approx(
      _reference_threshold(np.array([3.0, 7.0])))


def test_matched_costs_vs_direct_cost():
  rng = np.random.default_rng(2)
  b, q, g, c = 2, 6, 3, 4
  outputs = {"pred_logits": rng.normal(size=(b, q, c)).astype(np.float32),
             "pred_boxes": rng.uniform(0.2, 0.6, (b, q, 4)).astype(np.float32)}
  targets = {"boxes": rng.uniform(0.2, 0.6, (b, g, 4)).astype(np.float32),
             "labels": rng.integers(0, c, (b, g)).astype(np.int32)}
  valid = np.array([[True, False, True], [True, True, True]])
  cost, matched = gmm_lib.matched_costs(outputs, targets, valid)
  np.testing.assert_array_equal(matched, valid)
  # Each matched cost is the cost of a distinct query; the assignment is optimal (scipy).
  from scipy.optimize import linear_sum_assignment
  from sized_detr_jax import matching
  full = np.asarray(matching.matching_cost(outputs["pred_logits"], outputs["pred_boxes"],
                                           targets["labels"], targets["boxes"], valid))
  for i in range(b):
    cols = np.flatnonzero(valid[i])
    r, cidx = linear_sum_assignment(full[i][:, cols])
    assert float(np.sum(cost[i])) == pytest.approx(float(full[i][:, cols][r, cidx].sum()),
                                                   rel=1e-5)
