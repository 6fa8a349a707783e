"""One-to-many label assignment of Co-DINO's auxiliary heads, static shapes, on device.

* `atss_assign`: mmdet's `ATSSAssigner` (topk 9), used by Co-DETR's CoATSSHead.
* `max_iou_assign`: mmdet's `MaxIoUAssigner` (RPN: 0.7 / 0.3 / min_pos 0.3 with low-quality
  matches; RoI head: 0.5 / 0.5 / 0.5 without).
* `random_sample`: mmdet's `RandomSampler` (RPN 256 @ 0.5, RoI 512 @ 0.25) into a fixed number
  of slots.

Every function takes padded arrays with boolean masks (anchors outside the image, padded ground
truth) and returns padded results, so it runs under `jit` with one compile. Results are integer
assignments: no gradient flows through them (callers pass `stop_gradient` boxes anyway).
Boxes are xyxy in any consistent units (pixels in the heads).
"""
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp

from sized_detr_jax import box_ops

NEGATIVE = -1  # assigned to the background
IGNORE = -2  # takes part in no loss (between the IoU thresholds, or an unusable anchor)

# mmdet ATSSAssigner: a positive's centre must be inside its ground truth by more than EPS.
_ATSS_INSIDE_EPS = 0.01


def _pairwise_iou(anchors_xyxy, gt_xyxy):
  """[B, A, 4] or [A, 4] anchors x [B, G, 4] ground truth -> [B, A, G] IoU."""
  if anchors_xyxy.ndim == 2:
    anchors_xyxy = jnp.broadcast_to(anchors_xyxy, (gt_xyxy.shape[0],) + anchors_xyxy.shape)
  iou, _ = box_ops.box_iou(anchors_xyxy.astype(jnp.float32), gt_xyxy.astype(jnp.float32))
  return iou


def atss_assign(anchors_xyxy, anchor_valid, level_sizes: Sequence[int], gt_xyxy, gt_valid, *,
                topk=9):
  """Adaptive Training Sample Selection (Zhang et al. 2020), as mmdet's ATSSAssigner.

  For every ground truth: on each level the `topk` usable anchors whose centres are closest to
  its centre are candidates (fewer if the level has fewer usable anchors); the IoU threshold is
  the mean plus the standard deviation (unbiased, torch.std) of the candidates' IoUs; a
  candidate is positive when its IoU reaches the threshold and its centre lies inside the
  ground truth (by more than 0.01). An anchor positive for several ground truths goes to the
  one of highest IoU (the first on ties). A ground truth with a single candidate gets no
  positive (torch.std of one value is NaN, and NaN comparisons are False).

  Args:
    anchors_xyxy: [A, 4] (shared) or [B, A, 4] anchors, levels concatenated in order.
    anchor_valid: [B, A] bool, usable anchors (inside the image).
    level_sizes: static per-level anchor counts (sum = A).
    gt_xyxy: [B, G, 4] ground truth.
    gt_valid: [B, G] bool.
    topk: candidates per level and ground truth (9).

  Returns:
    (gt_index [B, A] int32: assigned ground-truth column, NEGATIVE for usable background
    anchors, IGNORE for unusable ones; iou [B, A, G] float32 anchor x ground-truth IoU).
  """
  b, g = gt_valid.shape
  iou = _pairwise_iou(anchors_xyxy, gt_xyxy)  # [B, A, G]
  anchors = jnp.broadcast_to(anchors_xyxy, (b,) + anchors_xyxy.shape[-2:]).astype(jnp.float32)
  a = anchors.shape[1]
  if sum(level_sizes) != a:
    raise ValueError(f"atss_assign: level sizes {tuple(level_sizes)} do not sum to {a} anchors")
  centre = (anchors[..., :2] + anchors[..., 2:]) / 2  # [B, A, 2]
  gt_centre = (gt_xyxy[..., :2] + gt_xyxy[..., 2:]) / 2  # [B, G, 2]
  dist = jnp.sqrt(jnp.sum(jnp.square(centre[:, None, :, :] - gt_centre[:, :, None, :]),
                          axis=-1))  # [B, G, A]
  dist = jnp.where(anchor_valid[:, None, :], dist, jnp.inf)

  # Per level: the topk closest usable anchors of every ground truth.
  candidates, usable, start = [], [], 0
  for size in level_sizes:
    k = min(topk, size)
    neg_dist, idx = jax.lax.top_k(-dist[..., start:start + size], k)  # [B, G, k]
    candidates.append(idx + start)
    usable.append(jnp.isfinite(neg_dist))
    start += size
  candidates = jnp.concatenate(candidates, axis=-1)  # [B, G, K]
  usable = jnp.concatenate(usable, axis=-1) & gt_valid[..., None]
  iou_t = jnp.swapaxes(iou, 1, 2)  # [B, G, A]
  cand_iou = jnp.take_along_axis(iou_t, candidates, axis=-1)  # [B, G, K]
  count = jnp.sum(usable, axis=-1).astype(jnp.float32)  # [B, G]
  mean = jnp.sum(jnp.where(usable, cand_iou, 0.0), axis=-1) / jnp.maximum(count, 1.0)
  var = (jnp.sum(jnp.where(usable, jnp.square(cand_iou - mean[..., None]), 0.0), axis=-1)
         / jnp.maximum(count - 1.0, 1.0))
  threshold = jnp.where(count > 1, mean + jnp.sqrt(var), jnp.inf)

  cand_centre = jnp.take_along_axis(centre[:, None, :, :], candidates[..., None],
                                    axis=2)  # [B, G, K, 2]
  box = gt_xyxy[:, :, None, :]
  inside = jnp.min(jnp.stack([cand_centre[..., 0] - box[..., 0], cand_centre[..., 1] - box[..., 1],
                              box[..., 2] - cand_centre[..., 0], box[..., 3] - cand_centre[..., 1]],
                             axis=-1), axis=-1) > _ATSS_INSIDE_EPS
  positive = usable & (cand_iou >= threshold[..., None]) & inside  # [B, G, K]

  # Scatter back to [B, G, A]; then every anchor picks its max-IoU positive ground truth.
  bi = jnp.arange(b)[:, None, None]
  gi = jnp.arange(g)[None, :, None]
  pos_ga = jnp.zeros((b, g, a), bool).at[bi, gi, candidates].max(positive)
  masked = jnp.where(pos_ga, iou_t, -jnp.inf)
  best = jnp.argmax(masked, axis=1).astype(jnp.int32)  # [B, A], first on ties
  assigned = jnp.any(pos_ga, axis=1)
  gt_index = jnp.where(assigned, best, NEGATIVE)
  gt_index = jnp.where(anchor_valid, gt_index, IGNORE)
  return gt_index, iou


def max_iou_assign(anchors_xyxy, anchor_valid, gt_xyxy, gt_valid, *, pos_iou_thr, neg_iou_thr,
                   min_pos_iou, match_low_quality):
  """mmdet's MaxIoUAssigner (gt_max_assign_all=True), on usable anchors only.

  1. Every usable anchor whose max IoU over the ground truth is in [0, neg_iou_thr) is
     negative; with no valid ground truth every usable anchor is negative.
  2. Max IoU >= pos_iou_thr: positive, assigned to the argmax ground truth (first on ties).
  3. With match_low_quality, each ground truth whose best IoU (over usable anchors) is >=
     min_pos_iou also takes every anchor reaching that best IoU; mmdet loops over the ground
     truth in order, so a later one overwrites an earlier one.
  Anything else (between the thresholds, unusable anchors) is IGNORE.

  Args:
    anchors_xyxy: [A, 4] (shared) or [B, A, 4] anchors or proposals.
    anchor_valid: [B, A] bool usable anchors.
    gt_xyxy: [B, G, 4]; gt_valid: [B, G] bool.
    pos_iou_thr, neg_iou_thr, min_pos_iou: thresholds.
    match_low_quality: step 3.

  Returns:
    (gt_index [B, A] int32 (column, NEGATIVE or IGNORE), max_iou [B, A] float32).
  """
  iou = _pairwise_iou(anchors_xyxy, gt_xyxy)  # [B, A, G]
  iou = jnp.where(gt_valid[:, None, :], iou, -1.0)
  max_iou = jnp.max(iou, axis=-1)
  argmax = jnp.argmax(iou, axis=-1).astype(jnp.int32)
  has_gt = jnp.any(gt_valid, axis=-1, keepdims=True)  # [B, 1]
  gt_index = jnp.full(max_iou.shape, IGNORE, jnp.int32)
  negative = ~has_gt | ((max_iou >= 0) & (max_iou < neg_iou_thr))
  gt_index = jnp.where(negative, NEGATIVE, gt_index)
  gt_index = jnp.where(has_gt & (max_iou >= pos_iou_thr), argmax, gt_index)
  if match_low_quality:
    gt_max = jnp.max(jnp.where(anchor_valid[..., None], iou, -1.0), axis=1)  # [B, G]
    eligible = gt_valid & (gt_max >= min_pos_iou)
    reaches = (iou == gt_max[:, None, :]) & eligible[:, None, :]  # [B, A, G]
    last = jnp.max(jnp.where(reaches, jnp.arange(iou.shape[-1], dtype=jnp.int32), -1), axis=-1)
    gt_index = jnp.where(last >= 0, last, gt_index)
  gt_index = jnp.where(anchor_valid, gt_index, IGNORE)
  return gt_index, jnp.where(anchor_valid, max_iou, -1.0)


class Samples(NamedTuple):
  """Fixed-size sample slots, positives first.

  index: [B, num] int32 anchor/proposal index of each slot (0 on empty slots).
  positive: [B, num] bool, slot holds a sampled positive.
  valid: [B, num] bool, slot holds a sample (positive or negative).
  """
  index: jax.Array
  positive: jax.Array
  valid: jax.Array


def random_sample(key, gt_index, *, num, pos_fraction):
  """mmdet's RandomSampler (neg_pos_ub=-1) into `num` static slots.

  `int(num * pos_fraction)` positives at most are drawn uniformly without replacement, then
  the remaining `num - sampled positives` slots from the negatives (also uniformly). A uniform
  draw without replacement of k of n is the k smallest of n i.i.d. uniforms, so `top_k` gives
  it with static shapes.

  Args:
    key: PRNG key.
    gt_index: [B, A] int32 from an assigner (>= 0 positive, NEGATIVE, IGNORE).
    num: slots per image (256 RPN, 512 RoI).
    pos_fraction: 0.5 RPN, 0.25 RoI.

  Returns:
    Samples with [B, num] arrays.
  """
  b, a = gt_index.shape
  num_pos = int(num * pos_fraction)
  k_pos, k_neg = jax.random.split(key)
  positive = gt_index >= 0
  negative = gt_index == NEGATIVE
  # Scores: a candidate's uniform in [0, 1), -inf for non-candidates; top_k takes the largest.
  score_pos = jnp.where(positive, jax.random.uniform(k_pos, (b, a)), -jnp.inf)
  score_neg = jnp.where(negative, jax.random.uniform(k_neg, (b, a)), -jnp.inf)
  top_pos, pos_idx = jax.lax.top_k(score_pos, min(num_pos, a))
  top_neg, neg_idx = jax.lax.top_k(score_neg, min(num, a))
  n_pos = jnp.sum(jnp.isfinite(top_pos), axis=-1, keepdims=True)  # [B, 1]
  n_neg = jnp.sum(jnp.isfinite(top_neg), axis=-1, keepdims=True)
  slot = jnp.arange(num)[None, :]
  neg_slot = jnp.clip(slot - n_pos, 0, neg_idx.shape[-1] - 1)
  pos_slot = jnp.clip(slot, 0, pos_idx.shape[-1] - 1)
  is_pos = slot < n_pos
  index = jnp.where(is_pos, jnp.take_along_axis(pos_idx, pos_slot, axis=1),
                    jnp.take_along_axis(neg_idx, neg_slot, axis=1))
  valid = is_pos | ((slot - n_pos) < n_neg)
  return Samples(jnp.where(valid, index, 0).astype(jnp.int32), is_pos, valid)
