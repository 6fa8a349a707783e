"""Sine position embeddings and mask down-sampling vs hand computations."""
import math

import numpy as np
import jax.numpy as jnp

from sized_detr_jax.models import position_encoding as pe


def test_sine_position_embedding_hand_computed():
  # One 3x4 image whose last column and last row are padding: 2x3 real pixels.
  mask = np.zeros((1, 3, 4), bool)
  mask[0, :2, :3] = True
  f, t = 4, 20.0
  got = np.asarray(pe.sine_position_embedding(jnp.asarray(mask), num_pos_feats=f, temperature=t))
  assert got.shape == (1, 3, 4, 2 * f)
  # Real pixel (row 1, col 0): y = 2/2 * 2pi, x = 1/3 * 2pi.
  y, x = 2 * math.pi, 1 / 3 * 2 * math.pi
  dims = [t ** (2 * (k // 2) / f) for k in range(f)]
  want_y = [math.sin(y / dims[k]) if k % 2 == 0 else math.cos(y / dims[k]) for k in range(f)]
  want_x = [math.sin(x / dims[k]) if k % 2 == 0 else math.cos(x / dims[k]) for k in range(f)]
  np.testing.assert_allclose(got[0, 1, 0], want_y + want_x, atol=1e-5)


def test_padding_does_not_change_real_pixels():
  small = np.ones((1, 4, 5), bool)
  big = np.zeros((1, 7, 9), bool)
  big[0, :4, :5] = True
  a = np.asarray(pe.sine_position_embedding(jnp.asarray(small)))
  b = np.asarray(pe.sine_position_embedding(jnp.asarray(big)))
  np.testing.assert_allclose(b[:, :4, :5], a, atol=1e-6)


def test_box_embedding_order_and_values():
  box = jnp.asarray([[0.1, 0.2, 0.3, 0.4]])
  got = np.asarray(pe.sine_embedding_of_boxes(box, num_pos_feats=2))
  # Order (y, x, w, h); feature 0 = sin(2pi v), feature 1 = cos(2pi v) (both at T^0).
  want = []
  for v in (0.2, 0.1, 0.3, 0.4):
    want += [math.sin(2 * math.pi * v), math.cos(2 * math.pi * v)]
  np.testing.assert_allclose(got[0], want, atol=1e-6)


def test_downsample_mask_nearest_floor():
  mask = np.zeros((1, 8, 6), bool)
  mask[0, :5, :3] = True
  got = np.asarray(pe.downsample_mask(jnp.asarray(mask), (3, 2)))
  # Rows read 0, 2, 5 (floor(i*8/3)); columns read 0, 3.
  want = mask[:, [0, 2, 5]][:, :, [0, 3]]
  np.testing.assert_array_equal(got, want)
