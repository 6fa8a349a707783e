"""Tests for sized_detr_jax.matching: costs vs float64 numpy, Hungarian vs scipy / brute force,
sharded host calls, degenerate cases, and the task-aligned one-to-many assigner."""
import functools
import itertools
import os
import threading

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from scipy import optimize

from sized_detr_jax import losses
from sized_detr_jax import matching

_jit_match = jax.jit(matching.hungarian_matching)


# --- float64 numpy references --------------------------------------------------------------


def np_xyxy(b):
  return np.concatenate([b[..., :2] - b[..., 2:] / 2, b[..., :2] + b[..., 2:] / 2], -1)


def np_pairwise_iou_giou(a, b):
  """a [N, 4], b [M, 4] cxcywh -> (iou, giou) [N, M], float64 (DINO's + 1e-6 denominators)."""
  a, b = np_xyxy(a.astype(np.float64))[:, None], np_xyxy(b.astype(np.float64))[None]
  area = lambda x: (x[..., 2] - x[..., 0]) * (x[..., 3] - x[..., 1])
  wh = np.clip(np.minimum(a[..., 2:], b[..., 2:]) - np.maximum(a[..., :2], b[..., :2]), 0, None)
  inter = wh[..., 0] * wh[..., 1]
  union = area(a) + area(b) - inter
  iou = inter / (union + 1e-6)
  ewh = np.maximum(a[..., 2:], b[..., 2:]) - np.minimum(a[..., :2], b[..., :2])
  enclosing = ewh[..., 0] * ewh[..., 1]
  return iou, iou - (enclosing - union) / (enclosing + 1e-6)


def np_sigmoid(x):
  return 1.0 / (1.0 + np.exp(-x.astype(np.float64)))


def random_boxes(rng, shape, lo=0.05, hi=0.4):
  centre = rng.uniform(0.3, 0.7, shape + (2,))
  size = rng.uniform(lo, hi, shape + (2,))
  return np.concatenate([centre, size], -1).astype(np.float32)


def assert_optimal(cost, valid, matches):
  """matches [G] is a valid assignment on the valid columns with scipy's optimal total cost."""
  cols = np.flatnonzero(valid)
  assert np.all(matches[~valid] == -1)
  got = matches[cols]
  picked = got[got >= 0]
  assert len(set(picked.tolist())) == len(picked), "a query matched twice"
  assert len(picked) == min(len(cols), cost.shape[0])
  rows, sel = optimize.linear_sum_assignment(cost[:, cols].astype(np.float64))
  best = cost[:, cols].astype(np.float64)[rows, sel].sum()
  total = sum(float(cost[q, c]) for q, c in zip(got, cols) if q >= 0)
  np.testing.assert_allclose(total, best, rtol=1e-9, atol=1e-9)


# --- matching cost --------------------------------------------------------------------------


@pytest.mark.parametrize("box_cost", ["l1", "sized_l1"])
def test_matching_cost_matches_numpy(box_cost):
  rng = np.random.default_rng(0)
  q, g, c = 6, 4, 5
  logits = rng.normal(size=(2, q, c)).astype(np.float32) * 3
  boxes = random_boxes(rng, (2, q))
  gt_boxes = random_boxes(rng, (2, g))
  labels = rng.integers(0, c, (2, g)).astype(np.int32)
  valid = np.array([[True, False, True, True], [False, True, True, False]])
  got = np.asarray(matching.matching_cost(logits, boxes, labels, gt_boxes, valid,
                                          box_cost=box_cost))
  for b in range(2):
    p = np_sigmoid(logits[b])[:, labels[b]]  # [Q, G]
    pos = 0.25 * (1 - p)**2 * -np.log(p + 1e-8)
    neg = 0.75 * p**2 * -np.log(1 - p + 1e-8)
    diff = np.abs(boxes[b][:, None].astype(np.float64) - gt_boxes[b][None])
    if box_cost == "l1":
      box = diff.sum(-1)
    else:
      wh = gt_boxes[b][None].astype(np.float64)
      box = (diff[..., 0] + diff[..., 2]) / wh[..., 2] + (diff[..., 1] + diff[..., 3]) / wh[..., 3]
    _, giou = np_pairwise_iou_giou(boxes[b], gt_boxes[b])
    want = 2 * (pos - neg) + 5 * box - 2 * giou
    want[:, ~valid[b]] = 0.0
    np.testing.assert_allclose(got[b], want, rtol=2e-5, atol=2e-5)


@pytest.mark.slow
def test_matching_cost_broadcasts_layers_and_rejects_unknown_box_cost():
  rng = np.random.default_rng(1)
  logits = rng.normal(size=(3, 2, 5, 4)).astype(np.float32)
  boxes = random_boxes(rng, (3, 2, 5))
  gt = random_boxes(rng, (2, 3))
  labels = np.array([[0, 1, 3], [2, 2, 0]], np.int32)
  valid = np.ones((2, 3), bool)
  stacked = matching.matching_cost(logits, boxes, labels, gt, valid)
  assert stacked.shape == (3, 2, 5, 3)
  one = matching.matching_cost(logits[1], boxes[1], labels, gt, valid)
  np.testing.assert_allclose(stacked[1], one, rtol=1e-6)
  with pytest.raises(ValueError, match="box_cost"):
    matching.matching_cost(logits, boxes, labels, gt, valid, box_cost="l2")


# --- Hungarian -----------------------------------------------------------------------------


def test_hungarian_optimal_with_padded_shuffled_columns_under_jit():
  rng = np.random.default_rng(2)
  b, q, g = 6, 7, 6
  cost = rng.normal(size=(b, q, g)).astype(np.float32)
  valid = rng.random((b, g)) < 0.6
  valid[0] = False  # no ground truth in this image
  valid[1] = True
  matches = np.asarray(_jit_match(cost, valid))
  assert matches.dtype == np.int32 and matches.shape == (b, g)
  assert np.all(matches[0] == -1)
  for i in range(b):
    assert_optimal(cost[i], valid[i], matches[i])


def test_hungarian_ties_reach_brute_force_optimum():
  rng = np.random.default_rng(3)
  cost = rng.integers(0, 3, size=(4, 5, 3)).astype(np.float32)  # many ties
  valid = np.array([[True] * 3, [True, False, True], [False, True, True], [True, True, False]])
  matches = np.asarray(_jit_match(cost, valid))
  for i in range(4):
    cols = np.flatnonzero(valid[i])
    brute = min(sum(cost[i, r, c] for r, c in zip(rows, cols))
                for rows in itertools.permutations(range(5), len(cols)))
    got = matches[i, cols]
    assert len(set(got.tolist())) == len(cols) and np.all(got >= 0)
    assert cost[i, got, cols].sum() == brute
    assert np.all(matches[i, ~valid[i]] == -1)


def test_hungarian_stacked_layers_equal_per_layer():
  rng = np.random.default_rng(4)
  cost = rng.normal(size=(3, 4, 6, 5)).astype(np.float32)
  valid = rng.random((4, 5)) < 0.7
  stacked = np.asarray(_jit_match(cost, valid))
  assert stacked.shape == (3, 4, 5)
  for layer in range(3):
    np.testing.assert_array_equal(stacked[layer], np.asarray(_jit_match(cost[layer], valid)))


def test_hungarian_degenerate_cases():
  rng = np.random.default_rng(5)
  # More valid ground truth than queries: 3 queries, 5 valid columns.
  cost = rng.normal(size=(1, 3, 5)).astype(np.float32)
  valid = np.ones((1, 5), bool)
  matches = np.asarray(matching.hungarian_matching(cost, valid))
  assert np.sum(matches >= 0) == 3
  assert_optimal(cost[0], valid[0], matches[0])
  # All-invalid batch.
  matches = np.asarray(_jit_match(rng.normal(size=(3, 4, 2)).astype(np.float32),
                                  np.zeros((3, 2), bool)))
  np.testing.assert_array_equal(matches, -1)
  # Non-finite costs: a valid assignment, NaN treated as the worst cost, -inf as the best.
  cost = np.array([[[np.nan, 1.0], [2.0, np.inf], [0.0, -np.inf]]], np.float32)
  matches = np.asarray(_jit_match(cost, np.ones((1, 2), bool)))
  np.testing.assert_array_equal(matches, [[1, 2]])


def test_host_threads_equal_scipy_per_image(monkeypatch):
  """The thread-pool solver returns, problem by problem, scipy's assignment on the valid columns
  (NaN as the worst cost), and really runs on the pool threads."""
  rng = np.random.default_rng(11)
  layers, batch, queries, num_gt = 3, 5, 40, 9
  cost = rng.normal(size=(layers, batch, queries, num_gt)).astype(np.float32)
  cost[1, 2, 5, 3] = np.nan
  valid = rng.random((batch, num_gt)) < 0.6  # padded columns anywhere
  valid[3] = False  # an image without ground truth
  valid[4] = True
  threads = []
  real_solve_one = matching._solve_one

  def recording(*args):
    threads.append(threading.current_thread().name)
    return real_solve_one(*args)

  monkeypatch.setattr(matching, "_solve_one", recording)
  monkeypatch.setattr(matching, "_PARALLEL_MIN_ENTRIES", 0)
  matching.set_host_workers(3)
  try:
    got = np.asarray(_jit_match(cost, valid))
  finally:
    matching.set_host_workers(None)
  assert len(threads) == layers * (batch - 1)
  assert all(name.startswith("hungarian") for name in threads), set(threads)
  want = np.full((layers, batch, num_gt), -1, np.int32)
  for layer, image in itertools.product(range(layers), range(batch)):
    cols = np.flatnonzero(valid[image])
    if cols.size:
      sub = np.nan_to_num(cost[layer, image][:, cols].astype(np.float64), nan=1e8)
      rows, picked = optimize.linear_sum_assignment(sub)
      want[layer, image, cols[picked]] = rows
  np.testing.assert_array_equal(got, want)


def test_host_workers_knob(monkeypatch):
  monkeypatch.setenv(matching.WORKERS_ENV, "3")
  assert matching.host_workers() == 3
  monkeypatch.setenv(matching.WORKERS_ENV, "two")
  with pytest.raises(ValueError, match="SIZED_DETR_MATCHING_WORKERS"):
    matching.host_workers()
  monkeypatch.delenv(matching.WORKERS_ENV)
  assert matching.host_workers() == (os.cpu_count() or 1)
  with pytest.raises(ValueError, match="host workers"):
    matching.set_host_workers(0)


def test_hungarian_has_no_gradient_path_but_cost_grad_is_finite():
  rng = np.random.default_rng(6)
  cost = jnp.asarray(rng.normal(size=(2, 4, 3)).astype(np.float32))
  valid = jnp.ones((2, 3), bool)

  def total(c):
    m = matching.hungarian_matching(c, valid)
    return jnp.sum(matching.matched_cost_total(c, m))

  grad = jax.jit(jax.grad(total))(cost)
  m = np.asarray(matching.hungarian_matching(cost, valid))
  want = np.zeros(cost.shape, np.float32)
  for i in range(2):
    want[i, m[i], np.arange(3)] = 1.0  # d(sum of picked entries)/d(cost)
  np.testing.assert_array_equal(np.asarray(grad), want)


def test_sharded_matching_one_host_call_per_shard(count_host_calls):
  assert jax.device_count() == 4, "tests/conftest.py forces 4 CPU devices"
  mesh = jax.make_mesh((4,), ("data",))
  rng = np.random.default_rng(7)
  layers, b, q, g = 3, 8, 6, 5
  cost = rng.normal(size=(layers, b, q, g)).astype(np.float32)
  valid = rng.random((b, g)) < 0.7
  cost_s = jax.device_put(cost, NamedSharding(mesh, P(None, "data")))
  valid_s = jax.device_put(valid, NamedSharding(mesh, P("data")))
  step = jax.jit(lambda c, v: matching.hungarian_matching(c, v, mesh=mesh))
  sharded = step(cost_s, valid_s)
  sharded.block_until_ready()
  assert sorted(count_host_calls) == [(layers, b // 4, q, g)] * 4
  count_host_calls.clear()
  unsharded = np.asarray(_jit_match(cost, valid))
  assert count_host_calls == [(layers, b, q, g)]
  np.testing.assert_array_equal(np.asarray(sharded), unsharded)
  with pytest.raises(ValueError, match="divisible"):
    matching.hungarian_matching(cost[:, :6], valid[:6], mesh=mesh)


# --- one-to-many -----------------------------------------------------------------------------


def np_task_aligned(logits, boxes, labels, gt_boxes, valid, k, alpha=1.0, beta=6.0):
  """Loop-based float64 re-derivation of Semi-DETR's assigner for one image.

  Returns (query_gt [Q], query_target [Q]).
  """
  q, g = logits.shape[0], len(labels)
  iou, _ = np_pairwise_iou_giou(boxes, gt_boxes)
  t = np_sigmoid(logits)[:, labels]**alpha * iou**beta
  claimed = {}  # query -> list of candidate gts
  for j in range(g):
    if not valid[j]:
      continue
    order = sorted(range(q), key=lambda i: -t[i, j])[:k]
    for i in order:
      if t[i, j] > 0:
        claimed.setdefault(i, []).append(j)
  query_gt = -np.ones(q, int)
  for i, gts in claimed.items():
    query_gt[i] = max(gts, key=lambda j: (iou[i, j], -j))
  target = np.zeros(q)
  for j in range(g):
    mine = np.flatnonzero(query_gt == j)
    if len(mine):
      target[mine] = t[mine, j] / (t[mine, j].max() + 1e-7) * iou[mine, j].max()
  return query_gt, target


def test_task_aligned_hand_built_case():
  # GT 0 on the left, GT 1 overlapping it on the right, GT 2 padded.
  gt = np.array([[0.30, 0.5, 0.2, 0.2], [0.40, 0.5, 0.2, 0.2], [0.5, 0.5, 0.9, 0.9]], np.float32)
  boxes = np.array([
      [0.30, 0.5, 0.2, 0.2],  # q0: exactly GT 0
      [0.38, 0.5, 0.2, 0.2],  # q1: near GT 1, overlaps GT 0 less -> conflict goes to GT 1
      [0.90, 0.9, 0.05, 0.05],  # q2: far from both: IoU 0, never positive
      [0.31, 0.5, 0.2, 0.2],  # q3: near GT 0
      [0.41, 0.5, 0.2, 0.2],  # q4: near GT 1
  ], np.float32)
  logits = np.full((5, 3), 2.0, np.float32)
  labels = np.array([0, 1, 2], np.int32)
  valid = np.array([True, True, False])
  out = matching.task_aligned_assign(logits, boxes, labels, gt, valid, topk=3)
  query_gt = np.asarray(out.query_gt)
  np.testing.assert_array_equal(query_gt, [0, 1, -1, 0, 1])
  indices = np.asarray(out.indices)
  # GT 0's top-3 by alignment is q0, q3, q1; q1 moved to GT 1 (higher IoU) -> padded with -1.
  np.testing.assert_array_equal(indices, [[0, 3, -1], [4, 1, -1], [-1, -1, -1]])
  soft = np.asarray(out.soft_targets)
  # max t, IoU = 0.04 / (0.04 + 1e-6) (identical boxes, DINO's eps) -> that IoU.
  assert soft[0, 0] == pytest.approx(0.04 / (0.04 + 1e-6), abs=1e-5)
  assert np.all(soft[indices < 0] == 0)
  _, want = np_task_aligned(logits, boxes, labels, gt, valid, 3)
  np.testing.assert_allclose(np.asarray(out.query_targets), want, rtol=1e-4, atol=1e-6)


def test_task_aligned_random_matches_reference_and_jits():
  rng = np.random.default_rng(8)
  b, q, g, c, k = 3, 20, 4, 3, 5
  logits = rng.normal(size=(b, q, c)).astype(np.float32)
  gt = random_boxes(rng, (b, g), 0.2, 0.5)
  boxes = np.clip(np.repeat(gt, 5, axis=1) + rng.normal(0, 0.05, (b, q, 4)), 0.05, 0.95)
  boxes = boxes.astype(np.float32)
  labels = rng.integers(0, c, (b, g)).astype(np.int32)
  valid = np.array([[True, True, True, True], [True, False, True, False], [False] * 4])
  out = jax.jit(lambda *a: matching.task_aligned_assign(*a, topk=k))(
      logits, boxes, labels, gt, valid)
  assert out.indices.shape == (b, g, k) and out.indices.dtype == jnp.int32
  for i in range(b):
    want_gt, want_t = np_task_aligned(logits[i], boxes[i], labels[i], gt[i], valid[i], k)
    np.testing.assert_array_equal(np.asarray(out.query_gt[i]), want_gt)
    np.testing.assert_allclose(np.asarray(out.query_targets[i]), want_t, rtol=1e-4, atol=1e-6)
    for j in range(g):  # [G, k] view agrees with the per-query view, -1 only at the end
      idx = np.asarray(out.indices[i, j])
      kept = idx[idx >= 0]
      assert np.all(idx[len(kept):] == -1)
      assert sorted(kept.tolist()) == np.flatnonzero(want_gt == j).tolist()
      np.testing.assert_allclose(np.asarray(out.soft_targets[i, j, :len(kept)]), want_t[kept],
                                 rtol=1e-4, atol=1e-6)
  assert np.all(np.asarray(out.query_gt[2]) == -1)  # all-padded image: all background


def test_task_aligned_focal_loss_matches_numpy():
  rng = np.random.default_rng(9)
  query_gt = np.array([[1, -1, 0, 1]], np.int32)
  query_t = np.array([[0.5, 0.0, 0.9, 0.2]], np.float32)
  labels = np.array([[2, 0]], np.int32)
  targets = np.asarray(matching.task_aligned_class_targets(query_gt, query_t, labels, 3))
  want_targets = np.zeros((1, 4, 3))
  want_targets[0, 0, 0] = 0.5
  want_targets[0, 2, 2] = 0.9
  want_targets[0, 3, 0] = 0.2
  np.testing.assert_allclose(targets, want_targets, rtol=1e-7)
  logits = rng.normal(size=(1, 4, 3)).astype(np.float32) * 3
  p = np_sigmoid(logits)
  y = want_targets
  want = -(y * np.log(p) + (1 - y) * np.log(1 - p)) * np.abs(y - p)**2
  got = np.asarray(losses.task_aligned_focal_loss(logits, targets))
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)
  grad = jax.grad(lambda x: jnp.sum(losses.task_aligned_focal_loss(x, targets)))(logits)
  assert np.all(np.isfinite(np.asarray(grad)))


_jit_match_pruned = jax.jit(functools.partial(matching.hungarian_matching, prune=True))


def _scipy_total(cost, cols):
  sub = np.nan_to_num(cost[:, cols].astype(np.float64), nan=1e8, posinf=1e8, neginf=-1e8)
  rows, picked = optimize.linear_sum_assignment(sub)
  return sub[rows, picked].sum()


@pytest.mark.parametrize("ties", [False, True])
def test_pruned_matching_keeps_the_optimum(count_host_calls, ties):
  """prune=True (each column's G cheapest queries go to the host) reaches scipy's optimal total
  on the full [Q, G] problem for every image, a valid one-to-one assignment, with padded
  columns anywhere, NaN/inf costs, an image without ground truth and one with all G valid; with
  integer costs (many ties) the totals still agree. The host gets [.., G, G] candidates."""
  rng = np.random.default_rng(5 + ties)
  layers, batch, queries, num_gt = 2, 6, 50, 9
  cost = rng.normal(size=(layers, batch, queries, num_gt)).astype(np.float32)
  if ties:
    cost = np.round(cost * 2).astype(np.float32)
  # A few queries cheap for every column: pruning must still find a full assignment.
  cost[:, :, :3] -= 5.0
  cost[0, 1, 7, 2], cost[1, 2, 4, 0], cost[1, 3, 9, 5] = np.nan, np.inf, -np.inf
  valid = rng.random((batch, num_gt)) < 0.6
  valid[3], valid[4] = False, True
  got = np.asarray(_jit_match_pruned(cost, valid))
  assert count_host_calls == []  # the full-cost solver was not used
  for layer, image in itertools.product(range(layers), range(batch)):
    cols = np.flatnonzero(valid[image])
    m = got[layer, image]
    assert np.all(m[~valid[image]] == -1)
    if not cols.size:
      continue
    assert np.all(m[cols] >= 0) and len(set(m[cols])) == cols.size
    finite = np.nan_to_num(cost[layer, image].astype(np.float64), nan=1e8, posinf=1e8,
                           neginf=-1e8)
    total = finite[m[cols], cols].sum()
    np.testing.assert_allclose(total, _scipy_total(cost[layer, image], cols), rtol=1e-12)


def test_pruned_matching_falls_back_when_not_smaller(count_host_calls):
  """With G >= Q / 2 the candidates would not be smaller: the full cost goes to the host and
  the result is the unpruned one."""
  rng = np.random.default_rng(2)
  cost = rng.normal(size=(3, 10, 6)).astype(np.float32)
  valid = np.ones((3, 6), bool)
  pruned = np.asarray(_jit_match_pruned(cost, valid))
  assert count_host_calls == [(3, 10, 6)]
  np.testing.assert_array_equal(pruned, _jit_match(cost, valid))
  assert matching.prunes(10, 4) and not matching.prunes(10, 5)
