"""Co-DINO's auxiliary heads as Flax modules, and the RPN's static-shape proposals.

As Co-DETR's projects/configs/co_dino/co_dino_5scale_r50_1x_coco.py builds them on the encoder
memory maps plus one extra 3x3 stride-2 conv + GN map (strides 4..128):

* `ATSSHead` (Co-DETR projects/models/co_atss_head.py CoATSSHead, stacked_convs=1): a cls and
  a reg tower of one 3x3 conv + GroupNorm + ReLU each (shared by all levels), then 3x3 convs to
  C class logits, 4 box deltas (times a learnable per-level scale) and 1 centerness logit, for
  the one anchor (side 8 * stride) of every location.
* `RPNHead` (mmdet RPNHead): 3x3 conv + ReLU, then 1x1 convs to 1 objectness logit and 4 deltas
  per anchor (9 anchors: 3 scales x 3 ratios).
* `RoIBoxHead` (mmdet Shared2FCBBoxHead): RoIAlign 7x7 features -> 2 x (fc 1024 + ReLU) -> C + 1
  softmax logits (last = background) and class-specific deltas [C, 4].

Initialisation follows mmdet: conv heads normal(std 0.01) with the classification bias at the
0.01 prior; the RoI head's shared fcs Xavier-uniform, fc_cls normal(0.01), fc_reg normal(0.001).

Layouts: maps are NHWC; per-anchor outputs are flattened level by level, location-major, anchor
minor: the order of `anchors.anchor_grid`.
"""
import math
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from sized_detr_jax.co_dino import anchors as anchors_lib
from sized_detr_jax.models.dino import GroupNorm
from sized_detr_jax.semi.pseudo_labels import class_wise_nms

_PRIOR_BIAS = -math.log((1 - 0.01) / 0.01)


def _conv(features, kernel, name, *, bias=True, std=0.01, bias_init=nn.initializers.zeros,
          dtype=jnp.float32):
  pad = (kernel - 1) // 2
  return nn.Conv(features, (kernel, kernel), padding=((pad, pad), (pad, pad)), use_bias=bias,
                 kernel_init=nn.initializers.normal(std), bias_init=bias_init, dtype=dtype,
                 param_dtype=jnp.float32, name=name)


def _flatten(x, per_anchor):
  """[B, H, W, A * X] -> [B, H * W * A, X]."""
  return x.reshape(x.shape[0], -1, per_anchor)


class ATSSHead(nn.Module):
  """CoATSSHead with one stacked conv per tower.

  Attributes:
    num_classes: C.
    num_levels: number of input maps (one learnable regression scale each).
    feat_channels: tower width (256).
    gn_groups: GroupNorm groups of the towers (32).
    dtype: compute dtype (outputs float32).
  """
  num_classes: int
  num_levels: int
  feat_channels: int = 256
  gn_groups: int = 32
  dtype: Any = jnp.float32

  def setup(self):
    self.cls_conv = _conv(self.feat_channels, 3, "cls_conv", bias=False, dtype=self.dtype)
    self.cls_norm = GroupNorm(self.gn_groups, self.dtype)
    self.reg_conv = _conv(self.feat_channels, 3, "reg_conv", bias=False, dtype=self.dtype)
    self.reg_norm = GroupNorm(self.gn_groups, self.dtype)
    self.atss_cls = _conv(self.num_classes, 3, "atss_cls",
                          bias_init=nn.initializers.constant(_PRIOR_BIAS), dtype=self.dtype)
    self.atss_reg = _conv(4, 3, "atss_reg", dtype=self.dtype)
    self.atss_centerness = _conv(1, 3, "atss_centerness", dtype=self.dtype)
    self.scales = self.param("scales", nn.initializers.ones, (self.num_levels,), jnp.float32)

  def __call__(self, maps: Sequence[jax.Array]):
    """Args: maps: L maps [B, H_l, W_l, D].

    Returns:
      (cls_logits [B, A, C], deltas [B, A, 4], centerness_logits [B, A]), float32, A = sum of
      H_l * W_l.
    """
    if len(maps) != self.num_levels:
      raise ValueError(f"ATSSHead: got {len(maps)} maps, expected {self.num_levels}")
    cls, reg, ctr = [], [], []
    for lvl, x in enumerate(maps):
      cls_feat = nn.relu(self.cls_norm(self.cls_conv(x)))
      reg_feat = nn.relu(self.reg_norm(self.reg_conv(x)))
      cls.append(_flatten(self.atss_cls(cls_feat), self.num_classes))
      reg.append(_flatten(self.atss_reg(reg_feat).astype(jnp.float32) * self.scales[lvl], 4))
      ctr.append(_flatten(self.atss_centerness(reg_feat), 1)[..., 0])
    cat = lambda xs: jnp.concatenate(xs, axis=1).astype(jnp.float32)
    return cat(cls), cat(reg), cat(ctr)


class RPNHead(nn.Module):
  """mmdet RPNHead (sigmoid objectness).

  Attributes:
    num_anchors: anchors per location (9).
    feat_channels: conv width (256).
    dtype: compute dtype (outputs float32).
  """
  num_anchors: int = 9
  feat_channels: int = 256
  dtype: Any = jnp.float32

  def setup(self):
    self.rpn_conv = _conv(self.feat_channels, 3, "rpn_conv", dtype=self.dtype)
    self.rpn_cls = _conv(self.num_anchors, 1, "rpn_cls", dtype=self.dtype)
    self.rpn_reg = _conv(self.num_anchors * 4, 1, "rpn_reg", dtype=self.dtype)

  def __call__(self, maps: Sequence[jax.Array]):
    """Args: maps: L maps [B, H_l, W_l, D].

    Returns:
      (objectness_logits [B, A], deltas [B, A, 4]) float32, A = sum of H_l * W_l * num_anchors.
    """
    cls, reg = [], []
    for x in maps:
      feat = nn.relu(self.rpn_conv(x))
      cls.append(_flatten(self.rpn_cls(feat), 1)[..., 0])
      reg.append(_flatten(self.rpn_reg(feat), 4))
    cat = lambda xs: jnp.concatenate(xs, axis=1).astype(jnp.float32)
    return cat(cls), cat(reg)


class RoIBoxHead(nn.Module):
  """mmdet Shared2FCBBoxHead (class-specific regression).

  Attributes:
    num_classes: C (the background logit is an extra, last column).
    fc_dim: width of the two shared fcs (1024).
    dtype: compute dtype (outputs float32).
  """
  num_classes: int
  fc_dim: int = 1024
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, roi_features):
    """Args: roi_features: [B, N, PH, PW, D] RoIAlign output.

    Returns:
      (cls_logits [B, N, C + 1], deltas [B, N, C, 4]) float32.
    """
    b, n = roi_features.shape[:2]
    x = roi_features.reshape(b, n, -1).astype(self.dtype)
    for i in range(2):
      x = nn.relu(nn.Dense(self.fc_dim, kernel_init=nn.initializers.xavier_uniform(),
                           dtype=self.dtype, param_dtype=jnp.float32, name=f"shared_fc_{i}")(x))
    cls = nn.Dense(self.num_classes + 1, kernel_init=nn.initializers.normal(0.01),
                   dtype=self.dtype, param_dtype=jnp.float32, name="fc_cls")(x)
    reg = nn.Dense(self.num_classes * 4, kernel_init=nn.initializers.normal(0.001),
                   dtype=self.dtype, param_dtype=jnp.float32, name="fc_reg")(x)
    return cls.astype(jnp.float32), reg.reshape(b, n, self.num_classes, 4).astype(jnp.float32)


def rpn_proposals(objectness, deltas, grid: anchors_lib.AnchorGrid, image_size, *, nms_pre,
                  max_proposals, nms_iou=0.7, use_nms=True):
  """RPN proposals with static shapes (mmdet RPNHead._get_bboxes_single, min_bbox_size 0).

  Per level the `nms_pre` highest-scored anchors (all anchors compete, as in mmdet) are decoded
  (stds 1) and clipped to the image; boxes of zero width or height are dropped; NMS at
  `nms_iou` runs per level (mmdet's batched_nms with the level as the class); the
  `max_proposals` best survivors over all levels are kept. Without `use_nms` the NMS step is
  skipped (cheaper; duplicates then crowd the proposal set).

  Args:
    objectness: [B, A] logits; deltas: [B, A, 4].
    grid: the RPN AnchorGrid.
    image_size: [B, 2] (h, w) of the unpadded images.
    nms_pre, max_proposals, nms_iou, use_nms: see above.

  Returns:
    (boxes_xyxy [B, P, 4] pixels, scores [B, P] sigmoid, valid [B, P] bool), P = max_proposals
    (clipped to the candidate count), under stop_gradient.
  """
  objectness, deltas = jax.lax.stop_gradient((objectness, deltas))
  anchors = jnp.asarray(grid.boxes)
  boxes_all, scores_all, keep_all, start = [], [], [], 0
  for size in grid.level_sizes:
    k = min(nms_pre, size)
    score, idx = jax.lax.top_k(objectness[:, start:start + size], k)  # [B, k]
    idx = idx + start
    start += size
    boxes = anchors_lib.decode_deltas(anchors[idx], jnp.take_along_axis(deltas, idx[..., None],
                                                                        axis=1),
                                      image_size=image_size)
    candidate = (boxes[..., 2] > boxes[..., 0]) & (boxes[..., 3] > boxes[..., 1])
    if use_nms:
      candidate = class_wise_nms(boxes, score, jnp.zeros_like(idx), candidate,
                                 iou_threshold=nms_iou)
    boxes_all.append(boxes)
    scores_all.append(score)
    keep_all.append(candidate)
  boxes = jnp.concatenate(boxes_all, axis=1)
  scores = jnp.concatenate(scores_all, axis=1)
  keep = jnp.concatenate(keep_all, axis=1)
  ranked, order = jax.lax.top_k(jnp.where(keep, scores, -jnp.inf),
                                min(max_proposals, scores.shape[1]))
  boxes = jnp.take_along_axis(boxes, order[..., None], axis=1)
  return boxes, jax.nn.sigmoid(ranked), jnp.isfinite(ranked)
