"""Box format conversions, areas, IoU and generalised IoU (pure jnp).

Formats, named in every function:
  * cxcywh: (centre x, centre y, width, height); inside the model and the losses these are
    normalised to [0, 1] by the unpadded image size (the DETR convention).
  * xyxy:   (x0, y0, x1, y1), corners.
  * xywh:   (x0, y0, width, height), the COCO annotation/results format (absolute pixels).

All functions work on any leading batch shape `[..., 4]`. IoU and GIoU divide by `union + EPS` and
`enclosing + EPS` (EPS = 1e-6), the form of IDEA-Research/DINO's util/box_ops.py (`box_iou`,
`generalized_box_iou`). Union and enclosing area are never negative here (extents are clipped at
zero), so the denominators are >= EPS and degenerate (zero-area) boxes give finite values and
finite gradients. (mmdet, used by Co-DETR and Semi-DETR, divides by `max(union, 1e-6)` instead; the
two differ by at most 1e-6 / area relative.)
"""
import jax
import jax.numpy as jnp

EPS = 1e-6


def box_cxcywh_to_xyxy(boxes: jax.Array) -> jax.Array:
  """[..., 4] cxcywh -> [..., 4] xyxy."""
  cx, cy, w, h = jnp.moveaxis(boxes, -1, 0)
  return jnp.stack([cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h], axis=-1)


def box_xyxy_to_cxcywh(boxes: jax.Array) -> jax.Array:
  """[..., 4] xyxy -> [..., 4] cxcywh."""
  x0, y0, x1, y1 = jnp.moveaxis(boxes, -1, 0)
  return jnp.stack([(x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0], axis=-1)


def box_xywh_to_xyxy(boxes: jax.Array) -> jax.Array:
  """[..., 4] xywh (COCO) -> [..., 4] xyxy."""
  x0, y0, w, h = jnp.moveaxis(boxes, -1, 0)
  return jnp.stack([x0, y0, x0 + w, y0 + h], axis=-1)


def box_xyxy_to_xywh(boxes: jax.Array) -> jax.Array:
  """[..., 4] xyxy -> [..., 4] xywh (COCO)."""
  x0, y0, x1, y1 = jnp.moveaxis(boxes, -1, 0)
  return jnp.stack([x0, y0, x1 - x0, y1 - y0], axis=-1)


def box_cxcywh_to_xywh(boxes: jax.Array) -> jax.Array:
  """[..., 4] cxcywh -> [..., 4] xywh (COCO)."""
  return box_xyxy_to_xywh(box_cxcywh_to_xyxy(boxes))


def box_xywh_to_cxcywh(boxes: jax.Array) -> jax.Array:
  """[..., 4] xywh (COCO) -> [..., 4] cxcywh."""
  return box_xyxy_to_cxcywh(box_xywh_to_xyxy(boxes))


def box_area(boxes_xyxy: jax.Array) -> jax.Array:
  """Area of [..., 4] xyxy boxes -> [...]; negative extents count as zero."""
  x0, y0, x1, y1 = jnp.moveaxis(boxes_xyxy, -1, 0)
  return jnp.clip(x1 - x0, 0) * jnp.clip(y1 - y0, 0)


def _inter_union(a_xyxy, b_xyxy):
  """Intersection and union of broadcastable [..., 4] xyxy boxes -> ([...], [...])."""
  lt = jnp.maximum(a_xyxy[..., :2], b_xyxy[..., :2])
  rb = jnp.minimum(a_xyxy[..., 2:], b_xyxy[..., 2:])
  wh = jnp.clip(rb - lt, 0)
  inter = wh[..., 0] * wh[..., 1]
  union = box_area(a_xyxy) + box_area(b_xyxy) - inter
  return inter, union


def _giou_from_parts(a_xyxy, b_xyxy, inter, union):
  """GIoU = IoU - (enclosing - union) / enclosing, denominators + EPS (DINO's form)."""
  iou = inter / (union + EPS)
  lt = jnp.minimum(a_xyxy[..., :2], b_xyxy[..., :2])
  rb = jnp.maximum(a_xyxy[..., 2:], b_xyxy[..., 2:])
  wh = jnp.clip(rb - lt, 0)
  enclosing = wh[..., 0] * wh[..., 1]
  return iou - (enclosing - union) / (enclosing + EPS)


def elementwise_box_iou(a_xyxy: jax.Array, b_xyxy: jax.Array) -> jax.Array:
  """IoU of paired boxes: [..., 4] xyxy x [..., 4] xyxy -> [...] (broadcasting)."""
  inter, union = _inter_union(a_xyxy, b_xyxy)
  return inter / (union + EPS)


def elementwise_generalized_box_iou(a_xyxy: jax.Array, b_xyxy: jax.Array) -> jax.Array:
  """GIoU of paired boxes: [..., 4] xyxy x [..., 4] xyxy -> [...] in [-1, 1]."""
  inter, union = _inter_union(a_xyxy, b_xyxy)
  return _giou_from_parts(a_xyxy, b_xyxy, inter, union)


def box_iou(a_xyxy: jax.Array, b_xyxy: jax.Array) -> jax.Array:
  """Pairwise IoU: a [..., N, 4] xyxy, b [..., M, 4] xyxy -> (iou, union), each [..., N, M]."""
  a, b = a_xyxy[..., :, None, :], b_xyxy[..., None, :, :]
  inter, union = _inter_union(a, b)
  return inter / (union + EPS), union


def generalized_box_iou(a_xyxy: jax.Array, b_xyxy: jax.Array) -> jax.Array:
  """Pairwise GIoU (Rezatofighi et al. 2019): a [..., N, 4] xyxy, b [..., M, 4] xyxy -> [..., N, M]."""
  a, b = a_xyxy[..., :, None, :], b_xyxy[..., None, :, :]
  inter, union = _inter_union(a, b)
  return _giou_from_parts(a, b, inter, union)
