"""Co-DINO's auxiliary-head and positive-query losses against float64 numpy re-derivations, the
padded positive-query slots carrying no box loss, the loss weights, and the Sized L1 switch
acting on the main head's terms only (criterion level, no model)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sized_detr_jax import criterion as criterion_lib
from sized_detr_jax.co_dino import aux_losses
from sized_detr_jax.co_dino import config as co_config
from sized_detr_jax.co_dino import criterion as co_criterion

RNG = np.random.default_rng(0)


def _sigmoid(x):
  return 1 / (1 + np.exp(-x))


def _focal(x, t, alpha=0.25, gamma=2.0):
  p = _sigmoid(x)
  ce = -(t * np.log(p) + (1 - t) * np.log(1 - p))
  pt = p * t + (1 - p) * (1 - t)
  return (alpha * t + (1 - alpha) * (1 - t)) * ce * (1 - pt) ** gamma


def _bce(x, t):
  p = _sigmoid(x)
  return -(t * np.log(p) + (1 - t) * np.log(1 - p))


def _decode(anchors, deltas, stds):
  d = deltas * np.asarray(stds)
  pw, ph = anchors[..., 2] - anchors[..., 0], anchors[..., 3] - anchors[..., 1]
  px, py = anchors[..., 0] + pw / 2, anchors[..., 1] + ph / 2
  clip = abs(np.log(16 / 1000))
  gw = pw * np.exp(np.clip(d[..., 2], -clip, clip))
  gh = ph * np.exp(np.clip(d[..., 3], -clip, clip))
  gx, gy = px + pw * d[..., 0], py + ph * d[..., 1]
  return np.stack([gx - gw / 2, gy - gh / 2, gx + gw / 2, gy + gh / 2], -1)


def _giou(a, b):
  lt, rb = np.maximum(a[..., :2], b[..., :2]), np.minimum(a[..., 2:], b[..., 2:])
  inter = np.prod(np.clip(rb - lt, 0, None), -1)
  area = lambda x: np.prod(np.clip(x[..., 2:] - x[..., :2], 0, None), -1)
  union = area(a) + area(b) - inter
  enc = np.prod(np.clip(np.maximum(a[..., 2:], b[..., 2:]) - np.minimum(a[..., :2], b[..., :2]),
                        0, None), -1)
  return inter / union - (enc - union) / enc


def _boxes(shape, lo=0.0, hi=100.0):
  p = RNG.uniform(lo, hi, shape + (2,))
  wh = RNG.uniform(5, 40, shape + (2,))
  return np.concatenate([p, p + wh], -1)


def test_atss_losses_match_numpy():
  b, a, c = 2, 30, 3
  anchors = _boxes((a,))
  gt = anchors[None] + RNG.uniform(-3, 3, (b, a, 4))  # centres stay inside
  labels = np.where(RNG.uniform(size=(b, a)) < 0.3, RNG.integers(0, c, (b, a)), -1)
  labels[1] = -1  # an image without positives: counts as 1 in the normaliser (mmdet)
  valid = RNG.uniform(size=(b, a)) < 0.9
  head = {"cls_logits": RNG.normal(size=(b, a, c)), "deltas": RNG.normal(size=(b, a, 4)),
          "centerness": RNG.normal(size=(b, a)), "anchors": anchors, "valid": valid,
          "labels": labels, "gt_boxes_xyxy": gt}
  got = aux_losses.atss_losses(jax.tree.map(lambda x: jnp.asarray(x, x.dtype if x.dtype == bool
                                                                    else None), head))
  pos = valid & (labels >= 0)
  onehot = np.eye(c)[np.maximum(labels, 0)] * (labels >= 0)[..., None]
  n = sum(max(p, 1) for p in pos.sum(1))
  cls = (_focal(head["cls_logits"], onehot) * valid[..., None]).sum() / n
  cx, cy = (anchors[:, 0] + anchors[:, 2]) / 2, (anchors[:, 1] + anchors[:, 3]) / 2
  lr = np.stack([cx - gt[..., 0], gt[..., 2] - cx], -1)
  tb = np.stack([cy - gt[..., 1], gt[..., 3] - cy], -1)
  ctr = np.sqrt(lr.min(-1) / lr.max(-1) * tb.min(-1) / tb.max(-1))
  pred = _decode(np.broadcast_to(anchors, (b, a, 4)), head["deltas"], (0.1, 0.1, 0.2, 0.2))
  giou = ((1 - _giou(pred, gt)) * ctr * pos).sum() / (ctr * pos).sum()
  ctr_loss = (_bce(head["centerness"], ctr) * pos).sum() / n
  np.testing.assert_allclose(got["loss_atss_cls"], cls, rtol=1e-5)
  np.testing.assert_allclose(got["loss_atss_giou"], giou, rtol=1e-5)
  np.testing.assert_allclose(got["loss_atss_centerness"], ctr_loss, rtol=1e-5)


def test_rpn_and_roi_losses_match_numpy():
  b, s, c = 2, 12, 4
  anchors = _boxes((b, s))
  gt = anchors + RNG.uniform(-4, 4, (b, s, 4))
  valid = RNG.uniform(size=(b, s)) < 0.8
  positive = valid & (RNG.uniform(size=(b, s)) < 0.5)
  rpn = {"logits": RNG.normal(size=(b, s)), "deltas": RNG.normal(size=(b, s, 4)) * 0.1,
         "anchors": anchors, "gt_boxes_xyxy": gt, "positive": positive, "valid": valid}
  got = aux_losses.rpn_losses(jax.tree.map(jnp.asarray, rpn))
  aw, ah = anchors[..., 2] - anchors[..., 0], anchors[..., 3] - anchors[..., 1]
  gw, gh = gt[..., 2] - gt[..., 0], gt[..., 3] - gt[..., 1]
  target = np.stack([((gt[..., 0] + gt[..., 2]) - (anchors[..., 0] + anchors[..., 2])) / 2 / aw,
                     ((gt[..., 1] + gt[..., 3]) - (anchors[..., 1] + anchors[..., 3])) / 2 / ah,
                     np.log(gw / aw), np.log(gh / ah)], -1)
  count = valid.sum()
  np.testing.assert_allclose(got["loss_rpn_cls"],
                             (_bce(rpn["logits"], positive) * valid).sum() / count, rtol=1e-5)
  np.testing.assert_allclose(got["loss_rpn_bbox"],
                             (np.abs(rpn["deltas"] - target).sum(-1) * positive).sum() / count,
                             rtol=1e-4)

  labels = np.where(positive, RNG.integers(0, c, (b, s)), -1)
  roi = {"cls_logits": RNG.normal(size=(b, s, c + 1)), "deltas": RNG.normal(size=(b, s, c, 4)),
         "rois": anchors, "labels": labels, "gt_boxes_xyxy": gt, "positive": positive,
         "valid": valid}
  got = aux_losses.roi_losses(jax.tree.map(jnp.asarray, roi))
  logits = roi["cls_logits"]
  logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  tgt = np.where(positive, labels, c)
  ce = -np.take_along_axis(logp, tgt[..., None], -1)[..., 0]
  deltas = np.take_along_axis(roi["deltas"], np.maximum(labels, 0)[..., None, None], 2)[:, :, 0]
  giou = 1 - _giou(_decode(anchors, deltas, (0.1, 0.1, 0.2, 0.2)), gt)
  np.testing.assert_allclose(got["loss_roi_cls"], (ce * valid).sum() / count, rtol=1e-5)
  np.testing.assert_allclose(got["loss_roi_giou"], (giou * positive).sum() / count, rtol=1e-5)


def _queries(b=2, n=6, c=3, layers=2):
  cxcy = RNG.uniform(0.3, 0.7, (b, n, 2))
  wh = RNG.uniform(0.05, 0.3, (b, n, 2))
  valid = np.array([[True] * 5 + [False], [True] * 3 + [False] * 3])
  positive = valid & np.array([[1, 1, 0, 1, 0, 0], [1, 0, 0, 0, 0, 0]], bool)
  queries = {"labels": np.where(positive, RNG.integers(0, c, (b, n)), -1),
             "boxes": np.concatenate([cxcy, wh], -1).astype(np.float32),
             "positive": positive, "valid": valid}
  extra = {"pred_logits": RNG.normal(size=(layers, b, n, c)).astype(np.float32),
           "pred_boxes": np.concatenate([RNG.uniform(0.3, 0.7, (layers, b, n, 2)),
                                         RNG.uniform(0.05, 0.3, (layers, b, n, 2))],
                                        -1).astype(np.float32)}
  return extra, queries


@pytest.mark.parametrize("bbox_loss", ["l1", "sized_l1"])
def test_positive_query_losses_match_numpy(bbox_loss):
  extra, q = _queries()
  cfg = criterion_lib.CriterionConfig(bbox_loss=bbox_loss)
  got = co_criterion.positive_query_losses(jax.tree.map(jnp.asarray, extra),
                                           jax.tree.map(jnp.asarray, q), cfg, name="atss")
  pos, valid = q["positive"], q["valid"]
  onehot = np.eye(3)[np.maximum(q["labels"], 0)] * pos[..., None]
  n = pos.sum()
  xyxy = lambda x: np.concatenate([x[..., :2] - x[..., 2:] / 2, x[..., :2] + x[..., 2:] / 2], -1)
  for layer, suffix in [(0, "_pos_atss_aux_0"), (1, "_pos_atss")]:
    logits, boxes = extra["pred_logits"][layer], extra["pred_boxes"][layer]
    err = np.abs(boxes - q["boxes"]).astype(np.float64)
    if bbox_loss == "l1":
      box = err.sum(-1)
    else:
      box = (err[..., 0] + err[..., 2]) / q["boxes"][..., 2] + (err[..., 1] + err[..., 3]) / q[
          "boxes"][..., 3]
    np.testing.assert_allclose(got["loss_ce" + suffix],
                               (_focal(logits, onehot) * valid[..., None]).sum() / n, rtol=1e-5)
    np.testing.assert_allclose(got["loss_bbox" + suffix], (box * pos).sum() / n, rtol=1e-5)
    np.testing.assert_allclose(got["loss_giou" + suffix],
                               ((1 - _giou(xyxy(boxes), xyxy(q["boxes"]))) * pos).sum() / n,
                               rtol=1e-5)


def test_padded_positive_query_slots_carry_no_box_loss():
  extra, q = _queries()
  cfg = criterion_lib.CriterionConfig()
  fn = jax.jit(lambda e: co_criterion.positive_query_losses(e, jax.tree.map(jnp.asarray, q),
                                                            cfg, name="roi"))
  base = fn(jax.tree.map(jnp.asarray, extra))
  moved = dict(extra)
  # Move the predicted boxes of every non-positive slot (padding negatives and invalid slots)
  # and the logits of the invalid ones: no term may change.
  moved["pred_boxes"] = np.where(q["positive"][None, ..., None], extra["pred_boxes"],
                                 extra["pred_boxes"][..., ::-1] * 0.5)
  moved["pred_logits"] = np.where(q["valid"][None, ..., None], extra["pred_logits"], 7.0)
  after = fn(jax.tree.map(jnp.asarray, moved))
  for k in base:
    np.testing.assert_allclose(after[k], base[k], rtol=1e-6, err_msg=k)
  # ...while a padding negative's logits do enter the classification loss (background).
  logits = extra["pred_logits"].copy()
  logits[:, 0, 4] += 3.0  # image 0 slot 4: valid, not positive
  changed = fn(jax.tree.map(jnp.asarray, dict(extra, pred_logits=logits)))
  assert float(changed["loss_ce_pos_roi"]) > float(base["loss_ce_pos_roi"]) + 1e-3


def _config(dec_layers=6, bbox_loss="l1"):
  """(main-head CriterionConfig, LossWeights) as the co_dino method resolves them."""
  co = co_config.CoDINOConfig.from_config(co_config.default_co_dino_config(),
                                          num_decoder_layers=dec_layers)
  return criterion_lib.CriterionConfig(bbox_loss=bbox_loss), co.loss


def test_loss_weights_follow_co_dino_r50():
  names = ["loss_rpn_cls", "loss_rpn_bbox", "loss_roi_cls", "loss_roi_giou", "loss_atss_cls",
           "loss_atss_giou", "loss_atss_centerness", "loss_ce_pos_roi", "loss_bbox_pos_atss_aux_3",
           "loss_giou_pos_roi"]
  w = co_criterion.co_dino_loss_weights(names, *_config())
  assert [w[n] for n in names] == [12, 12, 12, 120, 12, 24, 12, 1.0, 5.0, 2.0]
  with pytest.raises(ValueError, match="loss_foo"):
    co_criterion.co_dino_loss_weights(["loss_foo"], *_config())


def _outputs(b=2, q=8, c=3, layers=2, g=3):
  """Random model outputs with every Co-DINO branch (arrays only; no model)."""
  extra, queries = _queries(b=b, c=c, layers=layers)
  box = lambda *s: np.concatenate([RNG.uniform(0.2, 0.8, s + (2,)),
                                   RNG.uniform(0.05, 0.3, s + (2,))], -1).astype(np.float32)
  out = {"pred_logits": RNG.normal(size=(b, q, c)).astype(np.float32), "pred_boxes": box(b, q),
         "aux_outputs": [{"pred_logits": RNG.normal(size=(b, q, c)).astype(np.float32),
                          "pred_boxes": box(b, q)}],
         "interm_outputs": {"pred_logits": RNG.normal(size=(b, q, c)).astype(np.float32),
                            "pred_boxes": box(b, q)},
         "extra_outputs": {"roi": extra, "atss": {k: v[..., ::-1, :] for k, v in extra.items()}}}
  anchors = _boxes((20,))
  s = 10
  out["co_outputs"] = {
      "atss": {"cls_logits": RNG.normal(size=(b, 20, c)), "deltas": RNG.normal(size=(b, 20, 4)),
               "centerness": RNG.normal(size=(b, 20)), "anchors": anchors,
               "valid": np.ones((b, 20), bool), "labels": RNG.integers(-1, c, (b, 20)),
               "gt_boxes_xyxy": anchors[None] + RNG.uniform(-2, 2, (b, 20, 4))},
      "rpn": {"logits": RNG.normal(size=(b, s)), "deltas": RNG.normal(size=(b, s, 4)) * 0.1,
              "anchors": _boxes((b, s)), "gt_boxes_xyxy": _boxes((b, s)),
              "positive": RNG.uniform(size=(b, s)) < 0.5, "valid": np.ones((b, s), bool)},
      "roi": {"cls_logits": RNG.normal(size=(b, s, c + 1)), "deltas": RNG.normal(size=(b, s, c, 4)),
              "rois": _boxes((b, s)), "labels": RNG.integers(0, c, (b, s)),
              "gt_boxes_xyxy": _boxes((b, s)), "positive": RNG.uniform(size=(b, s)) < 0.5,
              "valid": np.ones((b, s), bool)},
      "pos_queries": {"roi": queries, "atss": queries}}
  targets = {"boxes": box(b, g), "labels": RNG.integers(0, c, (b, g)).astype(np.int32),
             "valid": np.array([[True, True, False], [True, False, True]]),
             "orig_size": np.array([[100, 120], [90, 80]], np.int32)}
  cast = lambda x: jnp.asarray(x, {"f": jnp.float32, "i": jnp.int32}.get(x.dtype.kind, x.dtype))
  return jax.tree.map(cast, out), jax.tree.map(cast, targets)


@pytest.mark.slow
def test_sized_l1_switch_changes_main_head_box_terms_only():
  outputs, targets = _outputs()
  # Frozen typed configs are hashable: they can be static jit arguments as they are.
  crit = jax.jit(co_criterion.co_dino_criterion, static_argnums=(2, 3))
  l1 = crit(outputs, targets, *_config(2, "l1"))
  sized = crit(outputs, targets, *_config(2, "sized_l1"))
  assert set(l1) == set(sized)
  changed = {k for k in l1 if not np.isclose(l1[k], sized[k], rtol=1e-6)}
  # Every main-head box term (matching branches, denoising-free here, and positive queries)
  # moves, and the totals with them; nothing else does (metric_loss_bbox_* are diagnostics of
  # the same box loss).
  expected = ({k for k in l1 if k.startswith("loss_bbox")}
              | {"loss", "metric_loss_main", "metric_weighted_bbox"})
  assert {k for k in changed if not k.startswith("metric_loss_bbox_")} == expected
  assert any(k.startswith("loss_bbox_pos_") for k in changed)
  for k in l1:
    if k.startswith(("loss_atss", "loss_rpn", "loss_roi", "loss_ce", "loss_giou")):
      assert float(l1[k]) == float(sized[k]), k
  # The total is the weighted sum of its terms.
  cfg = _config(2, "l1")
  main_w = criterion_lib.loss_weights([k for k in l1 if k.startswith("loss_") and
                                       k not in co_criterion._AUX_TERMS and "_pos_" not in k])
  co_names = [k for k in l1 if k in co_criterion._AUX_TERMS or "_pos_" in k]
  co_w = co_criterion.co_dino_loss_weights(co_names, *cfg)
  total = sum(main_w[k] * float(l1[k]) for k in main_w) + sum(co_w[k] * float(l1[k])
                                                               for k in co_w)
  np.testing.assert_allclose(l1["loss"], total, rtol=1e-5)
