"""Semi-DETR's cost-based pseudo-label mining: a 2-component 1-D GMM over matching costs.

As Semi-DETR's detr_ssod/models/dino_detr_ssod.py (unsup_loss, _fit_gmm):
the student's last-layer strong-view predictions are Hungarian-matched to the initial
(mean + std) pseudo boxes with DINO's cost (focal 2 / L1 5 / GIoU 2); the matched costs of the
whole global batch are fitted every step by `sklearn.mixture.GaussianMixture(2,
covariance_type="diag", weights_init=[.5, .5], means_init=[min, max], precisions_init=[1, 1],
reg_covar=1e-5)` (defaults: tol 1e-3, max_iter 100); the threshold is the cost of the point with
the highest mixture likelihood (`score_samples`) among those `predict`-ed into component 0 (the
low-cost one), or component 1 if none; boxes with cost <= threshold are "mined". Semi-DETR uses
the mined boxes (together with the score >= 0.4 ones) only for the cross-view consistency queries.

Here the EM runs on device with static shapes: the costs come as a padded array with a `valid`
mask (under `jit` the array is the global batch, so no all-gather is needed), and the EM loop is a
`while_loop` that stops as sklearn does (|change of the mean log-likelihood| < tol, at most
max_iter iterations; tol=0 gives a fixed max_iter iterations). sklearn's M-step details are kept:
`nk = sum resp + 10 eps`, weights renormalised, variance + reg_covar. Variances are computed as
the resp-weighted mean of (x - mean)^2 (sklearn: E[x^2] - mean^2; equal in exact arithmetic,
better conditioned in float32). Edge cases as the reference: no valid cost -> threshold 0, one
valid cost -> that cost. Ties for the highest likelihood pick the lowest cost.
"""
from typing import NamedTuple

import jax
import jax.numpy as jnp

from sized_detr_jax import criterion
from sized_detr_jax import matching

_LOG_2PI = 1.8378770664093453


class GMM1D(NamedTuple):
  """A fitted 2-component 1-D Gaussian mixture (a pytree)."""
  weights: jax.Array  # [2] mixture weights
  means: jax.Array  # [2]
  variances: jax.Array  # [2]
  num_iter: jax.Array  # [] int32 EM iterations run


def weighted_log_prob(x, gmm):
  """log(w_k) + log N(x | mean_k, var_k) for every point: [N] -> [N, 2]."""
  x = x[..., None]
  return (jnp.log(gmm.weights) - 0.5 * (_LOG_2PI + jnp.log(gmm.variances)
                                        + (x - gmm.means)**2 / gmm.variances))


def fit_gmm_1d(x, valid, *, max_iter=100, tol=1e-3, reg_covar=1e-5):
  """EM fit of a 2-component diagonal GMM to the valid entries of x, initialised as Semi-DETR.

  Args:
    x: [N] float values (matching costs); invalid entries may hold anything finite.
    valid: [N] bool.
    max_iter, tol, reg_covar: sklearn GaussianMixture's (100, 1e-3; Semi-DETR sets 1e-5).

  Returns:
    GMM1D; initial weights (0.5, 0.5), means (min, max) of the valid x, variances (1, 1).
  """
  x = x.astype(jnp.float32)
  valid = valid.astype(bool)
  mask = valid.astype(jnp.float32)
  count = jnp.maximum(jnp.sum(mask), 1.0)
  lo = jnp.min(jnp.where(valid, x, jnp.inf))
  hi = jnp.max(jnp.where(valid, x, -jnp.inf))
  lo, hi = jnp.where(jnp.isfinite(lo), lo, 0.0), jnp.where(jnp.isfinite(hi), hi, 0.0)
  x = jnp.where(valid, x, 0.0)
  init = GMM1D(jnp.array([0.5, 0.5], jnp.float32), jnp.stack([lo, hi]),
               jnp.ones((2,), jnp.float32), jnp.array(0, jnp.int32))
  eps = 10.0 * jnp.finfo(jnp.float32).eps

  def em_step(gmm):
    log_p = weighted_log_prob(x, gmm)  # E-step, [N, 2]
    log_norm = jax.scipy.special.logsumexp(log_p, axis=-1)
    resp = jnp.exp(log_p - log_norm[:, None]) * mask[:, None]
    mean_log_lik = jnp.sum(log_norm * mask) / count
    nk = jnp.sum(resp, axis=0) + eps  # M-step
    means = resp.T @ x / nk
    variances = jnp.sum(resp * (x[:, None] - means)**2, axis=0) / nk + reg_covar
    return GMM1D(nk / jnp.sum(nk), means, variances, gmm.num_iter + 1), mean_log_lik

  def cond(state):
    gmm, lower, prev = state
    return (gmm.num_iter < max_iter) & ((gmm.num_iter == 0) | (jnp.abs(lower - prev) >= tol))

  def body(state):
    gmm, lower, _ = state
    new, new_lower = em_step(gmm)
    return new, new_lower, lower

  gmm, _, _ = jax.lax.while_loop(cond, body, (init, jnp.float32(-jnp.inf), jnp.float32(-jnp.inf)))
  return gmm


def gmm_cost_threshold(costs, valid, *, max_iter=100, tol=1e-3, reg_covar=1e-5):
  """Semi-DETR's mining threshold (`_fit_gmm`) over the valid costs of any shape.

  Args:
    costs: [...] float matched costs (flattened internally).
    valid: [...] bool.
    max_iter, tol, reg_covar: see `fit_gmm_1d`.

  Returns:
    ([] float32 threshold, GMM1D fit).
  """
  x = costs.reshape(-1).astype(jnp.float32)
  valid = valid.reshape(-1).astype(bool)
  gmm = fit_gmm_1d(x, valid, max_iter=max_iter, tol=tol, reg_covar=reg_covar)
  log_p = weighted_log_prob(x, gmm)
  score = jax.scipy.special.logsumexp(log_p, axis=-1)  # sklearn score_samples
  component = jnp.argmax(log_p, axis=-1)  # sklearn predict (ties -> component 0)
  group = jnp.where(jnp.any(valid & (component == 0)), 0, 1)
  chosen = valid & (component == group)
  best = jnp.max(jnp.where(chosen, score, -jnp.inf))
  threshold = jnp.min(jnp.where(chosen & (score == best), x, jnp.inf))
  num = jnp.sum(valid)
  single = jnp.sum(jnp.where(valid, x, 0.0))
  threshold = jnp.where(num == 0, 0.0, jnp.where(num == 1, single, threshold))
  return threshold, gmm


def mine_by_cost(costs, valid, **gmm_kwargs):
  """Mined pseudo-labels: valid and cost <= the GMM threshold.

  Args:
    costs: [B, G] float matched cost of each initial pseudo box (see `matched_costs`).
    valid: [B, G] bool, the pseudo boxes that were matched (and are in the initial set).
    **gmm_kwargs: max_iter, tol, reg_covar of `fit_gmm_1d`.

  Returns:
    (mined [B, G] bool, threshold [] float32), both without gradient.
  """
  costs = jax.lax.stop_gradient(costs)
  threshold, _ = gmm_cost_threshold(costs, valid, **gmm_kwargs)
  return valid & (costs <= threshold), threshold


def matched_costs(outputs, targets, valid, config=None):
  """Hungarian-match the last decoder layer to pseudo boxes; the cost of every matched pair.

  As Semi-DETR's unsup_loss (the `assigner2` costs: focal 2 / L1 5 / GIoU 2 by default, taken
  from the criterion config's `set_cost_*`, `focal_*`, `matcher_box_cost`).

  Args:
    outputs: the student's strong-view outputs (`pred_logits [B, Q, C]`, `pred_boxes [B, Q, 4]`).
    targets: pseudo targets (`boxes [B, G, 4]` normalised cxcywh, `labels [B, G]`).
    valid: [B, G] bool, the pseudo boxes to match (the initial set).
    config: `criterion.CriterionConfig` (None: DINO's defaults). The host matching follows the
      mesh entered with `jax.set_mesh` (`matching.hungarian_matching`).

  Returns:
    (cost [B, G] float32 of each matched column, matched [B, G] bool), without gradient.
  """
  cfg = config or criterion.CriterionConfig()
  logits = jax.lax.stop_gradient(outputs["pred_logits"])
  boxes = jax.lax.stop_gradient(outputs["pred_boxes"])
  cost = matching.matching_cost(
      logits, boxes, targets["labels"], targets["boxes"], valid,
      class_weight=cfg.set_cost_class, bbox_weight=cfg.set_cost_bbox,
      giou_weight=cfg.set_cost_giou, focal_alpha=cfg.focal_alpha, focal_gamma=cfg.focal_gamma,
      box_cost=cfg.matcher_box_cost, sized_l1_rescale=cfg.sized_l1_rescale)  # [B, Q, G]
  matches = matching.hungarian_matching(cost, valid)
  picked = jnp.take_along_axis(cost, jnp.maximum(matches, 0)[:, None, :], axis=1)[:, 0, :]
  matched = valid & (matches >= 0)
  return jnp.where(matched, picked, 0.0), matched
