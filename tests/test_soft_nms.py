"""soft_nms against a float64 numpy transliteration of mmcv's CPU kernel (softnms_cpu, run as
mmcv's batched_nms runs it: one call over all classes with class-offset boxes)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sized_detr_jax import soft_nms as soft_nms_lib


def _np_soft_nms(boxes, scores, iou_threshold=0.8, sigma=0.5, min_score=1e-3, method="linear"):
  """mmcv's softnms_cpu loop (swaps included) in float64 -> (kept indices, decayed scores)."""
  x1, y1, x2, y2 = (np.array(boxes[:, i], np.float64) for i in range(4))
  sc = np.array(scores, np.float64)
  areas = (x2 - x1) * (y2 - y1)
  inds = np.arange(len(sc))
  n = len(sc)
  out_scores = []
  arrays = (x1, y1, x2, y2, sc, areas, inds)
  i = 0
  while i < n:
    max_pos = i + int(np.argmax(sc[i:n]))  # first maximum, as the strict `<` scan
    for a in arrays:
      a[i], a[max_pos] = a[max_pos], a[i]
    out_scores.append(sc[i])
    pos = i + 1
    while pos < n:
      iw = max(0.0, min(x2[i], x2[pos]) - max(x1[i], x1[pos]))
      ih = max(0.0, min(y2[i], y2[pos]) - max(y1[i], y1[pos]))
      inter = iw * ih
      union = areas[i] + areas[pos] - inter
      ovr = inter / union if union > 0 else np.nan
      if method == "linear":
        weight = 1 - ovr if ovr >= iou_threshold else 1.0
      elif method == "gaussian":
        weight = np.exp(-(ovr * ovr) / sigma)
      else:
        weight = 0.0 if ovr >= iou_threshold else 1.0
      sc[pos] *= weight
      if sc[pos] < min_score:
        for a in arrays:
          a[pos] = a[n - 1]
        n -= 1
        pos -= 1
      pos += 1
    i += 1
  return inds[:n].copy(), np.array(out_scores[:n])


def _np_batched_soft_nms(boxes, scores, labels, **kw):
  """mmcv batched_nms: shift each class by label * (max coordinate + 1), one soft-NMS call."""
  boxes = np.float64(boxes)
  shifted = boxes + (labels * (boxes.max() + 1.0))[:, None]
  return _np_soft_nms(shifted, scores, **kw)


def _random_case(rng, n, n_classes):
  """Clusters of jittered boxes (IoUs on both sides of 0.8), a few scores below 1e-3."""
  centres = rng.uniform(50, 450, (n // 5, 2))
  sizes = rng.uniform(20, 120, (n // 5, 2))
  pick = rng.integers(0, n // 5, n)
  c = centres[pick] + rng.normal(0, 4, (n, 2))
  s = sizes[pick] * rng.uniform(0.85, 1.15, (n, 2))
  boxes = np.concatenate([c - s / 2, c + s / 2], 1).astype(np.float32)
  scores = rng.uniform(0, 1, n).astype(np.float32)
  scores[rng.uniform(size=n) < 0.1] *= 1e-3
  labels = rng.integers(0, n_classes, n).astype(np.int32)
  return boxes, scores, labels


def _check(got, ref_index, ref_scores, k):
  """Same picks and decayed scores; a differing index is accepted only at a tie."""
  got_index, got_scores, got_valid = (np.asarray(got[key]) for key in ("index", "scores", "valid"))
  m = min(k, len(ref_index))
  np.testing.assert_array_equal(got_valid, np.arange(k) < m)
  np.testing.assert_allclose(got_scores[:m], ref_scores[:m], rtol=1e-5, atol=1e-7)
  np.testing.assert_array_equal(got_scores[m:], 0.0)
  differ = got_index[:m] != ref_index[:m]
  assert np.all(np.abs(ref_scores[:m][differ] - got_scores[:m][differ]) < 1e-6)
  assert differ.sum() <= 2, differ.sum()
  return m


@pytest.mark.parametrize("method", ["linear", "gaussian"])
def test_soft_nms_matches_mmcv_kernel_on_random_boxes(method):
  rng = np.random.default_rng(0)
  cases = [_random_case(rng, 200, 4) for _ in range(2)]
  boxes, scores, labels = (np.stack(x) for x in zip(*cases))
  fn = jax.jit(lambda b, s, l: soft_nms_lib.soft_nms(b, s, l, max_output=200, method=method))
  got = fn(jnp.asarray(boxes), jnp.asarray(scores), jnp.asarray(labels))
  assert got["index"].shape == (2, 200)
  for i in range(2):
    ref_index, ref_scores = _np_batched_soft_nms(boxes[i], scores[i], labels[i], method=method)
    m = _check(jax.tree.map(lambda x: x[i], got), ref_index, ref_scores, 200)
    assert 100 < m < 200  # some dropped by min_score, the output padded
    # Some picks really decayed (linear: a same-class overlap >= 0.8 came before them).
    index, out = np.asarray(got["index"][i][:m]), np.asarray(got["scores"][i][:m])
    assert np.sum(out < scores[i][index] * (1 - 1e-4)) >= 5


def test_soft_nms_keeps_the_first_k_picks():
  rng = np.random.default_rng(1)
  boxes, scores, labels = _random_case(rng, 100, 3)
  got = jax.jit(lambda b, s, l: soft_nms_lib.soft_nms(b, s, l, max_output=20))(
      jnp.asarray(boxes), jnp.asarray(scores), jnp.asarray(labels))
  ref_index, ref_scores = _np_batched_soft_nms(boxes, scores, labels)
  _check(got, ref_index, ref_scores, 20)


def test_soft_nms_hand_computed():
  # A and B (class 0) overlap with IoU 0.9 -> B decays to 0.8 * 0.1; C (class 1) is A's twin but
  # of another class -> untouched; D (class 0) overlaps A with IoU 0.5 < 0.8 -> untouched; E is
  # below min_score -> dropped.
  boxes = jnp.array([[0, 0, 10, 10], [0, 0, 10, 9], [0, 0, 10, 10], [5, 0, 15, 10],
                     [50, 50, 60, 60]], jnp.float32)
  d_iou = 50.0 / 150.0
  assert d_iou < 0.8
  scores = jnp.array([0.9, 0.8, 0.7, 0.6, 5e-4])
  labels = jnp.array([0, 0, 1, 0, 2])
  out = soft_nms_lib.soft_nms(boxes, scores, labels, max_output=5)
  np.testing.assert_array_equal(out["index"][:4], [0, 2, 3, 1])
  np.testing.assert_allclose(out["scores"], [0.9, 0.7, 0.6, 0.8 * 0.1, 0.0], rtol=1e-5)
  np.testing.assert_array_equal(out["valid"], [True, True, True, True, False])
  with pytest.raises(ValueError, match="method"):
    soft_nms_lib.soft_nms(boxes, scores, method="hard")


def test_co_dino_postprocess_against_numpy():
  rng = np.random.default_rng(2)
  b, q, c = 2, 40, 5
  logits = rng.normal(0, 2, (b, q, c)).astype(np.float32)
  boxes = np.concatenate([rng.uniform(0.1, 0.9, (b, q, 2)), rng.uniform(0.05, 0.5, (b, q, 2))],
                         -1).astype(np.float32)
  # Near-duplicate queries (IoU ~0.9) with similar logits: same-class pairs both in the top-60.
  boxes[:, q // 2:] = boxes[:, :q // 2] + rng.normal(0, 0.002, (b, q // 2, 4))
  logits[:, q // 2:] = logits[:, :q // 2] + rng.normal(0, 0.1, (b, q // 2, c))
  sizes = np.array([[300, 400], [200, 100]], np.int32)
  got = jax.jit(lambda o, s: soft_nms_lib.co_dino_postprocess(o, s, num_pre=60, num_select=50))(
      {"pred_logits": jnp.asarray(logits), "pred_boxes": jnp.asarray(boxes)}, jnp.asarray(sizes))
  for i in range(b):
    prob = 1 / (1 + np.exp(-np.float64(logits[i]))).ravel()
    order = np.argsort(-prob, kind="stable")[:60]
    qi, ci = order // c, order % c
    h, w = sizes[i]
    cx, cy, bw, bh = np.float64(boxes[i, qi]).T
    xyxy = np.stack([np.clip((cx - bw / 2) * w, 0, w), np.clip((cy - bh / 2) * h, 0, h),
                     np.clip((cx + bw / 2) * w, 0, w), np.clip((cy + bh / 2) * h, 0, h)], -1)
    ref_index, ref_scores = _np_batched_soft_nms(xyxy, prob[order], ci)
    m = min(50, len(ref_index))
    valid = np.asarray(got["valid"][i])
    np.testing.assert_array_equal(valid, np.arange(50) < m)
    # Decayed scores s * (1 - IoU) at IoU ~0.96 inherit float32 box rounding: absolute 2e-6.
    np.testing.assert_allclose(np.asarray(got["scores"][i][:m]), ref_scores[:m], rtol=1e-5,
                               atol=2e-6)
    assert np.sum(ref_scores[:m] < prob[order][ref_index[:m]] * (1 - 1e-4)) >= 1  # decays
    np.testing.assert_array_equal(np.asarray(got["labels"][i][:m]), ci[ref_index[:m]])
    np.testing.assert_allclose(np.asarray(got["boxes_xyxy"][i][:m]), xyxy[ref_index[:m]],
                               rtol=1e-5, atol=1e-3)
    np.testing.assert_allclose(np.asarray(got["boxes_xywh"][i][:m, 2:]),
                               xyxy[ref_index[:m], 2:] - xyxy[ref_index[:m], :2], atol=1e-3)
