"""Tests of the host augmentation: exact box geometry, weak -> strong mapping, photometrics."""
import jax.numpy as jnp
import numpy as np
import pytest

from sized_detr_jax.data import transforms as T


def _square_image(h, w, box):
  """Black image with a white rectangle covering pixels of box (x0, y0, x1, y1) ints."""
  img = np.zeros((h, w, 3), np.uint8)
  x0, y0, x1, y1 = box
  img[y0:y1, x0:x1] = 255
  return img


def _pixel_box(img, thresh=127):
  ys, xs = np.nonzero(img[..., 0] > thresh)
  return np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], np.float64)


@pytest.mark.parametrize("h, w, size, max_size, expected", [
    (480, 640, 800, 1333, (800, 1066)),      # int(800 * 640 / 480)
    (640, 480, 800, 1333, (1066, 800)),
    (100, 500, 800, 1333, (267, 1333)),       # capped: size round(1333 / 5) = 267, 1335 -> 1333
    (600, 800, 600, 1333, (600, 800)),        # already there
    (300, 400, 600, None, (600, 800)),
])
def test_resize_output_size_hand_values(h, w, size, max_size, expected):
  assert T.resize_output_size(h, w, size, max_size) == expected


def test_flip_then_resize_moves_boxes_exactly():
  img = _square_image(30, 40, (5, 7, 17, 20))
  p = T._Planner(30, 40)
  p.hflip()
  p.resize(60)  # factor 2 exactly: 30x40 -> 60x80
  geom = p.geometry()
  assert geom.size == (60, 80)
  boxes, keep = T.transform_boxes(np.array([[5, 7, 17, 20]]), geom.matrix, geom.size)
  # By hand: flip x -> 40 - x gives [23, 7, 35, 20]; x2 gives [46, 14, 70, 40].
  np.testing.assert_array_equal(boxes, [[46, 14, 70, 40]])
  assert keep.all()
  np.testing.assert_array_equal(_pixel_box(T.apply_geometry(img, geom)), [46, 14, 70, 40])


def test_crop_shifts_clips_and_drops():
  p = T._Planner(50, 60)
  p.crop(10, 5, 30, 20)  # keeps x in [10, 40), y in [5, 25)
  geom = p.geometry()
  boxes = np.array([[12, 8, 20, 15], [0, 0, 15, 10], [45, 30, 55, 40], [10, 26, 20, 30]])
  out, keep = T.transform_boxes(boxes, geom.matrix, geom.size)
  np.testing.assert_array_equal(out[:2], [[2, 3, 10, 10], [0, 0, 5, 5]])
  np.testing.assert_array_equal(keep, [True, True, False, False])
  img = _square_image(50, 60, (12, 8, 20, 15))
  np.testing.assert_array_equal(_pixel_box(T.apply_geometry(img, geom)), [2, 3, 10, 10])


@pytest.mark.parametrize("seed", range(6))
def test_random_train_and_strong_views_keep_pixels_and_boxes_together(seed):
  rng = np.random.default_rng(seed)
  h, w = int(rng.integers(60, 120)), int(rng.integers(60, 120))
  box = (int(w * 0.3), int(h * 0.35), int(w * 0.6), int(h * 0.7))
  img = _square_image(h, w, box)
  cfg = T.AugmentConfig(scales=(64, 80, 96), max_size=150, crop_scales=(70, 90),
                        crop_size=(50, 70), strong_rotate=0.0, strong_shear=0.0)
  for geom in (T.plan_train_view(rng, h, w, cfg), T.plan_semi_view(rng, h, w, cfg, strong=True)):
    out = T.apply_geometry(img, geom)
    boxes, keep = T.transform_boxes(np.array([box]), geom.matrix, geom.size)
    if keep[0] and (out[..., 0] > 127).any():
      # Bilinear resampling blurs edges by under a pixel.
      np.testing.assert_allclose(_pixel_box(out), boxes[0], atol=1.0)


def test_rotation_pixels_follow_the_matrix():
  img = np.zeros((64, 64, 3), np.uint8)
  img[10:16, 40:46] = 255  # centroid (43, 13)
  cfg = T.AugmentConfig(scales=(64,), max_size=64, hflip_prob=0.0, strong_translate=0.0,
                        strong_shear=0.0, strong_rotate=30.0)
  for seed in range(20):
    geom = T.plan_semi_view(np.random.default_rng(seed), 64, 64, cfg, strong=True)
    if abs(geom.matrix[0, 1]) > 0.2:  # a real rotation was drawn
      break
  out = T.apply_geometry(img, geom).astype(np.float64)[..., 0]
  out = np.where(out > T.ERASE_FILL, out - T.ERASE_FILL, 0.0)  # ignore the corners' fill
  ys, xs = np.mgrid[:64, :64] + 0.5
  centroid = np.array([(xs * out).sum(), (ys * out).sum()]) / out.sum()
  expected = geom.matrix @ np.array([43.0, 13.0, 1.0])
  np.testing.assert_allclose(centroid, expected[:2], atol=0.3)
  assert geom.size == (64, 64)


@pytest.mark.parametrize("xp", [np, jnp])
def test_weak_to_strong_mapping_is_exact(xp):
  rng = np.random.default_rng(0)
  cfg = T.AugmentConfig(scales=(96, 128), max_size=200)
  checked = 0
  for _ in range(30):
    h, w = int(rng.integers(80, 160)), int(rng.integers(80, 160))
    gt = np.sort(rng.uniform(0, 1, (5, 2, 2)), axis=1).reshape(5, 4)[:, [0, 2, 1, 3]]
    gt = gt * np.array([w, h, w, h])  # xyxy in the original image
    weak = T.plan_semi_view(rng, h, w, cfg, strong=False)
    strong = T.plan_semi_view(rng, h, w, cfg, strong=True)
    wb, wkeep = T.transform_boxes(gt, weak.matrix, weak.size)
    sb, skeep = T.transform_boxes(gt, strong.matrix, strong.size)
    assert wkeep.all()  # the weak view is resize + flip: nothing leaves the image

    def norm_cxcywh(b, size):
      hh, ww = size
      return np.stack([(b[:, 0] + b[:, 2]) / 2 / ww, (b[:, 1] + b[:, 3]) / 2 / hh,
                       (b[:, 2] - b[:, 0]) / ww, (b[:, 3] - b[:, 1]) / hh], -1)

    mapped = T.map_boxes_between_views(
        xp.asarray(norm_cxcywh(wb, weak.size)), xp.asarray(weak.matrix, xp.float32),
        xp.asarray(strong.matrix, xp.float32), xp.asarray(weak.size, xp.float32),
        xp.asarray(strong.size, xp.float32), xp=xp)
    np.testing.assert_allclose(np.asarray(mapped)[skeep], norm_cxcywh(sb, strong.size)[skeep],
                               atol=2e-5)
    checked += int(skeep.sum())
  assert checked > 50


def _official_matrix(kind, params, h, w):
  """Semi-DETR's recorded matrix of a strong geometric op, from its own formulas (geo_utils.py
  `_get_shift_matrix` / cv2.getRotationMatrix2D / `_get_shear_matrix` with rand_aug.py's
  magnitudes), in float64, with the rotation centre moved to the continuous (w / 2, h / 2)."""
  if kind == "translate_x":
    return np.array([[1, 0, params[0] * w], [0, 1, 0], [0, 0, 1]], np.float64)
  if kind == "translate_y":
    return np.array([[1, 0, 0], [0, 1, params[0] * h], [0, 0, 1]], np.float64)
  if kind == "rotate":  # cv2.getRotationMatrix2D(center, -angle, 1)
    theta = np.deg2rad(-params[0])
    alpha, beta = np.cos(theta), np.sin(theta)
    cx, cy = w / 2, h / 2
    return np.array([[alpha, beta, (1 - alpha) * cx - beta * cy],
                     [-beta, alpha, beta * cx + (1 - alpha) * cy], [0, 0, 1]])
  mx = np.tanh(-params[0] * np.pi / 180)  # RandShear.apply, horizontal first
  my = np.tanh(params[1] * np.pi / 180)
  first = np.array([[1, mx, 0], [0, 1, 0], [0, 0, 1]], np.float64)
  second = np.array([[1, 0, 0], [my, 1, 0], [0, 0, 1]], np.float64)
  return second @ first  # geo_utils.apply: new = op @ previous


def test_strong_geometry_matches_the_official_matrices():
  cfg = T.AugmentConfig(scales=(64, 80), max_size=120, hflip_prob=0.5)
  kinds, shear_mags = [], []
  for seed in range(400):
    rng = np.random.default_rng(seed)
    h, w = int(rng.integers(50, 100)), int(rng.integers(50, 100))
    geom = T.plan_semi_view(np.random.default_rng(seed + 1000), h, w, cfg, strong=True)
    pre = np.eye(3)
    for op in geom.ops[:-1]:
      assert op[0] in ("resize", "hflip")
    _, mat, kind, params = geom.ops[-1]
    kinds.append(kind)
    vh, vw = geom.size
    # The matrix before the affine op (resize, flip) maps the original image to the view.
    pre = np.linalg.inv(mat) @ geom.matrix
    assert abs(pre[0, 1]) < 1e-12 and abs(pre[1, 0]) < 1e-12  # axis aligned
    np.testing.assert_allclose(mat, _official_matrix(kind, params, vh, vw), atol=1e-12)
    limit = {"translate_x": 0.1, "translate_y": 0.1, "rotate": 30.0, "shear_xy": 30.0}[kind]
    assert all(abs(p) <= limit for p in params)
    assert len(params) == (2 if kind == "shear_xy" else 1)
    if kind == "shear_xy":
      shear_mags += [abs(mat[0, 1]), abs(mat[1, 0])]
  counts = {k: kinds.count(k) for k in T.STRONG_AFFINES}
  assert all(70 <= c <= 130 for c in counts.values()), counts  # OneOf: 100 each expected
  assert max(shear_mags) <= np.tanh(np.pi / 6) + 1e-12 and max(shear_mags) > 0.4


def test_erase_patches_match_the_official_draws():
  cfg = T.AugmentConfig(erase_patches=(1, 4), erase_max_size=0.2)
  counts = []
  for seed in range(300):
    h, w = 60 + seed % 37, 80 + seed % 53
    patches = T.plan_erase(np.random.default_rng(seed), h, w, cfg)
    # numpy reference of RandErase.get_magnitude with the same Generator stream.
    ref_rng = np.random.default_rng(seed)
    n = int(ref_rng.integers(1, 5))
    assert len(patches) == n
    counts.append(n)
    for x0, y0, x1, y1 in patches:
      r = ref_rng.uniform(0.0, 0.2)
      ph, pw = int(r * h), int(r * w)
      px, py = ref_rng.integers(0, w - pw), ref_rng.integers(0, h - ph)
      assert (x0, y0, x1, y1) == (px, py, px + pw, py + ph)
      assert 0 <= x0 and x1 < w and 0 <= y0 and y1 < h  # randint's exclusive upper bound
      # One ratio for both sides: the patch has the image's aspect, not a square.
      assert abs((y1 - y0) / h - (x1 - x0) / w) < 1.0 / min(h, w) + 1e-9
  assert set(counts) == {1, 2, 3, 4} and all(c > 45 for c in np.bincount(counts)[1:])
  img = np.zeros((30, 40, 3), np.uint8)
  out = T.erase(img, [(2, 3, 10, 7), (5, 5, 6, 20), (0, 0, 0, 4)])
  want = np.zeros((30, 40), bool)
  want[3:7, 2:10] = want[5:20, 5:6] = True
  np.testing.assert_array_equal((out == T.ERASE_FILL).all(-1), want)
  assert not img.any()  # the input is not modified


def test_strong_view_order_colour_and_erasing():
  img = np.random.default_rng(1).integers(0, 256, (40, 50, 3), dtype=np.uint8)
  cfg = T.AugmentConfig(scales=(40,), max_size=100, hflip_prob=0.0, erase_patches=(2, 2),
                        erase_max_size=0.3, blur_prob=1.0)
  geom = T.plan_semi_view(np.random.default_rng(0), 40, 50, cfg, strong=True)
  a = T.apply_strong_view(np.random.default_rng(5), img, geom, cfg)
  b = T.apply_strong_view(np.random.default_rng(5), img, geom, cfg)
  np.testing.assert_array_equal(a, b)
  assert a.shape == img.shape and a.dtype == np.uint8
  # Without blur and erasing, the two orders are colour(affine(x)) and affine(colour(x)).
  cfg = T.AugmentConfig(scales=(40,), max_size=100, hflip_prob=0.0, erase_patches=(0, 0))
  orders = set()
  for seed in range(40):
    rng = np.random.default_rng(seed)
    geom = T.plan_semi_view(rng, 40, 50, cfg, strong=True)
    out = T.apply_strong_view(np.random.default_rng(seed), img, geom, cfg)
    ref = np.random.default_rng(seed)
    colour_first = ref.random() < 0.5
    if colour_first:
      want = T.apply_geometry(T.random_color_op(ref, img), geom)
    else:
      want = T.random_color_op(ref, T.apply_geometry(img, geom))
    np.testing.assert_array_equal(out, want)
    orders.add(bool(colour_first))
  assert orders == {True, False}
  ops = set()
  for s in range(60):  # every colour op is reachable and keeps the shape
    r = np.random.default_rng(s)
    ops.add(T.COLOR_OPS[int(np.random.default_rng(s).integers(len(T.COLOR_OPS)))])
    assert T.random_color_op(r, img).shape == img.shape
  assert ops == set(T.COLOR_OPS)


def test_normalize_image():
  img = np.array([[[0, 128, 255]]], np.uint8)
  expected = (np.array([0, 128, 255]) / 255.0 - [0.485, 0.456, 0.406]) / [0.229, 0.224, 0.225]
  np.testing.assert_allclose(T.normalize_image(img)[0, 0], expected, rtol=1e-6)
