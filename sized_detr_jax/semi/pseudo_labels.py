"""Semi-DETR pseudo-labels: teacher detections on the weak view -> static-shape targets in the
student's strong view.

As Semi-DETR's detr_ssod/models/dino_detr_ssod.py (extract_teacher_info, unsup_loss,
compute_pseudo_label_loss) and detr_od/models/dense_heads/dino_detr_ssod_head.py
(_get_bboxes_single):

1. Detections from the teacher's last decoder layer on the weak view (`teacher_detections`):
   * "nms" (Semi-DETR: `for_pseudo_label=True` takes this path in both training stages):
     sigmoid scores over queries x classes, boxes to weak-view pixels clipped to the image,
     candidates with score > 0.01, class-wise NMS at IoU 0.6 (mmdet multiclass_nms: a box is
     suppressed when its IoU with a kept, higher-scored box of the same class is > 0.6), the
     best 300 kept;
   * "topk": DINO's NMS-free top-300 over queries x classes (`models.dino.postprocess`), the
     post-switch evaluation path, offered for the one-to-one stage.
2. The per-image adaptive "initial" (high-recall) set: score >= mean + std of that image's
   detection scores (torch.std, i.e. ddof 1) with positive width and height
   (`select_pseudo_labels`).
3. The final pseudo-labels: initial and score >= 0.4 (hard labels; scores are not weights).
4. Boxes mapped weak -> strong with `T_strong @ inv(T_weak)` (the enclosing box of the mapped
   corners, clipped to the strong view: `data.transforms.map_boxes_between_views`), padded to a
   static `max_pseudo` with `valid` masks (`pseudo_targets`).

Static-shape NMS (`class_wise_nms`): greedy NMS is the unique solution of
`keep[i] = candidate[i] and no kept j ranked before i suppresses i`; a Jacobi iteration of that
triangular system from `keep = candidate` fixes at least one more rank per sweep and stops at the
greedy answer, usually after a few O(K^2) sweeps (a `while_loop` until nothing changes, capped at
K). Only the best `num_candidates` (query, class) pairs enter NMS: greedy keep decisions depend
only on higher-scored boxes, so the returned detections equal full NMS over every pair whenever
at most `num_candidates` pairs pass the score threshold or at least `max_detections` of the
candidates survive; `exact [B]` reports this per image.

Everything is under `stop_gradient`: no gradient reaches the teacher.
"""
import jax
import jax.numpy as jnp

from sized_detr_jax import box_ops
from sized_detr_jax.data import transforms
from sized_detr_jax.models import dino

METHODS = ("nms", "topk")


def class_wise_nms(boxes_xyxy, scores, labels, candidate, *, iou_threshold=0.6):
  """Greedy per-class NMS with static shapes.

  Args:
    boxes_xyxy: [B, K, 4] float boxes (x0, y0, x1, y1), any consistent units.
    scores: [B, K] float; higher first (ties: lower index first).
    labels: [B, K] int class ids; only boxes of the same class suppress each other.
    candidate: [B, K] bool, False for boxes that take no part (neither kept nor suppressing).
    iou_threshold: a box is suppressed by a kept, higher-ranked box of its class when their IoU
      is > iou_threshold (mmcv nms).

  Returns:
    [B, K] bool keep mask, in the input order.
  """
  k = scores.shape[-1]
  # Rank order: candidates by descending score, the rest last (stable: ties keep index order).
  order = jnp.argsort(jnp.where(candidate, -scores, jnp.inf), axis=-1, stable=True)
  take = lambda x: jnp.take_along_axis(x, order.reshape(order.shape + (1,) * (x.ndim - 2)),
                                       axis=1)
  boxes, labels_s, cand = take(boxes_xyxy), take(labels), take(candidate)
  iou, _ = box_ops.box_iou(boxes, boxes)  # [B, K, K]
  earlier = jnp.arange(k)[:, None] < jnp.arange(k)[None, :]  # [j, i]: j ranked before i
  suppresses = (iou > iou_threshold) & (labels_s[:, :, None] == labels_s[:, None, :]) & earlier

  def sweep(keep):
    return cand & ~jnp.any(keep[:, :, None] & suppresses, axis=1)

  def body(state):
    keep, _, step = state
    new = sweep(keep)
    return new, jnp.any(new != keep), step + 1

  keep, _, _ = jax.lax.while_loop(lambda s: s[1] & (s[2] <= k), body,
                                  (cand, jnp.array(True), jnp.array(0)))
  inverse = jnp.argsort(order, axis=-1)
  return jnp.take_along_axis(keep, inverse, axis=1)


def _pixel_boxes(boxes_cxcywh, image_size):
  """Normalised cxcywh [B, N, 4] -> xyxy pixels clipped to the (h, w) image [B, 2]."""
  h = image_size[:, 0].astype(jnp.float32)[:, None]
  w = image_size[:, 1].astype(jnp.float32)[:, None]
  xyxy = box_ops.box_cxcywh_to_xyxy(boxes_cxcywh.astype(jnp.float32))
  limit = jnp.stack([w, h, w, h], axis=-1)
  return jnp.clip(xyxy * limit, 0.0, limit)


def teacher_detections(outputs, image_size, *, method="nms", score_threshold=0.01,
                       iou_threshold=0.6, max_detections=300, num_candidates=1000):
  """The teacher's detections on its (weak) view, sorted by descending score.

  Args:
    outputs: model outputs with `pred_logits [B, Q, C]` and `pred_boxes [B, Q, 4]` (normalised
      cxcywh relative to the unpadded view).
    image_size: [B, 2] int (h, w) of the unpadded view (`size` of the batch).
    method: "nms" (Semi-DETR's pseudo-labelling path) or "topk" (NMS-free top-k).
    score_threshold, iou_threshold: NMS candidates need score > score_threshold ("nms" only).
    max_detections: K detections per image (300).
    num_candidates: (query, class) pairs entering NMS (see the module docstring), >= K.

  Returns:
    dict: `scores [B, K]` f32 sigmoid probabilities (descending among valid), `labels [B, K]`
    int32, `boxes_xyxy [B, K, 4]` f32 view pixels clipped to the image, `valid [B, K]` bool,
    `exact [B]` bool (the detections equal unrestricted NMS; always True for "topk").

  Raises:
    ValueError: unknown method or num_candidates < max_detections.
  """
  if method not in METHODS:
    raise ValueError(f"pseudo_labels: method must be one of {METHODS}, got {method!r}")
  outputs = jax.lax.stop_gradient({"pred_logits": outputs["pred_logits"],
                                   "pred_boxes": outputs["pred_boxes"]})
  b, q, c = outputs["pred_logits"].shape
  if method == "topk":
    det = dino.postprocess(outputs, image_size, num_select=max_detections)
    k = det["scores"].shape[-1]
    w = image_size[:, 1].astype(jnp.float32)[:, None]
    h = image_size[:, 0].astype(jnp.float32)[:, None]
    limit = jnp.stack([w, h, w, h], axis=-1)
    return {"scores": det["scores"], "labels": det["labels"],
            "boxes_xyxy": jnp.clip(det["boxes_xyxy"], 0.0, limit),
            "valid": jnp.ones((b, k), bool), "exact": jnp.ones((b,), bool)}
  if num_candidates < max_detections:
    raise ValueError(f"pseudo_labels: num_candidates ({num_candidates}) must be >= "
                     f"max_detections ({max_detections})")
  probs = jax.nn.sigmoid(outputs["pred_logits"].astype(jnp.float32)).reshape(b, q * c)
  n = min(num_candidates, q * c)
  scores, index = jax.lax.top_k(probs, n)  # [B, n] descending
  labels = (index % c).astype(jnp.int32)
  boxes = jnp.take_along_axis(_pixel_boxes(outputs["pred_boxes"], image_size),
                              (index // c)[..., None], axis=1)
  candidate = scores > score_threshold
  keep = class_wise_nms(boxes, scores, labels, candidate, iou_threshold=iou_threshold)
  k = min(max_detections, n)
  # Candidates are already sorted, so the first k kept ones are the best k after NMS.
  rank = jnp.cumsum(keep, axis=-1) - 1
  slot = jnp.where(keep & (rank < k), rank, k)  # k = a dump slot, dropped below
  scatter = lambda x, fill: jnp.full((b, k + 1) + x.shape[2:], fill, x.dtype).at[
      jnp.arange(b)[:, None], slot].set(x)[:, :k]
  num_above = jnp.sum(probs > score_threshold, axis=-1)
  exact = (num_above <= n) | (jnp.sum(keep, axis=-1) >= k)
  return {"scores": scatter(scores, 0.0), "labels": scatter(labels, 0),
          "boxes_xyxy": scatter(boxes, 0.0), "valid": scatter(keep, False), "exact": exact}


def select_pseudo_labels(detections, *, final_threshold=0.4):
  """Semi-DETR's two pseudo-label sets from one image's detections.

  Args:
    detections: `teacher_detections`' dict (`scores [B, K]`, `boxes_xyxy [B, K, 4]`,
      `valid [B, K]`).
    final_threshold: score threshold of the final set (0.4).

  Returns:
    (initial [B, K] bool: score >= mean + std (ddof 1) of the image's valid detection scores,
    with positive width and height; an image with fewer than 2 detections has none, as torch.std
    of one value is NaN in the reference; final [B, K] bool: initial and score >=
    final_threshold).
  """
  scores, valid = detections["scores"], detections["valid"]
  count = jnp.sum(valid, axis=-1, keepdims=True).astype(jnp.float32)
  mean = jnp.sum(jnp.where(valid, scores, 0.0), -1, keepdims=True) / jnp.maximum(count, 1.0)
  var = jnp.sum(jnp.where(valid, (scores - mean)**2, 0.0), -1, keepdims=True) / jnp.maximum(
      count - 1.0, 1.0)
  threshold = jnp.where(count >= 2, mean + jnp.sqrt(var), jnp.inf)
  boxes = detections["boxes_xyxy"]
  positive = (boxes[..., 2] > boxes[..., 0]) & (boxes[..., 3] > boxes[..., 1])
  initial = valid & positive & (scores >= threshold)
  return initial, initial & (scores >= final_threshold)


def pseudo_targets(teacher_outputs, weak, strong, *, method="nms", max_pseudo=100,
                   final_threshold=0.4, score_threshold=0.01, iou_threshold=0.6,
                   max_detections=300, num_candidates=1000):
  """Teacher outputs on the weak view -> pseudo-label targets in the student's strong view.

  Args:
    teacher_outputs: the teacher's outputs on `weak` (`pred_logits [B, Q, C]`, `pred_boxes
      [B, Q, 4]` normalised cxcywh).
    weak, strong: the two view batches of one unlabeled batch (`size [B, 2]` (h, w) of the
      unpadded view, `matrix [B, 3, 3]` original pixel -> view pixel).
    method, score_threshold, iou_threshold, max_detections, num_candidates: see
      `teacher_detections`.
    max_pseudo: static number M of pseudo-label slots per image; the detections are score
      sorted, so when more than M pass the initial threshold the lowest-scored ones are
      dropped (counted in `metric_pseudo_dropped`).
    final_threshold: see `select_pseudo_labels`.

  Returns:
    dict (all `stop_gradient`-ed), ready for the criterion functions:
      `boxes [B, M, 4]` normalised cxcywh in the strong view; `labels [B, M]` int32;
      `valid [B, M]` bool: the final set (score >= final_threshold);
      `initial_valid [B, M]` bool: the initial high-recall set (input to the GMM mining);
      `scores [B, M]` f32; `weak_boxes [B, M, 4]` normalised cxcywh and `weak_boxes_xyxy
      [B, M, 4]` pixels in the weak view (the teacher's consistency queries and RoIAlign);
      `size [B, 2]` the strong view's (h, w) (the criterion's per-size metrics);
      `metric_pseudo_dropped [B]` / `metric_pseudo_final_dropped [B]` int32 initial-set /
      final-set boxes beyond M; `exact [B]` see `teacher_detections`.
    A box whose mapped strong-view box has no area (moved out of the strong view) is invalid
    in both sets (Semi-DETR keeps it; a zero-size target would make Sized L1 divide by its eps).
  """
  det = teacher_detections(teacher_outputs, weak["size"], method=method,
                           score_threshold=score_threshold, iou_threshold=iou_threshold,
                           max_detections=max_detections, num_candidates=num_candidates)
  initial, final = select_pseudo_labels(det, final_threshold=final_threshold)
  k = det["scores"].shape[-1]
  m = max_pseudo
  pad = lambda x: jnp.pad(x, [(0, 0), (0, max(m - k, 0))] + [(0, 0)] * (x.ndim - 2))[:, :m]
  weak_xyxy = pad(det["boxes_xyxy"])
  wh = weak["size"].astype(jnp.float32)
  scale = jnp.stack([wh[:, 1], wh[:, 0], wh[:, 1], wh[:, 0]], axis=-1)[:, None, :]
  weak_cxcywh = box_ops.box_xyxy_to_cxcywh(weak_xyxy / scale)
  strong_cxcywh = transforms.map_boxes_between_views(
      weak_cxcywh, weak["matrix"].astype(jnp.float32), strong["matrix"].astype(jnp.float32),
      weak["size"].astype(jnp.float32), strong["size"].astype(jnp.float32), xp=jnp)
  has_area = (strong_cxcywh[..., 2] > 0) & (strong_cxcywh[..., 3] > 0)
  targets = {
      "boxes": strong_cxcywh,
      "labels": pad(det["labels"]),
      "valid": pad(final) & has_area,
      "initial_valid": pad(initial) & has_area,
      "scores": pad(det["scores"]),
      "weak_boxes": weak_cxcywh,
      "weak_boxes_xyxy": weak_xyxy,
      "size": strong["size"],
      "metric_pseudo_dropped": jnp.sum(initial[:, m:], axis=-1).astype(jnp.int32),
      "metric_pseudo_final_dropped": jnp.sum(final[:, m:], axis=-1).astype(jnp.int32),
      "exact": det["exact"],
  }
  return jax.lax.stop_gradient(targets)
