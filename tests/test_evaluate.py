"""evaluate.py against pycocotools run directly and hand-checked extreme cases."""
import contextlib
import io
import json
import os

import numpy as np
import pytest
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from sized_detr_jax import evaluate


@pytest.fixture(scope="module")
def gt_dict():
  """Three images with small, medium and large boxes of two categories (ids 3 and 7)."""
  rng = np.random.default_rng(0)
  images, anns = [], []
  for image_id in (11, 12, 13):
    images.append({"id": image_id, "width": 400, "height": 300, "file_name": f"{image_id}.png"})
    for side in (12, 20, 50, 80, 120, 200):
      x, y = rng.uniform(0, 400 - side), rng.uniform(0, 300 - min(side, 299))
      h = min(side, 300 - y)
      anns.append({"id": len(anns) + 1, "image_id": image_id, "category_id": int(rng.choice([3, 7])),
                   "bbox": [float(x), float(y), float(side), float(h)], "area": float(side * h),
                   "iscrowd": 0})
  return {"images": images, "annotations": anns,
          "categories": [{"id": 3, "name": "a"}, {"id": 7, "name": "b"}]}


def _as_model_output(gt_dict, shift=0.0):
  """Per-image padded arrays as the model's postprocess returns them, from the ground truth."""
  label_of = {3: 0, 7: 1}
  k = 8
  ids = [im["id"] for im in gt_dict["images"]] + [-1]  # one padded batch entry
  scores = np.zeros((len(ids), k))
  labels = np.zeros((len(ids), k), np.int32)
  boxes = np.zeros((len(ids), k, 4))
  for n, image_id in enumerate(ids[:-1]):
    anns = [a for a in gt_dict["annotations"] if a["image_id"] == image_id]
    for j, a in enumerate(anns):
      scores[n, j] = 0.9 - 0.01 * j
      labels[n, j] = label_of[a["category_id"]]
      boxes[n, j] = np.array(a["bbox"]) + np.array([shift, shift, 0, 0])
  return np.array(ids), scores, labels, boxes


def test_perfect_detections_give_ap_one(gt_dict):
  dets = evaluate.detections_to_coco(*_as_model_output(gt_dict), [3, 7], min_score=0.05)
  assert len(dets) == len(gt_dict["annotations"])
  metrics, _ = evaluate.coco_metrics(gt_dict, dets)
  for name in ("AP", "AP50", "AP75", "APs", "APm", "APl"):
    assert metrics[name] == pytest.approx(1.0), name


def test_shifted_boxes_match_pycocotools_directly(gt_dict, tmp_path):
  dets = evaluate.detections_to_coco(*_as_model_output(gt_dict, shift=4.0), {0: 3, 1: 7}, min_score=0.05)
  metrics, summary = evaluate.coco_metrics(gt_dict, dets)
  assert "Average Precision" in summary
  # Reference: pycocotools on files, without our code.
  gt_path = tmp_path / "gt.json"
  gt_path.write_text(json.dumps(gt_dict))
  with contextlib.redirect_stdout(io.StringIO()):
    coco_gt = COCO(str(gt_path))
    ref = COCOeval(coco_gt, coco_gt.loadRes(dets), "bbox")
    ref.evaluate()
    ref.accumulate()
    ref.summarize()
  np.testing.assert_allclose([metrics[n] for n in evaluate.METRIC_NAMES], ref.stats)
  # A 4-px shift hurts small boxes far more than large ones.
  assert metrics["APs"] < metrics["APl"] < 1.0


def test_empty_detections_and_writing(gt_dict, tmp_path):
  metrics, _ = evaluate.coco_metrics(gt_dict, [])
  assert all(v == 0.0 for v in metrics.values())
  workdir = str(tmp_path / "w")
  evaluate.write_evaluation(workdir, 5, [], metrics)
  rec = evaluate.write_evaluation(workdir, 10, [], {**metrics, "AP": 0.5})
  assert json.load(open(os.path.join(workdir, "eval_metrics.json"))) == rec
  lines = open(os.path.join(workdir, "eval_metrics.jsonl")).read().splitlines()
  assert [json.loads(l)["step"] for l in lines] == [5, 10]
  assert json.load(open(os.path.join(workdir, "detections_10.json"))) == []
  png = evaluate.plot_per_size({**metrics, "APs": 0.2, "APm": 0.4, "APl": 0.6}, str(tmp_path / "p.png"),
                               box_loss_share={"small": 0.5, "medium": 0.3, "large": 0.2})
  assert open(png, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
  assert "AP50" in evaluate.format_metrics_table(metrics)


def test_box_loss_share_sums_the_records():
  records = [{"metric_loss_bbox_small": 0.5, "metric_num_boxes_small": 4.0,
              "metric_loss_bbox_medium": 0.2, "metric_num_boxes_medium": 2.0,
              "metric_loss_bbox_large": 0.1, "metric_num_boxes_large": 0.0},
             {"metric_loss_bbox_small": 0.3, "metric_num_boxes_small": 2.0,
              "metric_loss_bbox_medium": 0.4, "metric_num_boxes_medium": 1.0,
              "metric_loss_bbox_large": 0.6, "metric_num_boxes_large": 5.0}]
  totals = np.array([0.5 * 4 + 0.3 * 2, 0.2 * 2 + 0.4 * 1, 0.1 * 0 + 0.6 * 5])
  got = evaluate.box_loss_share(records)
  np.testing.assert_allclose([got[s] for s in ("small", "medium", "large")],
                             totals / totals.sum(), rtol=1e-12)
  assert evaluate.box_loss_share(records[0]) == evaluate.box_loss_share(records[:1])
  assert evaluate.box_loss_share([{}]) is None
