"""Co-DINO's anchors, delta coder, ATSS / max-IoU assigners and random sampler against float64
numpy re-derivations of mmdet's algorithms (loops over images and ground truth)."""
import numpy as np
import jax
import jax.numpy as jnp
import pytest

from sized_detr_jax.co_dino import anchors as anchors_lib
from sized_detr_jax.co_dino import assigners


def _iou(a, b):
  """float64 pairwise IoU [N, 4] x [M, 4] xyxy."""
  lt = np.maximum(a[:, None, :2], b[None, :, :2])
  rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
  wh = np.clip(rb - lt, 0, None)
  inter = wh[..., 0] * wh[..., 1]
  area = lambda x: np.clip(x[:, 2] - x[:, 0], 0, None) * np.clip(x[:, 3] - x[:, 1], 0, None)
  return inter / np.maximum(area(a)[:, None] + area(b)[None] - inter, 1e-7)


def _atss_reference(anchors, valid, level_sizes, gts, topk):
  """mmdet ATSSAssigner.assign on the usable anchors of one image (float64)."""
  usable = np.flatnonzero(valid)
  a_use = anchors[usable]
  level = np.repeat(np.arange(len(level_sizes)), level_sizes)[usable]
  result = np.full(len(anchors), assigners.IGNORE)
  result[usable] = assigners.NEGATIVE
  if len(gts) == 0:
    return result
  overlaps = _iou(a_use, gts)  # [N, G]
  ac = (a_use[:, :2] + a_use[:, 2:]) / 2
  gc = (gts[:, :2] + gts[:, 2:]) / 2
  dist = np.sqrt(((ac[:, None] - gc[None]) ** 2).sum(-1))
  cands = []
  for lvl in range(len(level_sizes)):
    ids = np.flatnonzero(level == lvl)
    k = min(topk, len(ids))
    order = np.argsort(dist[ids], axis=0, kind="stable")[:k]
    cands.append(ids[order])
  cands = np.concatenate(cands, axis=0)  # [K, G]
  best_iou = np.full((len(a_use),), -np.inf)
  best_gt = np.full((len(a_use),), -1)
  for g in range(len(gts)):
    c = cands[:, g]
    ov = overlaps[c, g]
    thr = ov.mean() + (ov.std(ddof=1) if len(ov) > 1 else np.nan)
    for anchor, o in zip(c, ov):
      x, y = ac[anchor]
      inside = min(x - gts[g, 0], y - gts[g, 1], gts[g, 2] - x, gts[g, 3] - y) > 0.01
      if o >= thr and inside and o > best_iou[anchor]:
        best_iou[anchor], best_gt[anchor] = o, g
  result[usable[best_gt >= 0]] = best_gt[best_gt >= 0]
  return result


def _max_iou_reference(anchors, valid, gts, pos_thr, neg_thr, min_pos, low_quality):
  usable = np.flatnonzero(valid)
  result = np.full(len(anchors), assigners.IGNORE)
  if len(gts) == 0:
    result[usable] = assigners.NEGATIVE
    return result
  ov = _iou(gts, anchors[usable])  # [G, N] as mmdet
  assigned = np.full(len(usable), assigners.IGNORE)
  max_ov, arg = ov.max(0), ov.argmax(0)
  assigned[(max_ov >= 0) & (max_ov < neg_thr)] = assigners.NEGATIVE
  assigned[max_ov >= pos_thr] = arg[max_ov >= pos_thr]
  if low_quality:
    for g in range(len(gts)):
      if ov[g].max() >= min_pos:
        # Ties at the best IoU (symmetric anchors) are exact in exact arithmetic; float32 and
        # float64 round them differently, so a tie here is within 1e-6.
        assigned[ov[g] >= ov[g].max() - 1e-6] = g
  result[usable] = assigned
  return result


def _random_gts(rng, b, g, extent):
  """[B, G, 4] xyxy boxes of varied sizes inside [0, extent]^2, and a validity mask."""
  c = rng.uniform(0.1 * extent, 0.9 * extent, (b, g, 2))
  wh = extent * np.exp(rng.uniform(np.log(0.05), np.log(0.8), (b, g, 2)))
  boxes = np.concatenate([c - wh / 2, c + wh / 2], -1).clip(0, extent)
  valid = rng.uniform(size=(b, g)) < 0.8
  valid[0, 0] = True
  return boxes, valid


GRID = anchors_lib.anchor_grid([(16, 16), (8, 8), (4, 4), (2, 2)], [8, 16, 32, 64],
                               octave_base_scale=8)
IMAGE = np.array([[128.0, 128.0], [100.0, 72.0], [128.0, 50.0]])  # (h, w): padding in 1 and 2


def test_anchor_grid_matches_mmdet_layout():
  grid = anchors_lib.anchor_grid([(2, 3)], [16], octave_base_scale=4, scales_per_octave=3,
                                 ratios=(0.5, 1.0, 2.0))
  assert grid.boxes.shape == (2 * 3 * 9, 4) and grid.level_sizes == (54,)
  # Location (row 1, col 2) = centre (32, 16); anchor 4 = ratio 1.0, scale 4 * 2^(1/3).
  box = grid.boxes[(1 * 3 + 2) * 9 + 4]
  side = 16 * 4 * 2 ** (1 / 3)
  np.testing.assert_allclose(box, [32 - side / 2, 16 - side / 2, 32 + side / 2, 16 + side / 2],
                             rtol=1e-6)
  # Ratio 0.5 (h/w): w = s * scale / sqrt(0.5), h = s * scale * sqrt(0.5).
  box = grid.boxes[0]
  np.testing.assert_allclose([box[2] - box[0], box[3] - box[1]],
                             [64 / np.sqrt(0.5), 64 * np.sqrt(0.5)], rtol=1e-6)
  valid = np.asarray(anchors_lib.anchor_valid(grid, jnp.asarray([[20.0, 33.0]])))
  expect = np.array([[x * 16 < 33 and y * 16 < 20 for y in range(2) for x in range(3)
                      for _ in range(9)]])
  np.testing.assert_array_equal(valid, expect)


def test_delta_coder_round_trip_and_clamp():
  rng = np.random.default_rng(0)
  a = np.concatenate([rng.uniform(0, 50, (20, 2)), rng.uniform(60, 100, (20, 2))], -1)
  g = np.concatenate([rng.uniform(0, 50, (20, 2)), rng.uniform(60, 100, (20, 2))], -1)
  stds = (0.1, 0.1, 0.2, 0.2)
  d = np.asarray(anchors_lib.encode_deltas(jnp.asarray(a), jnp.asarray(g), stds))
  aw, ah = a[:, 2] - a[:, 0], a[:, 3] - a[:, 1]
  gw, gh = g[:, 2] - g[:, 0], g[:, 3] - g[:, 1]
  ref = np.stack([((g[:, 0] + g[:, 2]) - (a[:, 0] + a[:, 2])) / 2 / aw,
                  ((g[:, 1] + g[:, 3]) - (a[:, 1] + a[:, 3])) / 2 / ah,
                  np.log(gw / aw), np.log(gh / ah)], -1) / np.array(stds)
  np.testing.assert_allclose(d, ref, rtol=1e-5, atol=1e-5)
  back = anchors_lib.decode_deltas(jnp.asarray(a), jnp.asarray(d), stds)
  np.testing.assert_allclose(back, g, rtol=1e-4, atol=1e-3)
  big = anchors_lib.decode_deltas(jnp.asarray([[0.0, 0, 10, 10]]), jnp.asarray([[0.0, 0, 100, 0]]))
  np.testing.assert_allclose(np.asarray(big)[0, 2] - np.asarray(big)[0, 0], 10 * 1000 / 16,
                             rtol=1e-4)
  clipped = anchors_lib.decode_deltas(jnp.asarray([[[0.0, 0, 10, 10]]]),
                                      jnp.asarray([[[0.0, 0, 3, 3]]]),
                                      image_size=jnp.asarray([[40.0, 30.0]]))
  np.testing.assert_allclose(clipped[0, 0], [0, 0, 30, 40])


@pytest.fixture(scope="module")
def atss_fn():
  return jax.jit(lambda v, g, gv: assigners.atss_assign(jnp.asarray(GRID.boxes), v,
                                                        GRID.level_sizes, g, gv, topk=9))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_atss_matches_numpy_reference(atss_fn, seed):
  rng = np.random.default_rng(seed)
  gts, gt_valid = _random_gts(rng, 3, 6, 128.0)
  valid = np.asarray(anchors_lib.anchor_valid(GRID, jnp.asarray(IMAGE, jnp.float32)))
  got, _ = atss_fn(jnp.asarray(valid), jnp.asarray(gts, jnp.float32), jnp.asarray(gt_valid))
  got = np.asarray(got)
  total_pos = 0
  for i in range(3):
    cols = np.flatnonzero(gt_valid[i])
    ref = _atss_reference(GRID.boxes.astype(np.float64), valid[i], GRID.level_sizes,
                          gts[i][cols], 9)
    ref = np.where(ref >= 0, cols[np.maximum(ref, 0)], ref)
    np.testing.assert_array_equal(got[i], ref)
    total_pos += (ref >= 0).sum()
  assert total_pos > 10  # the cases exercise positives


def test_atss_hand_built_case(atss_fn):
  # One GT exactly on a level-1 anchor (stride 16, side 128, location (64, 64)): the IoU-1
  # anchor is positive and assigned to it; a padded GT column gets nothing.
  gts = np.zeros((3, 6, 4), np.float32)
  gts[:, 0] = [0, 0, 128, 128]
  gts[:, 1] = [10, 10, 20, 20]
  gt_valid = np.zeros((3, 6), bool)
  gt_valid[:, 0] = True
  valid = np.ones((3, len(GRID.boxes)), bool)
  got, iou = atss_fn(jnp.asarray(valid), jnp.asarray(gts), jnp.asarray(gt_valid))
  exact = np.flatnonzero(np.all(GRID.boxes == [0, 0, 128, 128], axis=-1))
  assert len(exact) == 1
  assert np.all(np.asarray(got)[:, exact[0]] == 0)
  assert np.all(np.asarray(got) != 1)
  np.testing.assert_allclose(np.asarray(iou)[0, exact[0], 0], 1.0)
  # No valid GT: every usable anchor negative, unusable ignored.
  valid[1, :10] = False
  got, _ = atss_fn(jnp.asarray(valid), jnp.asarray(gts), jnp.zeros((3, 6), bool))
  got = np.asarray(got)
  assert np.all(got[1, :10] == assigners.IGNORE) and np.all(got[1, 10:] == assigners.NEGATIVE)


@pytest.mark.parametrize("low_quality,thr", [(True, (0.7, 0.3, 0.3)), (False, (0.5, 0.5, 0.5))])
def test_max_iou_matches_numpy_reference(low_quality, thr):
  rng = np.random.default_rng(3)
  grid = anchors_lib.anchor_grid([(8, 8), (4, 4)], [16, 32], octave_base_scale=4,
                                 scales_per_octave=3, ratios=(0.5, 1.0, 2.0))
  gts, gt_valid = _random_gts(rng, 3, 5, 128.0)
  gt_valid[2] = False  # an image without ground truth
  valid = np.asarray(anchors_lib.anchor_valid(grid, jnp.asarray(IMAGE, jnp.float32)))
  got, _ = assigners.max_iou_assign(jnp.asarray(grid.boxes), jnp.asarray(valid),
                                    jnp.asarray(gts, jnp.float32), jnp.asarray(gt_valid),
                                    pos_iou_thr=thr[0], neg_iou_thr=thr[1], min_pos_iou=thr[2],
                                    match_low_quality=low_quality)
  got = np.asarray(got)
  for i in range(3):
    cols = np.flatnonzero(gt_valid[i])
    ref = _max_iou_reference(grid.boxes.astype(np.float64), valid[i], gts[i][cols], *thr,
                             low_quality)
    ref = np.where(ref >= 0, cols[np.maximum(ref, 0)] if len(cols) else 0, ref)
    np.testing.assert_array_equal(got[i], ref)
  assert (got >= 0).sum() >= 3


def test_max_iou_low_quality_later_gt_overwrites():
  # Two identical GTs: both reach their best IoU on the same anchor; mmdet's loop leaves the
  # later one. Their max IoU 0.5 is below pos_iou_thr, so only the low-quality rule assigns.
  anchors = jnp.asarray([[0.0, 0, 10, 10], [0, 0, 10, 20], [50, 50, 60, 60]])
  gts = jnp.asarray([[[0.0, 0, 10, 5], [0, 0, 10, 5]]])
  got, max_iou = assigners.max_iou_assign(anchors, jnp.ones((1, 3), bool), gts,
                                          jnp.ones((1, 2), bool), pos_iou_thr=0.7,
                                          neg_iou_thr=0.3, min_pos_iou=0.3,
                                          match_low_quality=True)
  np.testing.assert_allclose(max_iou[0], [0.5, 0.25, 0.0])
  np.testing.assert_array_equal(got[0], [1, assigners.NEGATIVE, assigners.NEGATIVE])


def test_random_sample_counts_and_uniformity():
  gt_index = np.full((2, 40), assigners.NEGATIVE)
  gt_index[0, :6] = 0  # 6 positives < 8 wanted: all taken, 10 negatives fill up
  gt_index[1, :20] = 1  # 20 positives > 8: 8 drawn
  gt_index[1, 20:35] = assigners.IGNORE  # only 5 negatives left for 8 slots
  gt_index = jnp.asarray(gt_index, jnp.int32)
  sample = jax.jit(jax.vmap(lambda k: assigners.random_sample(k, gt_index, num=16,
                                                              pos_fraction=0.5)))
  s = sample(jax.random.split(jax.random.PRNGKey(0), 2000))
  idx, pos, valid = (np.asarray(x) for x in s)
  np.testing.assert_array_equal(pos.sum(-1)[:, 0], 6)
  np.testing.assert_array_equal(valid.sum(-1)[:, 0], 16)
  np.testing.assert_array_equal(pos.sum(-1)[:, 1], 8)
  np.testing.assert_array_equal(valid.sum(-1)[:, 1], 13)
  g = np.asarray(gt_index)
  for t in range(5):
    for i in range(2):
      chosen = idx[t, i][valid[t, i]]
      assert len(set(chosen)) == len(chosen)
      np.testing.assert_array_equal(g[i][idx[t, i][pos[t, i]]] >= 0, True)
      np.testing.assert_array_equal(g[i][idx[t, i][valid[t, i] & ~pos[t, i]]],
                                    assigners.NEGATIVE)
  # Each of image 1's 20 positives is drawn with probability 8/20 (binomial sd ~0.011).
  freq = np.array([(idx[:, 1][pos[:, 1]] == j).sum() for j in range(20)]) / 2000
  np.testing.assert_allclose(freq, 0.4, atol=0.05)
  # Image 0's 34 negatives fill 10 slots: probability 10/34 each.
  neg = idx[:, 0][valid[:, 0] & ~pos[:, 0]]
  freq = np.array([(neg == j).sum() for j in range(6, 40)]) / 2000
  np.testing.assert_allclose(freq, 10 / 34, atol=0.05)


def _greedy_nms(boxes, scores, thr):
  keep = []
  for i in np.argsort(-scores, kind="stable"):
    if all(_iou(boxes[i:i + 1], boxes[j:j + 1])[0, 0] <= thr for j in keep):
      keep.append(i)
  return keep


def test_rpn_proposals_match_numpy_reference():
  from sized_detr_jax.co_dino import heads  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(5)
  grid = anchors_lib.anchor_grid([(6, 6), (3, 3)], [16, 32], octave_base_scale=4,
                                 scales_per_octave=1, ratios=(0.5, 1.0))
  a = len(grid.boxes)
  objectness = rng.normal(size=(2, a)).astype(np.float32)
  deltas = (0.3 * rng.normal(size=(2, a, 4))).astype(np.float32)
  size = np.array([[96.0, 96.0], [70.0, 50.0]], np.float32)
  boxes, scores, valid = jax.jit(lambda o, d, s: heads.rpn_proposals(
      o, d, grid, s, nms_pre=20, max_proposals=15, nms_iou=0.5))(objectness, deltas, size)
  for i in range(2):
    kept_boxes, kept_scores, start = [], [], 0
    for n in grid.level_sizes:
      order = np.argsort(-objectness[i, start:start + n], kind="stable")[:20] + start
      start += n
      anc = grid.boxes[order].astype(np.float64)
      d = deltas[i, order].astype(np.float64)
      w, h = anc[:, 2] - anc[:, 0], anc[:, 3] - anc[:, 1]
      cx, cy = anc[:, 0] + w / 2 + w * d[:, 0], anc[:, 1] + h / 2 + h * d[:, 1]
      bw, bh = w * np.exp(d[:, 2]), h * np.exp(d[:, 3])
      dec = np.stack([cx - bw / 2, cy - bh / 2, cx + bw / 2, cy + bh / 2], -1)
      dec = np.clip(dec, 0, [size[i, 1], size[i, 0], size[i, 1], size[i, 0]])
      ok = (dec[:, 2] > dec[:, 0]) & (dec[:, 3] > dec[:, 1])
      dec, sc = dec[ok], objectness[i, order][ok]
      keep = _greedy_nms(dec, sc, 0.5)
      kept_boxes.append(dec[keep])
      kept_scores.append(sc[keep])
    kb, ks = np.concatenate(kept_boxes), np.concatenate(kept_scores)
    top = np.argsort(-ks, kind="stable")[:15]
    n_ref = len(top)
    assert int(np.sum(valid[i])) == n_ref
    np.testing.assert_allclose(np.asarray(boxes[i])[:n_ref], kb[top], rtol=1e-4, atol=1e-3)
    np.testing.assert_allclose(np.asarray(scores[i])[:n_ref], 1 / (1 + np.exp(-ks[top])),
                               rtol=1e-5)


def test_positive_query_selection_slots():
  from sized_detr_jax.co_dino import model  # pylint: disable=g-import-not-at-top
  gt_index = np.full((3, 30), assigners.NEGATIVE)
  gt_index[0, 3:23] = 2  # 20 positives > 12 slots: a random subset of 12, no padding
  gt_index[1, :4] = 0  # 4 positives, then negatives up to the batch's 12 used slots
  gt_index[2, :] = assigners.IGNORE
  gt_index[2, :2] = 1  # 2 positives, 3 negatives: fewer candidates than used slots
  gt_index[2, 10:13] = assigners.NEGATIVE
  boxes = np.tile(np.arange(30, dtype=np.float32)[None, :, None], (3, 1, 4))
  sel = jax.jit(lambda k: model.select_positive_queries(
      k, jnp.asarray(gt_index, jnp.int32), jnp.asarray(boxes), num_slots=12, min_slots=9))(
          jax.random.PRNGKey(0))
  sel = jax.tree.map(np.asarray, sel)
  np.testing.assert_array_equal(sel["positive"].sum(1), [12, 4, 2])
  np.testing.assert_array_equal(sel["valid"].sum(1), [12, 12, 5])
  for i in range(3):
    picked = sel["boxes_xyxy"][i, :, 0].astype(int)[sel["valid"][i]]
    assert len(set(picked)) == len(picked)
    np.testing.assert_array_equal(gt_index[i][picked[:sel["positive"][i].sum()]] >= 0, True)
    np.testing.assert_array_equal(gt_index[i][picked[sel["positive"][i].sum():]],
                                  assigners.NEGATIVE)
    np.testing.assert_array_equal(sel["gt_index"][i][sel["positive"][i]],
                                  gt_index[i][picked[:sel["positive"][i].sum()]])
  assert np.all(sel["gt_index"][~sel["positive"]] == -1)
  # Few positives everywhere: the used slot count is clipped up to min_slots (9).
  small = np.where(gt_index == 2, assigners.NEGATIVE, gt_index)
  sel = model.select_positive_queries(jax.random.PRNGKey(1), jnp.asarray(small, jnp.int32),
                                      jnp.asarray(boxes), num_slots=12, min_slots=9)
  np.testing.assert_array_equal(np.asarray(sel["valid"]).sum(1), [9, 9, 5])


def test_positive_query_slots_are_counted_per_device_group():
  """Co-DETR counts the used slots per GPU: with a group per device shard, each group pads to
  its own max positives (clipped to [min_slots, num_slots])."""
  from sized_detr_jax.co_dino import model  # pylint: disable=g-import-not-at-top
  gt_index = np.full((4, 30), assigners.NEGATIVE)
  for i, count in enumerate([10, 2, 3, 1]):
    gt_index[i, :count] = 0
  boxes = np.tile(np.arange(30, dtype=np.float32)[None, :, None], (4, 1, 4))
  args = (jax.random.PRNGKey(0), jnp.asarray(gt_index, jnp.int32), jnp.asarray(boxes))
  one = model.select_positive_queries(*args, num_slots=12, min_slots=2)
  two = model.select_positive_queries(*args, num_slots=12, min_slots=2, num_groups=2)
  np.testing.assert_array_equal(np.asarray(one["valid"]).sum(1), [10, 10, 10, 10])
  np.testing.assert_array_equal(np.asarray(two["valid"]).sum(1), [10, 10, 3, 3])
  np.testing.assert_array_equal(np.asarray(two["positive"]).sum(1), [10, 2, 3, 1])
  mesh = jax.make_mesh((4,), ("data",), axis_types=(jax.sharding.AxisType.Auto,),
                       devices=jax.devices()[:4])
  with jax.set_mesh(mesh):  # the trainer's context: one group per device shard
    assert model._device_groups(4) == 4 and model._device_groups(6) == 1  # pylint: disable=protected-access
  assert model._device_groups(4) == 1  # pylint: disable=protected-access
