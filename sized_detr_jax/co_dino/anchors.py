"""Anchor grids and the delta box coder of Co-DINO's auxiliary heads (mmdet 2.x semantics).

Anchors (mmdet `AnchorGenerator`, as Co-DETR's projects/configs/co_dino/
co_dino_5scale_r50_1x_coco.py configures it): at level l with stride s every feature location
(i, j) carries one anchor per (ratio, scale) pair, centred at the location's top-left corner
(j * s, i * s) (mmdet 2.x's `center_offset=0`), with width `s * scale / sqrt(ratio)` and height
`s * scale * sqrt(ratio)`, `scale = octave_base_scale * 2^(k / scales_per_octave)`. The order is
location-major (row, column), then ratio, then scale: the layout of a conv output
`[B, H, W, A * X]` reshaped to `[B, H * W * A, X]`.

An anchor is usable (mmdet `valid_flags` with `allowed_border=-1`) when its location lies inside
the unpadded image: `j * s < w_img` and `i * s < h_img`.

Delta coder (mmdet `DeltaXYWHBBoxCoder`, `bbox2delta` / `delta2bbox`): for an anchor (px, py,
pw, ph) and a box (gx, gy, gw, gh), centre/size form with w = x1 - x0,
`d = ((gx - px) / pw, (gy - py) / ph, log(gw / pw), log(gh / ph))`, then `(d - mean) / std`.
Decoding clamps the log-size deltas to +-|log(16 / 1000)| before `exp`.

All boxes here are xyxy in pixels of the padded input (same origin as the unpadded image).
"""
import math
from typing import NamedTuple, Sequence, Tuple

import jax.numpy as jnp
import numpy as np

# mmdet delta2bbox's wh_ratio_clip = 16 / 1000: log-size deltas are clamped to +-4.135.
MAX_LOG_RATIO = abs(math.log(16.0 / 1000.0))


class AnchorGrid(NamedTuple):
  """Static multi-level anchors (numpy, fixed at trace time).

  boxes: [A, 4] float32 xyxy pixels.
  location: [A, 2] float32 (x, y) of each anchor's feature location (j * s, i * s).
  level: [A] int32 level index.
  level_sizes: per-level anchor counts (H_l * W_l * anchors_per_location).
  """
  boxes: np.ndarray
  location: np.ndarray
  level: np.ndarray
  level_sizes: Tuple[int, ...]


def base_anchors(stride, *, octave_base_scale, scales_per_octave, ratios):
  """[A0, 4] xyxy anchors of one location at the origin (mmdet gen_single_level_base_anchors)."""
  scales = octave_base_scale * 2.0 ** (np.arange(scales_per_octave) / scales_per_octave)
  h_ratios = np.sqrt(np.asarray(ratios, np.float64))
  w_ratios = 1.0 / h_ratios
  ws = (stride * w_ratios[:, None] * scales[None, :]).reshape(-1)
  hs = (stride * h_ratios[:, None] * scales[None, :]).reshape(-1)
  return np.stack([-0.5 * ws, -0.5 * hs, 0.5 * ws, 0.5 * hs], axis=-1)


def anchor_grid(feature_shapes: Sequence[Tuple[int, int]], strides: Sequence[int], *,
                octave_base_scale, scales_per_octave=1, ratios=(1.0,)) -> AnchorGrid:
  """Anchors of every level for the given (static) feature-map shapes.

  Args:
    feature_shapes: per-level (H_l, W_l).
    strides: per-level stride in pixels.
    octave_base_scale, scales_per_octave, ratios: mmdet AnchorGenerator settings (ATSS: 8, 1,
      (1.0,); RPN: 4, 3, (0.5, 1.0, 2.0)).

  Returns:
    AnchorGrid (numpy).
  """
  if len(feature_shapes) != len(strides):
    raise ValueError(f"anchor_grid: {len(feature_shapes)} feature shapes, {len(strides)} strides")
  boxes, location, level, sizes = [], [], [], []
  for lvl, ((h, w), stride) in enumerate(zip(feature_shapes, strides)):
    base = base_anchors(stride, octave_base_scale=octave_base_scale,
                        scales_per_octave=scales_per_octave, ratios=ratios)
    ys, xs = np.meshgrid(np.arange(h) * stride, np.arange(w) * stride, indexing="ij")
    loc = np.stack([xs.reshape(-1), ys.reshape(-1)], axis=-1).astype(np.float64)  # [HW, 2]
    shifts = np.concatenate([loc, loc], axis=-1)
    boxes.append((shifts[:, None, :] + base[None]).reshape(-1, 4))
    location.append(np.repeat(loc, len(base), axis=0))
    level.append(np.full(h * w * len(base), lvl, np.int32))
    sizes.append(h * w * len(base))
  return AnchorGrid(np.concatenate(boxes).astype(np.float32),
                    np.concatenate(location).astype(np.float32),
                    np.concatenate(level), tuple(sizes))


def image_size_from_mask(pixel_mask):
  """[B, H, W] bool (True = real pixel) -> [B, 2] float32 (h, w) of the unpadded image."""
  h = jnp.sum(jnp.any(pixel_mask, axis=2), axis=1)
  w = jnp.sum(jnp.any(pixel_mask, axis=1), axis=1)
  return jnp.stack([h, w], axis=-1).astype(jnp.float32)


def anchor_valid(grid: AnchorGrid, image_size):
  """[B, A] bool: the anchor's location lies inside the unpadded image (mmdet valid_flags).

  Args:
    grid: the AnchorGrid.
    image_size: [B, 2] (h, w) of the unpadded images in pixels.
  """
  loc = jnp.asarray(grid.location)
  return ((loc[None, :, 0] < image_size[:, 1:2]) & (loc[None, :, 1] < image_size[:, 0:1]))


def _centre_size(boxes):
  w = boxes[..., 2] - boxes[..., 0]
  h = boxes[..., 3] - boxes[..., 1]
  return boxes[..., 0] + 0.5 * w, boxes[..., 1] + 0.5 * h, w, h


def encode_deltas(anchors_xyxy, boxes_xyxy, stds=(1.0, 1.0, 1.0, 1.0)):
  """mmdet bbox2delta (means 0): [..., 4] anchors and boxes -> [..., 4] normalised deltas.

  Degenerate anchors or boxes (zero width/height) are clamped to 1e-6 so the log stays finite
  (only ever used on positive pairs, which have IoU > 0).
  """
  px, py, pw, ph = _centre_size(anchors_xyxy)
  gx, gy, gw, gh = _centre_size(boxes_xyxy)
  pw, ph = jnp.maximum(pw, 1e-6), jnp.maximum(ph, 1e-6)
  deltas = jnp.stack([(gx - px) / pw, (gy - py) / ph, jnp.log(jnp.maximum(gw, 1e-6) / pw),
                      jnp.log(jnp.maximum(gh, 1e-6) / ph)], axis=-1)
  return deltas / jnp.asarray(stds, deltas.dtype)


def decode_deltas(anchors_xyxy, deltas, stds=(1.0, 1.0, 1.0, 1.0), image_size=None):
  """mmdet delta2bbox (means 0): [..., 4] anchors and deltas -> [..., 4] xyxy boxes.

  Args:
    anchors_xyxy: [..., 4] anchors (or proposals).
    deltas: [..., 4] normalised deltas.
    stds: the coder's target_stds.
    image_size: optional [B, 2] (h, w); when given, boxes are clipped to the image (leading
      dim of anchors/deltas is B).
  """
  d = deltas * jnp.asarray(stds, deltas.dtype)
  px, py, pw, ph = _centre_size(anchors_xyxy)
  dw = jnp.clip(d[..., 2], -MAX_LOG_RATIO, MAX_LOG_RATIO)
  dh = jnp.clip(d[..., 3], -MAX_LOG_RATIO, MAX_LOG_RATIO)
  gw, gh = pw * jnp.exp(dw), ph * jnp.exp(dh)
  gx, gy = px + pw * d[..., 0], py + ph * d[..., 1]
  boxes = jnp.stack([gx - 0.5 * gw, gy - 0.5 * gh, gx + 0.5 * gw, gy + 0.5 * gh], axis=-1)
  if image_size is not None:
    expand = (slice(None),) + (None,) * (boxes.ndim - 2)
    h = image_size[:, 0][expand]
    w = image_size[:, 1][expand]
    boxes = jnp.stack([jnp.clip(boxes[..., 0], 0, w), jnp.clip(boxes[..., 1], 0, h),
                       jnp.clip(boxes[..., 2], 0, w), jnp.clip(boxes[..., 3], 0, h)], axis=-1)
  return boxes


def normalized_to_pixels(boxes_cxcywh, image_size):
  """Normalised cxcywh [B, G, 4] relative to the unpadded image -> xyxy pixels [B, G, 4]."""
  h = image_size[:, 0][:, None]
  w = image_size[:, 1][:, None]
  cx, cy, bw, bh = jnp.moveaxis(boxes_cxcywh, -1, 0)
  return jnp.stack([(cx - 0.5 * bw) * w, (cy - 0.5 * bh) * h, (cx + 0.5 * bw) * w,
                    (cy + 0.5 * bh) * h], axis=-1)


def pixels_to_normalized(boxes_xyxy, image_size):
  """xyxy pixels [B, N, 4] -> normalised cxcywh [B, N, 4] relative to the unpadded image."""
  h = image_size[:, 0][:, None]
  w = image_size[:, 1][:, None]
  x0, y0, x1, y1 = jnp.moveaxis(boxes_xyxy, -1, 0)
  return jnp.stack([(x0 + x1) / (2 * w), (y0 + y1) / (2 * h), (x1 - x0) / w, (y1 - y0) / h],
                   axis=-1)
