"""Losses of Co-DINO's auxiliary heads on their (already computed) one-to-many assignments.

Each function takes the head's entry of `outputs["co_outputs"]` (see `co_dino.model`) and
returns unweighted, normalised scalars; `co_dino.criterion` weights them (Co-DETR multiplies
every auxiliary weight by num_decoder_layers x lambda_2 = 12).

Normalisers follow mmdet / Co-DETR, made global: mmdet averages per GPU (or per GPU after a
`reduce_mean` of the count) and DDP averages the gradients, which equals the global sum over
the global count when the per-GPU counts agree. Under `jit` the sums below are global; inside
`shard_map` pass `axis_name`.

* ATSS (Co-DETR co_atss_head.py CoATSSHead.loss): sigmoid focal loss (alpha 0.25, gamma 2)
  over every usable anchor / the number of positives, counted as sum over images of
  max(positives, 1) (mmdet's quirk); GIoU of the decoded positive boxes weighted by their
  centerness target / the sum of centerness targets; centerness BCE of the positives / the
  same count as the focal loss.
* RPN (mmdet RPNHead / AnchorHead.loss): BCE of the sampled anchors and L1 of the positives'
  deltas (stds 1), both / the number of sampled anchors.
* RoI (mmdet BBoxHead.loss, reg_decoded_bbox): softmax cross-entropy of the sampled RoIs /
  their number; GIoU of the positives' decoded class-specific boxes / the number of sampled
  RoIs (mmdet's avg_factor = bbox_targets.size(0)).
"""
import jax
import jax.numpy as jnp

from sized_detr_jax import box_ops
from sized_detr_jax import losses
from sized_detr_jax.co_dino import anchors as anchors_lib

# Box coder stds of the ATSS and RoI heads (DeltaXYWHBBoxCoder target_stds); the RPN uses 1.
DELTA_STDS = (0.1, 0.1, 0.2, 0.2)


def _bce_with_logits(logits, target):
  return -(target * jax.nn.log_sigmoid(logits) + (1 - target) * jax.nn.log_sigmoid(-logits))


def centerness_target(anchors_xyxy, gt_xyxy):
  """ATSS centerness of anchor centres in their ground truth: [..., 4] x [..., 4] xyxy -> [...].

  sqrt(min(l, r) / max(l, r) * min(t, b) / max(t, b)); only meaningful for positives (whose
  centre is inside the box); clamped to [0, 1] so other pairs stay finite.
  """
  cx = (anchors_xyxy[..., 0] + anchors_xyxy[..., 2]) / 2
  cy = (anchors_xyxy[..., 1] + anchors_xyxy[..., 3]) / 2
  l, t = cx - gt_xyxy[..., 0], cy - gt_xyxy[..., 1]
  r, b = gt_xyxy[..., 2] - cx, gt_xyxy[..., 3] - cy
  ratio = lambda p, q: jnp.minimum(p, q) / jnp.maximum(jnp.maximum(p, q), 1e-6)
  return jnp.sqrt(jnp.clip(ratio(l, r) * ratio(t, b), 0.0, 1.0))


def atss_losses(head, *, focal_alpha=0.25, focal_gamma=2.0, axis_name=None):
  """ATSS head losses.

  Args:
    head: dict with `cls_logits` [B, A, C], `deltas` [B, A, 4], `centerness` [B, A] logits,
      `anchors` [A, 4] xyxy pixels, `valid` [B, A] usable anchors, `labels` [B, A] int32 (-1
      background), `gt_boxes_xyxy` [B, A, 4] the assigned ground truth in pixels.

  Returns:
    {"loss_atss_cls", "loss_atss_giou", "loss_atss_centerness"} [] float32.
  """
  logits = head["cls_logits"]
  labels, valid = head["labels"], head["valid"]
  positive = valid & (labels >= 0)
  onehot = jax.nn.one_hot(labels, logits.shape[-1], dtype=logits.dtype)  # -1 -> zeros
  focal = losses.sigmoid_focal_loss(logits, onehot, alpha=focal_alpha, gamma=focal_gamma)
  focal = jnp.where(valid[..., None], focal, 0.0)
  per_image_pos = jnp.sum(positive, axis=1).astype(jnp.float32)
  num_samples = jnp.maximum(losses.global_sum(jnp.maximum(per_image_pos, 1.0), axis_name), 1.0)

  anchors = jnp.broadcast_to(head["anchors"], head["deltas"].shape)
  pred = anchors_lib.decode_deltas(anchors, head["deltas"], DELTA_STDS)
  target = head["gt_boxes_xyxy"]
  ctr = jnp.where(positive, centerness_target(anchors, target), 0.0)
  giou = 1.0 - box_ops.elementwise_generalized_box_iou(pred, target)
  giou = jnp.where(positive, giou * ctr, 0.0)
  ctr_norm = jnp.maximum(losses.global_sum(ctr, axis_name), 1.0)
  bce = jnp.where(positive, _bce_with_logits(head["centerness"], ctr), 0.0)
  return {"loss_atss_cls": losses.global_sum(focal, axis_name) / num_samples,
          "loss_atss_giou": losses.global_sum(giou, axis_name) / ctr_norm,
          "loss_atss_centerness": losses.global_sum(bce, axis_name) / num_samples}


def rpn_losses(head, *, axis_name=None):
  """RPN losses on the sampled anchors.

  Args:
    head: dict with `logits` [B, S], `deltas` [B, S, 4], `anchors` [B, S, 4] xyxy pixels,
      `gt_boxes_xyxy` [B, S, 4], `positive` [B, S], `valid` [B, S] (sampled slot).

  Returns:
    {"loss_rpn_cls", "loss_rpn_bbox"} [] float32.
  """
  valid, positive = head["valid"], head["positive"] & head["valid"]
  count = jnp.maximum(losses.global_sum(valid.astype(jnp.float32), axis_name), 1.0)
  bce = jnp.where(valid, _bce_with_logits(head["logits"], positive.astype(jnp.float32)), 0.0)
  target = anchors_lib.encode_deltas(head["anchors"], head["gt_boxes_xyxy"])
  l1 = jnp.where(positive[..., None], jnp.abs(head["deltas"] - target), 0.0)
  return {"loss_rpn_cls": losses.global_sum(bce, axis_name) / count,
          "loss_rpn_bbox": losses.global_sum(l1, axis_name) / count}


def roi_losses(head, *, axis_name=None):
  """RoI head losses on the sampled RoIs.

  Args:
    head: dict with `cls_logits` [B, R, C + 1], `deltas` [B, R, C, 4], `rois` [B, R, 4] xyxy
      pixels, `labels` [B, R] int32 (-1 background), `gt_boxes_xyxy` [B, R, 4], `positive`
      [B, R], `valid` [B, R].

  Returns:
    {"loss_roi_cls", "loss_roi_giou"} [] float32.
  """
  logits = head["cls_logits"]
  num_classes = logits.shape[-1] - 1
  valid, positive = head["valid"], head["positive"] & head["valid"]
  labels = jnp.where(positive, head["labels"], num_classes)  # background = last column
  count = jnp.maximum(losses.global_sum(valid.astype(jnp.float32), axis_name), 1.0)
  ce = -jnp.take_along_axis(jax.nn.log_softmax(logits, axis=-1), labels[..., None], axis=-1)
  ce = jnp.where(valid, ce[..., 0], 0.0)
  cls_index = jnp.clip(labels, 0, num_classes - 1)
  deltas = jnp.take_along_axis(head["deltas"], cls_index[..., None, None], axis=2)[:, :, 0]
  pred = anchors_lib.decode_deltas(head["rois"], deltas, DELTA_STDS)
  giou = 1.0 - box_ops.elementwise_generalized_box_iou(pred, head["gt_boxes_xyxy"])
  giou = jnp.where(positive, giou, 0.0)
  return {"loss_roi_cls": losses.global_sum(ce, axis_name) / count,
          "loss_roi_giou": losses.global_sum(giou, axis_name) / count}
