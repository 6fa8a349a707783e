"""RoIAlign with static shapes, single- and multi-level (FPN level chosen by box size).

Shared by Semi-DETR's cross-view consistency projector (RoIAlign 7x7 over the teacher's 4-level
weak-view features, strides 8/16/32/64: Semi-DETR's detr_ssod/models/dino_detr_ssod.py builds an
mmdet `SingleRoIExtractor` with `RoIAlign(output_size=7, sampling_ratio=0)`) and Co-DINO's RoI
head (docs/methods.md).

Semantics follow torchvision.ops.roi_align / mmcv RoIAlign (torchvision
csrc/ops/cpu/roi_align_kernel.cpp): with `aligned=True` a box edge at image pixel `x` sits at
feature coordinate `x * spatial_scale - 0.5` (pixel centres at integer coordinates); each of the
`PH x PW` bins averages `sampling_ratio x sampling_ratio` bilinear samples taken at the centres of
a regular sub-grid; a sample further than one pixel outside the map (`y < -1 or y > H`, same for
x) contributes 0, one in [-1, 0] is clamped to 0, and one past the last row/column reads the
last row/column.

Static shapes: torchvision's default `sampling_ratio=0` picks `ceil(roi_size / output_size)`
samples per bin, a data-dependent count; under `jit` the sample grid must be static, so a fixed
`sampling_ratio > 0` is required (2 is the usual choice, as Detectron2's ROIAlignV2 heads).

Implementation: every sample's four bilinear neighbours are gathered from the features
flattened to [B, S, C] (all levels concatenated for the multi-level variant, so each box reads
only its own level in one gather). Peak memory is about `B * N * PH * PW * sampling_ratio^2 * 4 *
C` feature elements. Differentiable in the features (scatter-add) and in the boxes (through the
bilinear weights; torchvision returns no box gradient).
"""
import itertools
from typing import Sequence

import jax
import jax.numpy as jnp


def _check(output_size, sampling_ratio):
  if sampling_ratio is None or int(sampling_ratio) <= 0:
    raise ValueError(
        f"roi_align: sampling_ratio must be a fixed positive int (torchvision's adaptive 0 is "
        f"data-dependent and cannot have a static shape), got {sampling_ratio!r}")
  output_size = (output_size, output_size) if isinstance(output_size, int) else tuple(output_size)
  if len(output_size) != 2 or min(output_size) <= 0:
    raise ValueError(f"roi_align: output_size must be a positive int or (h, w), got {output_size!r}")
  return output_size, int(sampling_ratio)


def _axis_samples(start, end, num_bins, sampling_ratio, size, aligned):
  """Bilinear taps along one axis for every sample of every bin.

  Args:
    start, end: [B, N] box edges in feature coordinates (before the aligned offset).
    num_bins: output bins along this axis (static).
    sampling_ratio: samples per bin along this axis (static).
    size: [B, N] int32 feature-map extent along this axis (per box: its level's).
    aligned: torchvision's `aligned` flag (-0.5 pixel offset).

  Returns:
    (low, high) int32 [B, N, num_bins * sampling_ratio] neighbour indices and (w_low, w_high)
    float32 weights, already zero for samples outside [-1, size].
  """
  offset = 0.5 if aligned else 0.0
  start = start - offset
  extent = (end - offset) - start
  if not aligned:
    extent = jnp.maximum(extent, 1.0)  # torchvision forces malformed boxes to 1x1 when unaligned
  bin_size = extent / num_bins  # [B, N]
  # Sample centres: bin p, sub-sample i at start + p * bin + (i + 0.5) * bin / sampling_ratio.
  frac = (jnp.arange(num_bins * sampling_ratio, dtype=jnp.float32) + 0.5) / sampling_ratio
  coord = start[..., None] + frac * bin_size[..., None]  # [B, N, P*S]
  size = size[..., None].astype(jnp.float32)
  inside = (coord >= -1.0) & (coord <= size)
  coord = jnp.maximum(coord, 0.0)
  low = jnp.floor(coord)
  at_end = low >= size - 1.0
  low = jnp.where(at_end, size - 1.0, low)
  high = jnp.where(at_end, size - 1.0, low + 1.0)
  frac_high = jnp.where(at_end, 0.0, coord - low)
  w_high = jnp.where(inside, frac_high, 0.0)
  w_low = jnp.where(inside, 1.0 - frac_high, 0.0)
  return low.astype(jnp.int32), high.astype(jnp.int32), w_low, w_high


def _roi_align_flat(flat, start, height, width, boxes, scale, output_size, sampling_ratio,
                    aligned):
  """RoIAlign over features flattened to [B, S, C]; every box has its own map geometry.

  Args:
    flat: [B, S, C] features, each map stored row-major from offset `start`.
    start, height, width: [B, N] int32 offset, rows and columns of each box's map.
    boxes: [B, N, 4] float (x0, y0, x1, y1) image pixels.
    scale: [B, N] float spatial scale (1 / stride) of each box's map.

  Returns:
    [B, N, PH, PW, C] in flat's dtype.
  """
  (ph, pw), sr = output_size, sampling_ratio
  b, n = boxes.shape[:2]
  c = flat.shape[-1]
  boxes = boxes.astype(jnp.float32) * scale[..., None]
  y_lo, y_hi, wy_lo, wy_hi = _axis_samples(boxes[..., 1], boxes[..., 3], ph, sr, height, aligned)
  x_lo, x_hi, wx_lo, wx_hi = _axis_samples(boxes[..., 0], boxes[..., 2], pw, sr, width, aligned)
  ys = jnp.stack([y_lo, y_hi], axis=-1)  # [B, N, PH*S, 2]
  xs = jnp.stack([x_lo, x_hi], axis=-1)  # [B, N, PW*S, 2]
  wy = jnp.stack([wy_lo, wy_hi], axis=-1)
  wx = jnp.stack([wx_lo, wx_hi], axis=-1)
  # Flat index of every (y tap, x tap) neighbour: [B, N, PH*S, 2, PW*S, 2].
  index = (start[..., None, None, None, None]
           + ys[..., :, :, None, None] * width[..., None, None, None, None]
           + xs[..., None, None, :, :])
  weight = wy[..., :, :, None, None] * wx[..., None, None, :, :]
  gathered = jnp.take_along_axis(flat, index.reshape(b, -1)[..., None], axis=1)
  gathered = gathered.reshape(index.shape + (c,))
  # Weighted bilinear taps, then the mean over the S x S samples of each bin.
  value = jnp.einsum("bnyixjc,bnyixj->bnyxc", gathered.astype(jnp.float32), weight)
  value = value.reshape(b, n, ph, sr, pw, sr, c).sum(axis=(3, 5)) / float(sr * sr)
  return value.astype(flat.dtype)


def roi_align(features, boxes_xyxy, *, output_size=(7, 7), spatial_scale=1.0, sampling_ratio=2,
              aligned=True):
  """torchvision-style RoIAlign of per-image boxes on one feature map.

  Args:
    features: [B, H, W, C] feature map (NHWC).
    boxes_xyxy: [B, N, 4] float boxes (x0, y0, x1, y1) in the coordinates that
      `spatial_scale` maps to feature pixels (image pixels with spatial_scale = 1 / stride, or
      feature pixels with 1.0). Padded boxes are fine (any finite value); mask their outputs.
    output_size: int or (PH, PW) bins.
    spatial_scale: image -> feature coordinate factor.
    sampling_ratio: fixed samples per bin along each axis (> 0, see the module docstring).
    aligned: torchvision's `aligned` (True: -0.5 pixel offset, mmcv/mmdet's default).

  Returns:
    [B, N, PH, PW, C] pooled features in features' dtype.

  Raises:
    ValueError: sampling_ratio <= 0 or a bad output_size.
  """
  output_size, sampling_ratio = _check(output_size, sampling_ratio)
  b, h, w, c = features.shape
  n = boxes_xyxy.shape[1]
  full = lambda v, dtype: jnp.full((b, n), v, dtype)
  return _roi_align_flat(features.reshape(b, h * w, c), full(0, jnp.int32), full(h, jnp.int32),
                         full(w, jnp.int32), boxes_xyxy, full(spatial_scale, jnp.float32),
                         output_size, sampling_ratio, aligned)


def map_roi_levels(boxes_xyxy, num_levels, *, finest_scale=56.0):
  """FPN level of every box by its size, as mmdet's SingleRoIExtractor.map_roi_levels.

  `level = floor(log2(sqrt(w * h) / finest_scale + 1e-6))` clipped to [0, num_levels - 1]:
  boxes under 112 px go to the finest level, 112-224 px to the next, and so on.

  Args:
    boxes_xyxy: [..., 4] image-pixel boxes (x0, y0, x1, y1).
    num_levels: number of feature levels.
    finest_scale: mmdet's finest_scale (56).

  Returns:
    [...] int32 level indices.
  """
  w = boxes_xyxy[..., 2] - boxes_xyxy[..., 0]
  h = boxes_xyxy[..., 3] - boxes_xyxy[..., 1]
  # Degenerate boxes: mmdet's sqrt(negative) is NaN -> floor -> clamp; send them to level 0.
  scale = jnp.sqrt(jnp.maximum(w * h, 0.0))
  level = jnp.floor(jnp.log2(scale / finest_scale + 1e-6))
  return jnp.clip(level, 0, num_levels - 1).astype(jnp.int32)


def multi_level_roi_align(features: Sequence[jax.Array], boxes_xyxy, *, strides,
                          output_size=(7, 7), sampling_ratio=2, aligned=True, finest_scale=56.0,
                          levels=None):
  """RoIAlign of each box on the FPN level its size selects (mmdet SingleRoIExtractor).

  Args:
    features: sequence of [B, H_l, W_l, C] maps, finest first (Semi-DETR: strides 8/16/32/64).
    boxes_xyxy: [B, N, 4] float (x0, y0, x1, y1) image pixels.
    strides: per-level stride (spatial scale 1 / stride), same length as features.
    output_size, sampling_ratio, aligned: as `roi_align`.
    finest_scale: see `map_roi_levels`.
    levels: optional [B, N] int32 level per box, overriding `map_roi_levels`.

  Returns:
    [B, N, PH, PW, C] pooled features in the first map's dtype.

  Raises:
    ValueError: mismatched features / strides, differing batch or channel sizes, or bad
      sampling_ratio / output_size.
  """
  output_size, sampling_ratio = _check(output_size, sampling_ratio)
  if len(features) != len(strides) or not features:
    raise ValueError(f"multi_level_roi_align: got {len(features)} feature maps and "
                     f"{len(strides)} strides")
  if len({(f.shape[0], f.shape[-1]) for f in features}) != 1:
    raise ValueError("multi_level_roi_align: feature maps differ in batch or channel size: "
                     f"{[f.shape for f in features]}")
  b, c = features[0].shape[0], features[0].shape[-1]
  dtype = features[0].dtype
  flat = jnp.concatenate([f.reshape(b, -1, c).astype(dtype) for f in features], axis=1)
  heights = [f.shape[1] for f in features]
  widths = [f.shape[2] for f in features]
  starts = [0] + list(itertools.accumulate(h * w for h, w in zip(heights, widths)))[:-1]
  if levels is None:
    levels = map_roi_levels(boxes_xyxy, len(features), finest_scale=finest_scale)
  pick = lambda values, dtype: jnp.asarray(values, dtype)[levels]
  return _roi_align_flat(flat, pick(starts, jnp.int32), pick(heights, jnp.int32),
                         pick(widths, jnp.int32), boxes_xyxy,
                         pick([1.0 / s for s in strides], jnp.float32), output_size,
                         sampling_ratio, aligned)
