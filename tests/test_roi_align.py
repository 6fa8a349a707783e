"""RoIAlign against a float64 loop re-derivation of torchvision's CPU kernel
(csrc/ops/cpu/roi_align_kernel.cpp), and mmdet's level mapping."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sized_detr_jax.models import roi_align as ra


def _bilinear(fmap, y, x):
  """torchvision bilinear_interpolate on one [H, W, C] map, float64."""
  h, w = fmap.shape[:2]
  if y < -1.0 or y > h or x < -1.0 or x > w:
    return np.zeros(fmap.shape[-1])
  y, x = max(y, 0.0), max(x, 0.0)
  y_low, x_low = int(y), int(x)
  if y_low >= h - 1:
    y_high = y_low = h - 1
    y = float(y_low)
  else:
    y_high = y_low + 1
  if x_low >= w - 1:
    x_high = x_low = w - 1
    x = float(x_low)
  else:
    x_high = x_low + 1
  ly, lx = y - y_low, x - x_low
  hy, hx = 1.0 - ly, 1.0 - lx
  return (hy * hx * fmap[y_low, x_low] + hy * lx * fmap[y_low, x_high]
          + ly * hx * fmap[y_high, x_low] + ly * lx * fmap[y_high, x_high])


def _reference(fmap, box, out=(7, 7), scale=1.0, sr=2, aligned=True):
  fmap = np.asarray(fmap, np.float64)
  offset = 0.5 if aligned else 0.0
  x0, y0, x1, y1 = [float(v) * scale - offset for v in box]
  rw, rh = x1 - x0, y1 - y0
  if not aligned:
    rw, rh = max(rw, 1.0), max(rh, 1.0)
  bh, bw = rh / out[0], rw / out[1]
  result = np.zeros(out + (fmap.shape[-1],))
  for py in range(out[0]):
    for px in range(out[1]):
      acc = 0.0
      for iy in range(sr):
        y = y0 + py * bh + (iy + 0.5) * bh / sr
        for ix in range(sr):
          x = x0 + px * bw + (ix + 0.5) * bw / sr
          acc = acc + _bilinear(fmap, y, x)
      result[py, px] = acc / (sr * sr)
  return result


@pytest.fixture(scope="module")
def data():
  rng = np.random.default_rng(0)
  feats = rng.normal(size=(2, 9, 11, 3)).astype(np.float32)
  boxes = np.array([
      [[1.0, 2.0, 6.0, 7.5], [0.0, 0.0, 11.0, 9.0], [-3.0, -2.0, 4.0, 3.0],   # over the border
       [8.0, 6.0, 14.0, 12.0], [5.0, 5.0, 5.2, 5.1], [3.0, 4.0, 2.0, 1.0]],   # tiny, inverted
      [[10.5, 8.5, 11.0, 9.0], [-1.5, -1.5, 0.2, 0.3], [2.2, 3.3, 9.9, 8.1],  # at the far edge
       [12.0, 10.0, 20.0, 20.0], [0.3, 0.7, 10.6, 8.4], [4.0, 1.0, 4.0, 1.0]]],  # fully outside
      np.float32)
  return feats, boxes


@pytest.mark.parametrize("aligned,sr,scale,out", [(True, 2, 1.0, (7, 7)),
                                                  (False, 3, 0.5, (3, 4))])
def test_single_level_matches_torchvision_reference(data, aligned, sr, scale, out):
  feats, boxes = data
  got = np.asarray(jax.jit(lambda f, b: ra.roi_align(
      f, b, output_size=out, spatial_scale=scale, sampling_ratio=sr, aligned=aligned))(
          feats, boxes))
  assert got.shape == (2, 6) + out + (3,)
  want = np.stack([np.stack([_reference(feats[i], boxes[i, j], out, scale, sr, aligned)
                             for j in range(6)]) for i in range(2)])
  np.testing.assert_allclose(got, want, atol=2e-5)
  if scale == 1.0:
    assert np.abs(want[1, 3]).max() == 0.0  # the fully-outside box reads nothing
    assert np.abs(want[0, 2]).max() > 0.0


def test_level_mapping_as_mmdet():
  sides = np.array([10.0, 111.0, 112.5, 224.0, 300.0, 447.0, 448.5, 2000.0])
  boxes = np.stack([np.zeros_like(sides), np.zeros_like(sides), sides, sides], -1)
  want = np.clip(np.floor(np.log2(sides / 56.0 + 1e-6)), 0, 3)
  np.testing.assert_array_equal(np.asarray(ra.map_roi_levels(jnp.asarray(boxes), 4)), want)


def test_multi_level_picks_each_boxes_level(data):
  feats, _ = data
  rng = np.random.default_rng(1)
  strides = (8, 16, 32, 64)
  # A 64 x 96 image: maps 8x12, 4x6, 2x3, 1x2 (rounded up as a conv pyramid would).
  maps = [rng.normal(size=(2, math.ceil(64 / s), math.ceil(96 / s), 3)).astype(np.float32)
          for s in strides]
  boxes = np.array([[[4, 6, 40, 50], [0, 0, 96, 64], [10, 10, 150, 130], [-20, 5, 300, 250]],
                    [[30, 20, 34, 25], [60, 2, 95, 63], [0, 0, 250, 250], [1, 1, 600, 600]]],
                   np.float32)
  got = np.asarray(jax.jit(lambda m, b: ra.multi_level_roi_align(
      m, b, strides=strides, sampling_ratio=2))(maps, boxes))
  for i in range(2):
    for j in range(4):
      x0, y0, x1, y1 = boxes[i, j]
      level = int(np.clip(np.floor(np.log2(math.sqrt((x1 - x0) * (y1 - y0)) / 56 + 1e-6)), 0, 3))
      want = _reference(maps[level][i], boxes[i, j], scale=1.0 / strides[level])
      np.testing.assert_allclose(got[i, j], want, atol=2e-5, err_msg=f"box {i},{j} L{level}")
  levels = np.asarray(ra.map_roi_levels(jnp.asarray(boxes), 4))
  assert len(set(levels.ravel().tolist())) >= 3  # the case covers several levels


@pytest.mark.slow
def test_gradients_finite(data):
  feats, boxes = data

  def loss(f, b):
    return jnp.sum(ra.roi_align(f, b, output_size=(2, 2), sampling_ratio=2) ** 2)

  gf, gb = jax.grad(loss, argnums=(0, 1))(jnp.asarray(feats), jnp.asarray(boxes))
  assert np.all(np.isfinite(gf)) and np.all(np.isfinite(gb))
  assert np.abs(gf).sum() > 0


def test_rejects_adaptive_sampling(data):
  feats, boxes = data
  with pytest.raises(ValueError, match="sampling_ratio"):
    ra.roi_align(feats, boxes, sampling_ratio=0)
