"""Query-to-ground-truth assignment: Hungarian matching (one-to-one) and the task-aligned
one-to-many assigner.

One-to-one (DINO): the matching cost is computed on device (`matching_cost`), then solved on the
host with `scipy.optimize.linear_sum_assignment` through `jax.pure_callback`
(`hungarian_matching`). The callback is traced once per jitted step; stack the costs of every
decoder layer (and the encoder proposals) along leading dims so one step makes one host call per
device shard. With a `mesh`, the callback runs inside `jax.shard_map`, so each device solves its
own slice of the batch on its own host: under a plain `jit` with a sharded input the callback
would gather the whole batch to one device first. Within one call, the
independent per-image problems are solved by a pool of host threads (scipy releases the GIL;
`set_host_workers` / $SIZED_DETR_MATCHING_WORKERS, default all host cores). With `prune=True`
only each ground truth's G cheapest queries travel to the host ([..., G, G] costs and indices
instead of the [..., Q, G] cost), which provably keeps the optimum (`hungarian_matching`).

Caveat, JAX CPU runtime (jax 0.10.2): on a client with several CPU devices (the forced
`--xla_force_host_platform_device_count` used by tests), the sharded call can deadlock when a
shard's cost is large (seen from ~5 MB per shard; tiny test shapes are fine): `pure_callback`
copies its operands onto CPU device 0, and that copy waits behind device 0's own shard, which is
itself inside the callback. Accelerator meshes are unaffected (the host CPU device is not a mesh
device); one CPU device, or `mesh=None` (a single callback), has not hung in our runs.

One-to-many (Semi-DETR's first stage, docs/methods.md): `task_aligned_assign` is TOOD's
task-aligned assigner as Semi-DETR applies it to DETR queries, fully on device with static shapes,
and `losses.task_aligned_focal_loss` is the classification loss that goes with its soft targets.

Boxes are normalised `(cx, cy, w, h)` (cxcywh) throughout.

Degenerate cases (all tested in tests/test_matching.py):
  * An image with no valid ground truth: every match is -1; the host skips the solver.
  * More valid ground truth than queries (G_valid > Q): the solver picks the Q columns whose
    optimal assignment costs least; the remaining columns get -1 (no query, so no box loss; they
    still count in the criterion's box normaliser). DINO (900 queries) never meets this case.
  * A batch with no valid ground truth at all: all -1, no solver call per image (one host call
    per step still happens, it returns at once).
  * Non-finite cost entries (NaN from a diverged model, +-inf): replaced on the host by
    +-`NONFINITE_COST` (NaN counts as the worst cost) before solving, so matching always returns
    a valid assignment and never raises or hangs; the non-finite loss itself surfaces in the
    criterion, where the trainer's finiteness check reports it.
"""
import contextlib
import functools
import os
import threading
from concurrent import futures
from typing import NamedTuple

import chex
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from scipy import optimize

from sized_detr_jax import box_ops
from sized_detr_jax import losses
from sized_detr_jax import sharding

# Host-side replacement for NaN / +inf cost entries (NaN = the worst possible pairing) and, with
# a minus sign, for -inf. Real DINO costs are O(10).
NONFINITE_COST = 1e8

# Added inside the logs of DINO's focal matching cost (models/dino/matcher.py
# HungarianMatcher.forward: `-(out_prob + 1e-8).log()`).
_FOCAL_COST_EPS = 1e-8

# Semi-DETR's per-ground-truth normalisation `t / (max t + 10e-8) * max IoU`
# (detr_od/models/dense_heads/dino_detr_ssod_head.py, _get_target_single).
_TAL_NORM_EPS = 1e-7


def focal_class_cost(pred_logits, gt_labels, *, alpha=0.25, gamma=2.0):
  """DINO's focal classification cost between every query and every ground truth.

  As DINO's models/dino/matcher.py HungarianMatcher.forward:
  `alpha (1-p)^gamma (-log(p + 1e-8)) - (1-alpha) p^gamma (-log(1-p + 1e-8))` with `p` the
  sigmoid probability of the ground truth's class.

  Args:
    pred_logits: [..., Q, C] class logits.
    gt_labels: [..., G] int class ids in [0, C); leading dims broadcast against pred_logits'.

  Returns:
    [..., Q, G] float cost (lower is better).
  """
  prob = jax.nn.sigmoid(pred_logits)
  neg = (1.0 - alpha) * prob**gamma * -jnp.log(1.0 - prob + _FOCAL_COST_EPS)
  pos = alpha * (1.0 - prob)**gamma * -jnp.log(prob + _FOCAL_COST_EPS)
  return _gather_classes(pos - neg, gt_labels)


def _gather_classes(per_class, gt_labels):
  """per_class [..., Q, C], gt_labels [..., G] -> [..., Q, G] with out[q, g] = per_class[q, label_g]."""
  lead = jnp.broadcast_shapes(per_class.shape[:-2], gt_labels.shape[:-1])
  num_queries, num_gt = per_class.shape[-2], gt_labels.shape[-1]
  per_class = jnp.broadcast_to(per_class, lead + per_class.shape[-2:])
  index = jnp.broadcast_to(gt_labels[..., None, :], lead + (num_queries, num_gt))
  return jnp.take_along_axis(per_class, index.astype(jnp.int32), axis=-1)


def matching_cost(pred_logits: jax.Array, pred_boxes: jax.Array, gt_labels: jax.Array,
                  gt_boxes: jax.Array, gt_valid: jax.Array, *, class_weight: float = 2.0,
                  bbox_weight: float = 5.0, giou_weight: float = 2.0, focal_alpha: float = 0.25,
                  focal_gamma: float = 2.0, box_cost: str = "l1", sized_l1_rescale: bool = False,
                  axis_name: losses.AxisName = None) -> jax.Array:
  """DINO's matching cost `class_weight * focal + bbox_weight * L1 + giou_weight * (-GIoU)`.

  As DINO's models/dino/matcher.py HungarianMatcher.forward (weights 2 / 5 / 2 in DINO-4scale).
  Padded ground-truth columns get cost 0; `hungarian_matching` never assigns them.

  Args:
    pred_logits: [..., Q, C] class logits.
    pred_boxes: [..., Q, 4] predicted boxes, normalised cxcywh.
    gt_labels: [..., G] int32 class ids; leading dims broadcast against the predictions' (e.g.
      predictions [L, B, Q, .] of L decoder layers against ground truth [B, G]).
    gt_boxes: [..., G, 4] ground-truth boxes, normalised cxcywh.
    gt_valid: [..., G] bool, False for padded ground truth.
    class_weight, bbox_weight, giou_weight: weights of the three terms.
    focal_alpha, focal_gamma: focal cost parameters.
    box_cost: a `losses.BOX_LOSSES` name: "l1" (DINO: sum of absolute coordinate differences)
      or "sized_l1" (the Sized L1 distance of `losses.sized_l1_loss`, each coordinate error
      divided by the ground truth's width or height; an option, the paper keeps the L1 cost).
    sized_l1_rescale: with box_cost "sized_l1", multiply by the mean ground-truth width/height
      (over every valid box in `gt_boxes`) to keep L1's scale.
    axis_name: only inside `jax.shard_map` with the rescaled Sized L1 cost: the mesh axis of the
      batch, so the mean box size is global.

  Returns:
    [..., Q, G] float32 cost, leading dims the broadcast of the inputs'.

  Raises:
    ValueError: unknown box_cost.
  """
  pred = pred_boxes[..., :, None, :]  # [..., Q, 1, 4]
  target = gt_boxes[..., None, :, :]  # [..., 1, G, 4]
  pair_valid = gt_valid[..., None, :]  # [..., 1, G]
  if box_cost not in losses.BOX_LOSSES:
    raise ValueError(f"matching_cost: box_cost must be one of {tuple(losses.BOX_LOSSES)}, "
                     f"got {box_cost!r}")
  cost_box = losses.box_loss(box_cost, pred, target, pair_valid, rescale=sized_l1_rescale,
                             axis_name=axis_name)
  cost_giou = -box_ops.generalized_box_iou(
      box_ops.box_cxcywh_to_xyxy(pred_boxes), box_ops.box_cxcywh_to_xyxy(gt_boxes))
  cost_class = focal_class_cost(pred_logits, gt_labels, alpha=focal_alpha, gamma=focal_gamma)
  cost = class_weight * cost_class + bbox_weight * cost_box + giou_weight * cost_giou
  return jnp.where(pair_valid, cost, 0.0)


# Host solver threads. scipy's linear_sum_assignment releases the GIL while it solves (its
# extension calls PyEval_SaveThread), so the per-image problems of one callback run in parallel
# in threads. SIZED_DETR_MATCHING_WORKERS overrides the default (all host cores);
# `set_host_workers` sets it from code (e.g. a config field).
WORKERS_ENV = "SIZED_DETR_MATCHING_WORKERS"
# Below this many cost entries (summed over the problems of one call; ~10 ms of solving) the
# solves run in the calling thread: splitting a few milliseconds saves little, and on a busy
# host the hand-off to a thread waiting for a core costs more (6 x 8 x 900 x 7 GT, 0.3 M
# entries: 2 ms alone, 2-13 ms on 2 threads on a 4x oversubscribed 2-core machine).
_PARALLEL_MIN_ENTRIES = 1_000_000
_host_workers = None  # None: read WORKERS_ENV, else os.cpu_count()
_pool = None
_pool_workers = 0
_pool_lock = threading.Lock()


def set_host_workers(workers=None):
  """Sets how many threads solve the problems of one host matching call (None: the default).

  Args:
    workers: int >= 1, or None for $SIZED_DETR_MATCHING_WORKERS, else `os.cpu_count()`.

  Raises:
    ValueError: workers is not a positive int.
  """
  global _host_workers
  if workers is not None and (not isinstance(workers, int) or workers < 1):
    raise ValueError(f"matching: host workers must be an int >= 1, got {workers!r}")
  _host_workers = workers


def host_workers():
  """Threads used per host matching call (see `set_host_workers`)."""
  if _host_workers is not None:
    return _host_workers
  env = os.environ.get(WORKERS_ENV, "").strip()
  if env:
    if not env.isdigit() or int(env) < 1:
      raise ValueError(f"matching: ${WORKERS_ENV} must be an int >= 1, got {env!r}")
    return int(env)
  return os.cpu_count() or 1


def _thread_pool(workers):
  """A process-wide pool of `workers` threads (rebuilt when the count changes)."""
  global _pool, _pool_workers
  with _pool_lock:
    if _pool is None or _pool_workers != workers:
      if _pool is not None:
        _pool.shutdown(wait=False)
      _pool = futures.ThreadPoolExecutor(workers, thread_name_prefix="hungarian")
      _pool_workers = workers
    return _pool


def _finite(cost):
  """Non-finite cost entries -> +-NONFINITE_COST (NaN = the worst pairing); numpy or jax."""
  xp = np if isinstance(cost, np.ndarray) else jnp
  return xp.nan_to_num(cost, nan=NONFINITE_COST, posinf=NONFINITE_COST, neginf=-NONFINITE_COST)


def _solve_one(cost, cols):
  """One problem: cost [Q, G] on its valid columns `cols` -> (query rows, picked column positions)."""
  return optimize.linear_sum_assignment(_finite(cost[:, cols].astype(np.float64)))


def _solve_one_candidates(values, indices, cols):
  """One pruned problem: each valid column's len(cols) cheapest queries.

  values, indices: [G, k] costs and query indices of every column's k cheapest queries
  (ascending cost, k >= len(cols)). The problem is rebuilt over the union of the candidate
  queries of the valid columns, pairs outside a column's candidates forbidden (inf); see
  `hungarian_matching(prune=True)` for why its optimum is the full problem's.
  """
  n = cols.size
  rows, inverse = np.unique(indices[cols, :n], return_inverse=True)
  sub = np.full((rows.size, n), np.inf)
  sub[inverse.reshape(n, n), np.arange(n)[:, None]] = values[cols, :n]
  picked_rows, picked = optimize.linear_sum_assignment(sub)
  return rows[picked_rows], picked


def _solve_problems(flat_valid, solve_one, num_rows):
  """Runs `solve_one(i, cols)` -> (query rows, column positions) for every problem i of
  `flat_valid` [P, G] with a valid column; in the thread pool when there is enough work.

  Returns [P, G] int32 query index per column, -1 for unmatched/padded columns.
  """
  out = np.full(flat_valid.shape, -1, np.int32)
  problems = [] if num_rows == 0 else [
      (i, cols) for i, cols in enumerate(np.flatnonzero(v) for v in flat_valid) if cols.size]
  workers = min(host_workers(), len(problems))
  entries = num_rows * sum(cols.size for _, cols in problems)
  if workers > 1 and entries >= _PARALLEL_MIN_ENTRIES:
    solve_chunk = lambda chunk: [solve_one(i, cols) for i, cols in chunk]
    chunks = _balanced_chunks(problems, workers)
    solved = _thread_pool(workers).map(solve_chunk, chunks)
    problems = [p for chunk in chunks for p in chunk]
    solved = [result for chunk in solved for result in chunk]
  else:
    solved = (solve_one(i, cols) for i, cols in problems)
  for (i, cols), (rows, picked) in zip(problems, solved):
    out[i, cols[picked]] = rows
  return out


def _flat_valid(gt_valid, lead, num_gt):
  return np.broadcast_to(np.asarray(gt_valid, bool), lead + (num_gt,)).reshape((-1, num_gt))


def _solve_on_host(cost, gt_valid):
  """Host solver: numpy cost [..., Q, G], gt_valid [..., G] -> [..., G] int32 query indices.

  Each problem is solved on its valid columns only, so padded columns, wherever they are, never
  take a query. The problems are independent: with `host_workers() > 1` and enough work they
  are solved in a thread pool; the result is the same as solving them one by one.
  """
  cost = np.asarray(cost)
  num_queries, num_gt = cost.shape[-2:]
  lead = cost.shape[:-2]
  flat_cost = cost.reshape((-1, num_queries, num_gt))
  out = _solve_problems(_flat_valid(gt_valid, lead, num_gt),
                        lambda i, cols: _solve_one(flat_cost[i], cols), num_queries)
  return out.reshape(lead + (num_gt,))


def _solve_candidates_on_host(values, indices, gt_valid):
  """Host solver of the pruned problems: values f32 / indices i32 [..., G, k] (each column's k
  cheapest queries), gt_valid [..., G] -> [..., G] int32 query indices."""
  values, indices = np.asarray(values), np.asarray(indices)
  num_gt, k = values.shape[-2:]
  lead = values.shape[:-2]
  flat_values = values.reshape((-1, num_gt, k)).astype(np.float64)
  flat_indices = indices.reshape((-1, num_gt, k))
  out = _solve_problems(_flat_valid(gt_valid, lead, num_gt),
                        lambda i, cols: _solve_one_candidates(flat_values[i], flat_indices[i],
                                                              cols), k)
  return out.reshape(lead + (num_gt,))


def _balanced_chunks(problems, workers):
  """Splits (index, cols) problems into `workers` lists of about equal work (one thread
  hand-off per list, not per problem): largest first, each to the least loaded list."""
  chunks, loads = [[] for _ in range(workers)], [0] * workers
  for problem in sorted(problems, key=lambda p: -p[1].size):
    k = loads.index(min(loads))
    chunks[k].append(problem)
    loads[k] += problem[1].size
  return [c for c in chunks if c]


def candidate_queries(cost, k):
  """Each ground truth's k cheapest queries: cost [..., Q, G] -> (values [..., G, k] float32
  ascending, indices [..., G, k] int32). Non-finite costs are replaced as the host solver does."""
  neg, indices = jax.lax.top_k(-jnp.swapaxes(_finite(cost.astype(jnp.float32)), -1, -2), k)
  return -neg, indices.astype(jnp.int32)


def prunes(num_queries, num_gt):
  """Whether `hungarian_matching(prune=True)` sends candidates for a [Q, G] problem: when the
  [G, G] candidate costs and indices are smaller than the [Q, G] cost (G < Q / 2)."""
  return 2 * num_gt < num_queries


def host_problem(cost: jax.Array, prune: bool = False) -> tuple[jax.Array, ...]:
  """What the host needs of a [..., Q, G] cost (on device): `(cost,)`, or with `prune` (when
  `prunes`) each column's G cheapest queries `(values [..., G, G], indices [..., G, G])`."""
  if prune and prunes(*cost.shape[-2:]):
    return candidate_queries(cost, cost.shape[-1])
  return (cost,)


def solve_host_problem(problem, gt_valid) -> np.ndarray:
  """Host solve of a `host_problem` (numpy arrays) and gt_valid [..., G] -> [..., G] int32
  query index per column (-1 unmatched), as `hungarian_matching` returns."""
  # Look the solvers up at call time (not trace time) so tests can wrap them to count host calls.
  if len(problem) == 2:
    return _solve_candidates_on_host(*problem, gt_valid)
  return _solve_on_host(problem[0], gt_valid)


def _host_matching(cost, gt_valid, prune=False):
  """One pure_callback for all leading dims of `cost` (pruned to candidates with `prune`)."""
  out_shape = jax.ShapeDtypeStruct(gt_valid.shape, jnp.int32)
  problem = host_problem(cost, prune)
  return jax.pure_callback(lambda *a: solve_host_problem(a[:-1], a[-1]), out_shape, *problem,
                           gt_valid, vmap_method="broadcast_all")


# The handler `deferred_matching` installs (None: the host callback).
_deferred_handler = None


@contextlib.contextmanager
def deferred_matching(handler):
  """While tracing inside it, `hungarian_matching` returns `handler(cost, gt_valid, prune)`
  (stop-gradient cost [..., Q, G], gt_valid broadcast to [..., G]) instead of calling back to
  the host: the split train step (`split_step.py`) solves the problems between two jitted
  functions."""
  global _deferred_handler
  previous, _deferred_handler = _deferred_handler, handler
  try:
    yield
  finally:
    _deferred_handler = previous


def _lay_out(x, mesh, spec):
  """Put `x` in the layout `spec` on `mesh`, for Explicit (jax.make_mesh's default) or Auto axes.

  `mesh` is a concrete `Mesh` or the abstract one of `jax.set_mesh` (then the bare spec).
  """
  layout = NamedSharding(mesh, spec) if isinstance(mesh, jax.sharding.Mesh) else spec
  if all(t == jax.sharding.AxisType.Explicit for t in mesh.axis_types):
    return jax.sharding.reshard(x, layout)
  return jax.lax.with_sharding_constraint(x, layout)


def hungarian_matching(cost: jax.Array, gt_valid: jax.Array, *,
                       mesh: jax.sharding.Mesh | None = None, data_axis: str = "data",
                       prune: bool = False) -> jax.Array:
  """Optimal one-to-one assignment of queries to ground truth, solved on the host.

  Usable inside `jax.jit`; no gradient flows through it (the cost is `stop_gradient`-ed).

  Args:
    cost: [..., Q, G] float matching cost (lower is better), e.g. [B, Q, G], or [L, B, Q, G]
      with the decoder layers stacked so one host call solves them all.
    gt_valid: [..., G] bool, broadcastable to `cost.shape[:-2] + (G,)` (e.g. [B, G] for an
      [L, B, Q, G] cost). False marks padded columns, which may be anywhere.
    mesh: optional `jax.sharding.Mesh`; default: the mesh entered with `jax.set_mesh` (as the
      trainer does), if it has `data_axis`. With a mesh, the batch axis (axis -3 of `cost`, -2
      of the broadcast `gt_valid`) is split over the mesh axis `data_axis` with
      `jax.shard_map`, so every device shard makes its own host call on its own images. The
      batch size must be divisible by that axis' size. With neither: one host call.
    data_axis: name of the mesh axis that shards the batch.
    prune: send the host only each ground-truth column's G cheapest queries (costs and
      indices, [..., G, G] twice instead of the [..., Q, G] cost; `candidate_queries` on
      device), when that is smaller (`prunes`: G < Q / 2). The host solves each image over the
      union of its valid columns' first G_valid candidates, other pairs forbidden. The optimum
      is kept: take an optimal assignment where column g holds a query r outside its G_valid
      cheapest; the other G_valid - 1 columns hold at most G_valid - 1 of those, so one, r', is
      free, and moving g to r' costs no more (cost[r', g] <= cost[r, g]). Repeating this moves
      every column into its candidates without raising the total, so the pruned problem has a
      full-problem optimum, and it is feasible (any s columns' candidates hold >= G_valid >= s
      queries). Totals are equal; with tied costs the assignment may differ.

  Returns:
    [..., G] int32: for every ground-truth column, the index of the query matched to it; -1 for
    padded columns, and for the surplus columns when an image has more valid ground truth than
    queries (see the module docstring for all degenerate cases).

  Raises:
    ValueError: `cost` has fewer than 3 dims with a mesh, or the batch does not divide the
      `data_axis` size.
  """
  chex.assert_axis_dimension(gt_valid, -1, cost.shape[-1])
  cost = jax.lax.stop_gradient(cost)
  gt_valid = jnp.broadcast_to(gt_valid, cost.shape[:-2] + cost.shape[-1:])
  if _deferred_handler is not None:
    return _deferred_handler(cost, gt_valid, prune)
  if mesh is None:
    mesh = sharding.context_mesh(data_axis)
  if mesh is None:
    return _host_matching(cost, gt_valid, prune)
  if cost.ndim < 3:
    raise ValueError(f"hungarian_matching: with a mesh, cost needs a batch axis [..., B, Q, G], "
                     f"got shape {cost.shape}")
  shards = mesh.shape[data_axis]
  if cost.shape[-3] % shards:
    raise ValueError(f"hungarian_matching: batch size {cost.shape[-3]} (axis -3 of cost) is not "
                     f"divisible by mesh axis {data_axis!r} of size {shards}")
  lead = (None,) * (cost.ndim - 3)
  cost_spec, valid_spec = P(*lead, data_axis, None, None), P(*lead, data_axis, None)
  # shard_map wants its inputs already laid out as in_specs; in a jitted step whose batch is
  # sharded on `data_axis` this is a no-op (no data moves).
  cost = _lay_out(cost, mesh, cost_spec)
  gt_valid = _lay_out(gt_valid, mesh, valid_spec)
  run = jax.shard_map(functools.partial(_host_matching, prune=prune), mesh=mesh, in_specs=(cost_spec, valid_spec),
                      out_specs=valid_spec, check_vma=False)
  return run(cost, gt_valid)


def matched_cost_total(cost, matches):
  """Total cost of an assignment: cost [..., Q, G], matches [..., G] (-1 skipped) -> [...]."""
  picked = jnp.take_along_axis(cost, jnp.maximum(matches, 0)[..., None, :], axis=-2)[..., 0, :]
  return jnp.sum(jnp.where(matches >= 0, picked, 0.0), axis=-1)


# ---------------------------------------------------------------------------------------------
# One-to-many: task-aligned assignment (Semi-DETR stage 1).


class TaskAlignedAssignment(NamedTuple):
  """Result of `task_aligned_assign` (a NamedTuple, hence a pytree)."""
  # [..., G, k] int32 queries assigned to each ground truth, highest alignment first, -1 padded
  # at the end (every slot of padded ground truth is -1).
  indices: jax.Array
  # [..., G, k] float32 normalised alignment `t / max t * max IoU` of those pairs (0 at -1).
  soft_targets: jax.Array
  # [..., Q] int32 ground-truth column each query is assigned to, -1 for background.
  query_gt: jax.Array
  # [..., Q] float32 soft target of each query (0 for background).
  query_targets: jax.Array


def task_aligned_assign(pred_logits, pred_boxes, gt_labels, gt_boxes, gt_valid, *, topk=13,
                        alpha=1.0, beta=6.0):
  """TOOD's task-aligned one-to-many assigner, as Semi-DETR applies it to DETR queries.

  Follows Semi-DETR's detr_od/core/bbox/assigners/o2m_assigner.py O2MAssigner.assign and the
  normalisation in dino_detr_ssod_head.py `_get_target_single`:
    1. alignment `t = s^alpha * IoU^beta` for every (query, ground truth), with `s` the sigmoid
       score of the ground truth's class and IoU of the boxes (both detached);
    2. every ground truth takes its top-k queries by `t`; those with `t > 0` are candidates;
    3. a query that is a candidate of several ground truths goes to the one with the highest IoU
       (the lowest column index on exact ties);
    4. per ground truth, over the queries it keeps: `t_norm = t / (max t + 1e-7) * max IoU`.
  Padded ground truth takes no query. With fewer than k queries, k is reduced to Q.

  Args:
    pred_logits: [..., Q, C] class logits.
    pred_boxes: [..., Q, 4] predicted boxes, normalised cxcywh.
    gt_labels: [..., G] int32 class ids (leading dims broadcast against the predictions').
    gt_boxes: [..., G, 4] normalised cxcywh.
    gt_valid: [..., G] bool, False for padded ground truth.
    topk: candidates per ground truth (13 in Semi-DETR).
    alpha, beta: exponents of the score and the IoU (1 and 6).

  Returns:
    A `TaskAlignedAssignment` (see its fields); indices/soft_targets are [..., G, min(k,
    Q)].
  """
  pred_logits = jax.lax.stop_gradient(pred_logits)
  pred_boxes = jax.lax.stop_gradient(pred_boxes)
  num_queries, num_gt = pred_logits.shape[-2], gt_labels.shape[-1]
  k = min(topk, num_queries)
  score = _gather_classes(jax.nn.sigmoid(pred_logits), gt_labels)  # [..., Q, G]
  iou, _ = box_ops.box_iou(box_ops.box_cxcywh_to_xyxy(pred_boxes),
                           box_ops.box_cxcywh_to_xyxy(gt_boxes))  # [..., Q, G]
  lead = score.shape[:-2]
  iou = jnp.broadcast_to(iou, score.shape)
  valid = jnp.broadcast_to(gt_valid, lead + (num_gt,))
  align = score**alpha * iou**beta  # [..., Q, G]

  top_t, top_q = jax.lax.top_k(jnp.swapaxes(align, -1, -2), k)  # [..., G, k]
  candidate_slot = (top_t > 0) & valid[..., None]
  # Scatter the candidate slots into a [..., G, Q] mask (top_k indices are distinct per row).
  rows = top_q.reshape((-1, k))
  candidate = jnp.zeros((rows.shape[0], num_queries), bool).at[
      jnp.arange(rows.shape[0])[:, None], rows].set(candidate_slot.reshape((-1, k)))
  candidate = jnp.swapaxes(candidate.reshape(lead + (num_gt, num_queries)), -1, -2)  # [..., Q, G]
  # Conflicts go to the highest-IoU ground truth (o2m_assigner.py: `overlaps_inf.max(dim=1)`).
  best_gt = jnp.argmax(jnp.where(candidate, iou, -jnp.inf), axis=-1)  # [..., Q]
  positive = candidate & (jnp.arange(num_gt) == best_gt[..., None])  # [..., Q, G]

  max_t = jnp.max(jnp.where(positive, align, 0.0), axis=-2, keepdims=True)  # [..., 1, G]
  max_iou = jnp.max(jnp.where(positive, iou, 0.0), axis=-2, keepdims=True)
  t_norm = jnp.where(positive, align / (max_t + _TAL_NORM_EPS) * max_iou, 0.0)  # [..., Q, G]

  has_gt = jnp.any(positive, axis=-1)
  query_gt = jnp.where(has_gt, best_gt, -1).astype(jnp.int32)
  query_targets = jnp.sum(t_norm, axis=-1)

  kept = jnp.take_along_axis(jnp.swapaxes(positive, -1, -2), top_q, axis=-1)  # [..., G, k]
  slot_t = jnp.take_along_axis(jnp.swapaxes(t_norm, -1, -2), top_q, axis=-1)
  # Move the dropped slots to the end; the stable sort keeps the alignment order of the rest.
  order = jnp.argsort(~kept, axis=-1, stable=True)
  kept = jnp.take_along_axis(kept, order, axis=-1)
  indices = jnp.where(kept, jnp.take_along_axis(top_q, order, axis=-1), -1).astype(jnp.int32)
  soft = jnp.where(kept, jnp.take_along_axis(slot_t, order, axis=-1), 0.0)
  return TaskAlignedAssignment(indices=indices, soft_targets=soft, query_gt=query_gt,
                               query_targets=query_targets)


def task_aligned_class_targets(query_gt, query_targets, gt_labels, num_classes):
  """Soft one-hot classification targets of a task-aligned assignment.

  Args:
    query_gt: [..., Q] int32 assigned ground-truth column, -1 for background.
    query_targets: [..., Q] float soft target (normalised alignment) per query.
    gt_labels: [..., G] int32 class ids.
    num_classes: C.

  Returns:
    [..., Q, C] float32: `query_targets` at the assigned ground truth's class, 0 elsewhere.
  """
  label = jnp.take_along_axis(jnp.broadcast_to(gt_labels, query_gt.shape[:-1] + gt_labels.shape[-1:]),
                              jnp.maximum(query_gt, 0), axis=-1)  # [..., Q]
  onehot = jax.nn.one_hot(jnp.where(query_gt >= 0, label, -1), num_classes)
  return onehot * query_targets[..., None]
