"""Semi-DETR pseudo-labels: static NMS vs a numpy greedy NMS, the adaptive thresholds on
hand-built scores, and the weak -> strong box mapping vs a float64 numpy corner mapping."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sized_detr_jax.semi import pseudo_labels as pl


def _iou(a, b):
  iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
  ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
  inter = iw * ih
  union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
  return inter / max(union, 1e-7)


def _greedy_nms(boxes, scores, labels, candidate, thr):
  """Textbook greedy NMS (mmcv semantics: suppress when IoU > thr), float64."""
  order = sorted(np.flatnonzero(candidate), key=lambda i: (-scores[i], i))
  kept = []
  for i in order:
    if all(labels[j] != labels[i] or _iou(boxes[j], boxes[i]) <= thr for j in kept):
      kept.append(i)
  keep = np.zeros(len(scores), bool)
  keep[kept] = True
  return keep, kept


def _random_boxes(rng, shape, extent=40.0):
  xy = rng.uniform(0, extent, shape + (2,))
  wh = rng.uniform(2, 15, shape + (2,))
  return np.concatenate([xy, xy + wh], -1).astype(np.float32)


def test_class_wise_nms_matches_greedy():
  rng = np.random.default_rng(0)
  b, k = 3, 60
  boxes = _random_boxes(rng, (b, k), extent=20.0)  # crowded: many overlaps, long chains
  scores = rng.uniform(size=(b, k)).astype(np.float32)
  scores[0, 5] = scores[0, 9]  # a tie
  labels = rng.integers(0, 2, (b, k)).astype(np.int32)
  candidate = rng.uniform(size=(b, k)) > 0.1
  keep = np.asarray(jax.jit(functools.partial(pl.class_wise_nms, iou_threshold=0.5))(
      boxes, scores, labels, candidate))
  for i in range(b):
    want, _ = _greedy_nms(boxes[i], scores[i], labels[i], candidate[i], 0.5)
    np.testing.assert_array_equal(keep[i], want)
    assert 0 < want.sum() < candidate[i].sum()  # the case suppresses something


@pytest.fixture(scope="module")
def outputs():
  rng = np.random.default_rng(1)
  b, q, c = 2, 14, 3
  logits = rng.normal(-1.0, 2.0, (b, q, c)).astype(np.float32)
  logits[1] = -9.0  # image 1: every score < 0.01 except two pairs
  logits[1, 3, 0], logits[1, 7, 2] = 2.0, 0.5
  centres = rng.uniform(0.3, 0.7, (b, q, 2))
  sizes = rng.uniform(0.1, 0.5, (b, q, 2))
  boxes = np.concatenate([centres, sizes], -1).astype(np.float32)
  boxes[0, 7:] = boxes[0, :7] + rng.uniform(-0.01, 0.01, (7, 4))  # near-duplicates: suppressed
  boxes[0, 2] = [0.95, 0.5, 0.3, 0.2]  # crosses the right border: clipped
  return {"pred_logits": logits, "pred_boxes": boxes}


def _reference_detections(outputs, size, max_det, score_thr=0.01, iou_thr=0.6):
  """Every (query, class) pair, mmdet multiclass_nms style, float64."""
  logits = np.asarray(outputs["pred_logits"], np.float64)
  probs = 1.0 / (1.0 + np.exp(-logits))
  result = []
  for i in range(logits.shape[0]):
    h, w = size[i]
    cx, cy, bw, bh = np.asarray(outputs["pred_boxes"][i], np.float64).T
    xyxy = np.stack([cx - bw / 2, cy - bh / 2, cx + bw / 2, cy + bh / 2], -1) * [w, h, w, h]
    xyxy = np.clip(xyxy, 0, [w, h, w, h])
    q, c = probs[i].shape
    pair_boxes = np.repeat(xyxy, c, axis=0)
    pair_scores = probs[i].reshape(-1)
    pair_labels = np.tile(np.arange(c), q)
    _, kept = _greedy_nms(pair_boxes, pair_scores, pair_labels, pair_scores > score_thr, iou_thr)
    kept = kept[:max_det]
    result.append((pair_scores[kept], pair_labels[kept], pair_boxes[kept]))
  return result


@pytest.mark.parametrize("num_candidates", [42, 9])
def test_nms_detections_match_reference(outputs, num_candidates):
  size = np.array([[40, 60], [50, 30]], np.int32)
  det = jax.jit(functools.partial(pl.teacher_detections, max_detections=8,
                                  num_candidates=num_candidates))(outputs, size)
  want = _reference_detections(outputs, size, 8)
  for i, (scores, labels, boxes) in enumerate(want):
    n = len(scores)
    valid = np.asarray(det["valid"][i])
    if bool(det["exact"][i]):
      assert valid.sum() == n and valid[:n].all()
      np.testing.assert_allclose(det["scores"][i][:n], scores, rtol=1e-5)
      np.testing.assert_array_equal(det["labels"][i][:n], labels)
      np.testing.assert_allclose(det["boxes_xyxy"][i][:n], boxes, atol=1e-4)
  assert bool(det["exact"][1])  # only two candidates pass 0.01
  assert np.asarray(det["valid"][1]).sum() == 2
  if num_candidates == 42:  # all pairs enter NMS: exact, and NMS removed some of them
    assert bool(det["exact"][0])
    assert len(_reference_detections(outputs, size, 100)[0][0]) < 40


def test_topk_detections(outputs):
  size = np.array([[40, 60], [50, 30]], np.int32)
  det = pl.teacher_detections(outputs, size, method="topk", max_detections=5)
  probs = 1 / (1 + np.exp(-outputs["pred_logits"].astype(np.float64)))
  for i in range(2):
    np.testing.assert_allclose(det["scores"][i], np.sort(probs[i].ravel())[::-1][:5], rtol=1e-5)
  assert float(det["boxes_xyxy"][..., 2].max()) <= 60.0


def test_thresholds_hand_built():
  scores = np.zeros((3, 14), np.float32)
  scores[0, :13] = [0.5, 0.45, 0.41, 0.39, 0.3, 0.05, 0.02, 0.01, 0.01, 0.01, 0.01, 0.01, 0.01]
  scores[0, 13] = 0.99  # padded slot: ignored in the statistics and never selected
  scores[1, 0] = 0.7
  scores[2, :3] = [0.35, 0.05, 0.05]
  valid = np.zeros((3, 14), bool)
  valid[0, :13], valid[1, 0], valid[2, :3] = True, True, True
  boxes = np.tile(np.array([1.0, 1.0, 5.0, 5.0], np.float32), (3, 14, 1))
  boxes[0, 1] = [3.0, 3.0, 3.0, 6.0]  # zero width: never a pseudo-label
  det = {"scores": scores, "valid": valid, "boxes_xyxy": boxes}
  initial, final = pl.select_pseudo_labels(det, final_threshold=0.4)
  s = scores[0, :13].astype(np.float64)
  thr = s.mean() + s.std(ddof=1)  # 0.3719: 0.39 is in the initial set but not the final one
  assert 0.3 < thr < 0.39
  want = np.zeros(14, bool)
  want[[0, 2, 3]] = True
  np.testing.assert_array_equal(initial[0], want)
  want[3] = False
  np.testing.assert_array_equal(final[0], want)
  assert not np.asarray(initial[1]).any()  # one detection: std undefined, nothing kept
  assert np.asarray(initial[2]).tolist() == [True] + [False] * 13  # mean + std = 0.3232
  assert not np.asarray(final[2]).any()  # 0.35 < 0.4


def _affine(scale=1.0, flip_w=None, angle=0.0, tx=0.0, ty=0.0, centre=(0.0, 0.0)):
  m = np.diag([scale, scale, 1.0])
  if flip_w is not None:
    m = np.array([[-1.0, 0, flip_w], [0, 1, 0], [0, 0, 1]]) @ m
  c, s = np.cos(np.radians(angle)), np.sin(np.radians(angle))
  cx, cy = centre
  rot = np.array([[c, -s, cx - c * cx + s * cy + tx], [s, c, cy - s * cx - c * cy + ty],
                  [0, 0, 1]])
  return rot @ m


def test_pseudo_targets_mapping_exact(outputs):
  # Original image 100 x 80 (h x w). Weak: resize 0.5 + flip -> 50 x 40. Strong: resize 0.6,
  # rotate 20 degrees about the centre, shift -> 60 x 48.
  weak_m = _affine(0.5, flip_w=40.0)
  strong_m = _affine(0.6, angle=20.0, tx=3.0, ty=-4.0, centre=(24.0, 30.0))
  b = 2
  weak = {"size": np.array([[50, 40]] * b, np.int32),
          "matrix": np.stack([weak_m] * b).astype(np.float32)}
  strong = {"size": np.array([[60, 48]] * b, np.int32),
            "matrix": np.stack([strong_m] * b).astype(np.float32)}
  fn = jax.jit(functools.partial(pl.pseudo_targets, max_pseudo=6, max_detections=8,
                                 num_candidates=42, final_threshold=0.3))
  tgt = fn(outputs, weak, strong)
  assert tgt["boxes"].shape == (2, 6, 4) and tgt["valid"].shape == (2, 6)
  rel = strong_m @ np.linalg.inv(weak_m)
  wx = np.asarray(tgt["weak_boxes_xyxy"], np.float64)
  for i in range(b):
    for j in range(6):
      x0, y0, x1, y1 = wx[i, j]
      corners = np.array([[x0, y0, 1], [x1, y0, 1], [x0, y1, 1], [x1, y1, 1]]) @ rel.T
      lo = np.clip(corners[:, :2].min(0), 0, [48, 60])
      hi = np.clip(corners[:, :2].max(0), 0, [48, 60])
      want = np.array([(lo[0] + hi[0]) / 2 / 48, (lo[1] + hi[1]) / 2 / 60,
                       (hi[0] - lo[0]) / 48, (hi[1] - lo[1]) / 60])
      if tgt["initial_valid"][i, j]:
        np.testing.assert_allclose(tgt["boxes"][i, j], want, atol=2e-5)
  # Sets: final within initial; both only where the detection scores say so.
  initial, valid = np.asarray(tgt["initial_valid"]), np.asarray(tgt["valid"])
  assert initial.any() and not (valid & ~initial).any()
  assert (np.asarray(tgt["scores"])[valid] >= 0.3).all()
  # Weak-view boxes: the detections' pixels normalised by the weak size.
  np.testing.assert_allclose(np.asarray(tgt["weak_boxes"])[..., 2] * 40,
                             wx[..., 2] - wx[..., 0], atol=1e-4)


def test_no_gradient_to_teacher(outputs):
  weak = {"size": np.array([[50, 40]] * 2, np.int32), "matrix": np.stack([np.eye(3)] * 2)}

  def f(logits, boxes):
    tgt = pl.pseudo_targets({"pred_logits": logits, "pred_boxes": boxes}, weak, weak,
                            method="topk", max_pseudo=4, max_detections=5)
    return jnp.sum(tgt["boxes"]) + jnp.sum(tgt["scores"])

  grads = jax.grad(f, argnums=(0, 1))(jnp.asarray(outputs["pred_logits"]),
                                      jnp.asarray(outputs["pred_boxes"]))
  assert all(float(jnp.abs(g).max()) == 0.0 for g in grads)


def test_bad_method(outputs):
  with pytest.raises(ValueError, match="method"):
    pl.teacher_detections(outputs, np.array([[4, 4]] * 2), method="soft_nms")


def test_mapping_with_planned_semi_views():
  """Teacher boxes = the weak view's exact image of original boxes; after the mapping they
  must equal the original boxes transformed straight into the strong view (the weak view is
  axis aligned, so the composition is exact), for every planned strong jitter kind."""
  from sized_detr_jax.data import transforms
  cfg = transforms.AugmentConfig(scales=(48, 64), max_size=96)
  h, w = 90, 120
  orig = np.array([[10, 12, 50, 40], [60, 30, 110, 85], [5, 50, 30, 88], [40, 5, 80, 30]],
                  np.float64)
  g = len(orig)
  weak_m, strong_m, weak_s, strong_s, teacher_boxes, want = [], [], [], [], [], []
  for seed in range(8):  # covers translate, rotate and shear strong views
    rng = np.random.default_rng(seed)
    weak = transforms.plan_semi_view(rng, h, w, cfg, strong=False)
    strong = transforms.plan_semi_view(rng, h, w, cfg, strong=True)
    wb, keep = transforms.transform_boxes(orig, weak.matrix, weak.size)
    assert keep.all()
    wh, ww = weak.size
    teacher_boxes.append(np.stack([(wb[:, 0] + wb[:, 2]) / 2 / ww, (wb[:, 1] + wb[:, 3]) / 2 / wh,
                                   (wb[:, 2] - wb[:, 0]) / ww, (wb[:, 3] - wb[:, 1]) / wh], -1))
    sb, _ = transforms.transform_boxes(orig, strong.matrix, strong.size)
    sh, sw = strong.size
    want.append(np.stack([(sb[:, 0] + sb[:, 2]) / 2 / sw, (sb[:, 1] + sb[:, 3]) / 2 / sh,
                          (sb[:, 2] - sb[:, 0]) / sw, (sb[:, 3] - sb[:, 1]) / sh], -1))
    weak_m.append(weak.matrix)
    strong_m.append(strong.matrix)
    weak_s.append(weak.size)
    strong_s.append(strong.size)
  n = len(want)
  logits = np.full((n, g, g), -10.0, np.float32)
  logits[:, np.arange(g), np.arange(g)] = 6.0 - np.arange(g)  # query i: class i, rank i
  outputs = {"pred_logits": logits, "pred_boxes": np.asarray(teacher_boxes, np.float32)}
  weak = {"size": np.asarray(weak_s, np.int32), "matrix": np.asarray(weak_m, np.float32)}
  strong = {"size": np.asarray(strong_s, np.int32), "matrix": np.asarray(strong_m, np.float32)}
  tgt = pl.pseudo_targets(outputs, weak, strong, method="topk", max_pseudo=g, max_detections=g)
  np.testing.assert_array_equal(tgt["labels"], np.tile(np.arange(g), (n, 1)))
  np.testing.assert_allclose(tgt["boxes"], np.asarray(want), atol=3e-5)


@pytest.mark.slow
def test_truncation_counts_and_step_metrics(outputs):
  """Boxes of the initial / final sets beyond `max_pseudo` are counted per image (numpy
  re-derivation of the sets from the detections), and the step's metrics average them."""
  from sized_detr_jax.semi import step as semi_step
  size = np.array([[50, 40]] * 2, np.int32)
  view = {"size": size, "matrix": np.stack([np.eye(3, dtype=np.float32)] * 2)}
  k = 8
  det = pl.teacher_detections(outputs, size, max_detections=k, num_candidates=42)
  scores, valid = np.asarray(det["scores"], np.float64), np.asarray(det["valid"])
  boxes = np.asarray(det["boxes_xyxy"])
  for m in (1, 2, k):
    tgt = pl.pseudo_targets(outputs, view, view, max_pseudo=m, max_detections=k,
                            num_candidates=42, final_threshold=0.1)
    for i in range(2):
      s = scores[i][valid[i]]
      thr = s.mean() + s.std(ddof=1) if len(s) >= 2 else np.inf
      positive = (boxes[i, :, 2] > boxes[i, :, 0]) & (boxes[i, :, 3] > boxes[i, :, 1])
      initial = valid[i] & positive & (scores[i] >= thr)
      final = initial & (scores[i] >= 0.1)
      assert int(tgt["metric_pseudo_dropped"][i]) == initial[m:].sum()
      assert int(tgt["metric_pseudo_final_dropped"][i]) == final[m:].sum()
    if m == 1:
      assert int(np.sum(tgt["metric_pseudo_dropped"])) > 0
    metrics = semi_step.pseudo_metrics(tgt)
    dropped = np.asarray(tgt["metric_pseudo_dropped"], np.float64)
    assert float(metrics["metric_pseudo_dropped"]) == pytest.approx(dropped.mean())
    assert float(metrics["metric_pseudo_truncated"]) == pytest.approx((dropped > 0).mean())
    assert float(metrics["metric_pseudo_final_dropped"]) == pytest.approx(
        np.asarray(tgt["metric_pseudo_final_dropped"], np.float64).mean())
