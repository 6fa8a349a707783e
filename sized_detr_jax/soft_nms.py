"""Static-shape class-wise soft-NMS and Co-DINO's test-time post-processing (pure jnp, jittable).

Co-DETR (Sense-X/Co-DETR projects/configs/co_dino/co_dino_5scale_r50_1x_coco.py, test_cfg of the
query head: `max_per_img=300, nms=dict(type='soft_nms', iou_threshold=0.8)`; head
`CoDeformDETRHead._get_bboxes_single` in projects/models/co_deformable_detr_head.py) turns the
last decoder layer into detections by

  1. top-900 (num_query) sigmoid scores over query x class;
  2. boxes to absolute xyxy, clamped to the image;
  3. mmcv `batched_nms` with `soft_nms(iou_threshold=0.8)`: class-wise (boxes of different classes
     never interact), mmcv's defaults `method='linear', sigma=0.5, min_score=1e-3, offset=0`;
  4. the first 300 survivors, with their decayed scores.

mmcv's CPU kernel (mmcv/ops/csrc/pytorch/cpu/nms.cpp `softnms_cpu`) repeatedly takes the box with
the highest current score, then for every remaining box of IoU `o` with it multiplies the score
by `1 - o` if `o >= iou_threshold` ("linear"; "gaussian": `exp(-o^2 / sigma)` for every box;
"naive": 0 if `o >= iou_threshold`) and drops boxes whose score falls below `min_score`. The
picked scores never increase, so the output is sorted. Only the first `max_output` picks are
kept, so `soft_nms` runs `max_output` steps of O(N) each. IoU = inter / union (no eps; 0 where
the union is 0, which mmcv's NaN comparison also treats as no overlap). Among equal scores the
lowest index is taken (mmcv: the first in its internally permuted order).

mmcv makes NMS class-wise by shifting each class's boxes by `label * (max coordinate + 1)` and
computing IoU in float32 on the shifted coordinates; here IoU is computed on the unshifted boxes
and masked to the same class (the same result up to float32 rounding of the shift).
"""
import jax
import jax.numpy as jnp

METHODS = ("linear", "gaussian", "naive")


def _soft_nms_single(boxes, scores, labels, valid, max_output, iou_threshold, method, sigma,
                     min_score):
  """One image: boxes [N, 4], scores [N], labels [N], valid [N] -> ([K], [K], [K])."""
  x0, y0, x1, y1 = (boxes[:, i] for i in range(4))
  areas = (x1 - x0) * (y1 - y0)
  n = scores.shape[0]

  def step(k, carry):
    current, alive, out_index, out_score, out_valid = carry
    masked = jnp.where(alive, current, -jnp.inf)
    i = jnp.argmax(masked)  # first index among ties
    any_alive = jnp.any(alive)
    out_index = out_index.at[k].set(jnp.where(any_alive, i, 0).astype(jnp.int32))
    out_score = out_score.at[k].set(jnp.where(any_alive, current[i], 0.0))
    out_valid = out_valid.at[k].set(any_alive)
    iw = jnp.maximum(jnp.minimum(x1[i], x1) - jnp.maximum(x0[i], x0), 0.0)
    ih = jnp.maximum(jnp.minimum(y1[i], y1) - jnp.maximum(y0[i], y0), 0.0)
    inter = iw * ih
    union = areas[i] + areas - inter
    iou = jnp.where(union > 0, inter / jnp.where(union > 0, union, 1.0), 0.0)
    if method == "linear":
      weight = jnp.where(iou >= iou_threshold, 1.0 - iou, 1.0)
    elif method == "gaussian":
      weight = jnp.exp(-(iou * iou) / sigma)
    else:
      weight = jnp.where(iou >= iou_threshold, 0.0, 1.0)
    others = alive & (jnp.arange(n) != i)
    weight = jnp.where(others & (labels == labels[i]), weight, 1.0)
    current = current * weight
    alive = others & (current >= min_score)
    return current, alive, out_index, out_score, out_valid

  init = (scores, valid, jnp.zeros((max_output,), jnp.int32),
          jnp.zeros((max_output,), scores.dtype), jnp.zeros((max_output,), bool))
  _, _, out_index, out_score, out_valid = jax.lax.fori_loop(0, max_output, step, init)
  return out_index, out_score, out_valid


def soft_nms(boxes_xyxy, scores, labels=None, valid=None, *, max_output=300, iou_threshold=0.8,
             method="linear", sigma=0.5, min_score=1e-3):
  """Class-wise soft-NMS with mmcv's semantics (defaults: Co-DINO's test_cfg + mmcv defaults).

  Args:
    boxes_xyxy: [..., N, 4] boxes (x0, y0, x1, y1), any consistent unit (IoU is scale-free).
    scores: [..., N] float scores.
    labels: optional [..., N] int class of each box (boxes of different classes never
      suppress each other); None = class-agnostic.
    valid: optional [..., N] bool, False for entries that take no part.
    max_output: K, the number of picks returned (static).
    iou_threshold: overlap at which "linear"/"naive" start to decay a score (0.8).
    method: "linear" (Co-DINO, mmcv's default), "gaussian" or "naive" (hard NMS).
    sigma: the gaussian method's width (0.5).
    min_score: boxes whose decayed score falls below it are dropped (1e-3).

  Returns:
    dict with `index` [..., K] int32 (into N), `scores` [..., K] the decayed scores (non-
    increasing) and `valid` [..., K] bool (False once fewer than K boxes survive; those slots
    hold index 0 and score 0 and must be dropped).
  """
  if method not in METHODS:
    raise ValueError(f"soft_nms: method must be one of {METHODS}, got {method!r}")
  if boxes_xyxy.shape[-1] != 4 or boxes_xyxy.shape[:-1] != scores.shape:
    raise ValueError(f"soft_nms: boxes_xyxy must be [..., N, 4] and scores [..., N], got "
                     f"{boxes_xyxy.shape} and {scores.shape}")
  lead, n = scores.shape[:-1], scores.shape[-1]
  if labels is None:
    labels = jnp.zeros(scores.shape, jnp.int32)
  if valid is None:
    valid = jnp.ones(scores.shape, bool)
  flat = lambda x, *tail: jnp.reshape(x, (-1, n) + tail)
  fn = jax.vmap(lambda b, s, l, v: _soft_nms_single(
      b, s, l, v, max_output, iou_threshold, method, sigma, min_score))
  index, out_scores, out_valid = fn(flat(boxes_xyxy.astype(jnp.float32), 4),
                                    flat(scores.astype(jnp.float32)), flat(labels),
                                    flat(valid.astype(bool)))
  unflat = lambda x: jnp.reshape(x, lead + (max_output,))
  return {"index": unflat(index), "scores": unflat(out_scores), "valid": unflat(out_valid)}


def co_dino_postprocess(outputs, target_sizes, *, num_pre=900, num_select=300, iou_threshold=0.8,
                        min_score=1e-3):
  """Co-DINO's test-time detections: top-`num_pre` over query x class -> clamp to the image ->
  class-wise linear soft-NMS -> the first `num_select` (see the module docstring).

  Args:
    outputs: model outputs with `pred_logits` [B, Q, C] and `pred_boxes` [B, Q, 4] (normalised
      cxcywh, last decoder layer).
    target_sizes: [B, 2] (h, w) to scale boxes to (the image the boxes are normalised by).
    num_pre: candidates before NMS (Co-DETR: num_query = 900; clipped to Q * C).
    num_select: detections kept (max_per_img = 300).
    iou_threshold, min_score: soft-NMS settings (0.8; mmcv's default 1e-3).

  Returns:
    dict like `models.dino.postprocess`: `scores` [B, K] (decayed, descending), `labels` [B, K]
    int32, `boxes_xyxy` [B, K, 4] and `boxes_xywh` [B, K, 4] absolute, plus `valid` [B, K]
    bool (False slots are padding: score 0, to be dropped).
  """
  logits = outputs["pred_logits"].astype(jnp.float32)
  b, q, c = logits.shape
  k = min(num_pre, q * c)
  pre_scores, index = jax.lax.top_k(jax.nn.sigmoid(logits).reshape(b, q * c), k)
  labels = (index % c).astype(jnp.int32)
  boxes = jnp.take_along_axis(outputs["pred_boxes"].astype(jnp.float32), (index // c)[..., None],
                              axis=1)
  h, w = target_sizes[:, 0].astype(jnp.float32), target_sizes[:, 1].astype(jnp.float32)
  cx, cy, bw, bh = (boxes[..., i] for i in range(4))
  clip_x = lambda v: jnp.clip(v, 0.0, w[:, None])
  clip_y = lambda v: jnp.clip(v, 0.0, h[:, None])
  xyxy = jnp.stack([clip_x((cx - 0.5 * bw) * w[:, None]), clip_y((cy - 0.5 * bh) * h[:, None]),
                    clip_x((cx + 0.5 * bw) * w[:, None]), clip_y((cy + 0.5 * bh) * h[:, None])],
                   axis=-1)
  kept = soft_nms(xyxy, pre_scores, labels, max_output=min(num_select, k),
                  iou_threshold=iou_threshold, min_score=min_score)
  take = lambda x: jnp.take_along_axis(x, kept["index"], axis=1)
  out_xyxy = jnp.take_along_axis(xyxy, kept["index"][..., None], axis=1)
  out_xyxy = jnp.where(kept["valid"][..., None], out_xyxy, 0.0)
  xywh = jnp.concatenate([out_xyxy[..., :2], out_xyxy[..., 2:] - out_xyxy[..., :2]], axis=-1)
  return {"scores": kept["scores"], "labels": jnp.where(kept["valid"], take(labels), 0),
          "boxes_xyxy": out_xyxy, "boxes_xywh": xywh, "valid": kept["valid"]}
