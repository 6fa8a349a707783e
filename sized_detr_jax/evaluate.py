"""COCO evaluation: detections -> COCO results json -> pycocotools -> metrics (per box size).

Host-side numpy/pycocotools code. The model's postprocess gives, per image, the top-K scores,
contiguous labels and absolute boxes; this module maps labels back to COCO category ids, writes
`detections_<step>.json`, runs `COCOeval` and returns AP, AP50, AP75, APs, APm, APl (and the
recalls) as 0-1 floats. Size classes follow COCO: small < 32^2 px area <= medium < 96^2 <= large.
"""
import contextlib
import io
import json
import os

import numpy as np
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

# Order of COCOeval.stats for iouType="bbox".
METRIC_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl",
                "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")
SIZE_CLASSES = ("small", "medium", "large")


def load_coco(gt):
  """A pycocotools COCO from a json path, a dataset dict, or an existing COCO (returned as is)."""
  if isinstance(gt, COCO):
    return gt
  coco = COCO()
  if isinstance(gt, (str, os.PathLike)):
    with open(gt) as f:
      coco.dataset = json.load(f)
  else:
    coco.dataset = gt
  with contextlib.redirect_stdout(io.StringIO()):
    coco.createIndex()
  return coco


def detections_to_coco(image_ids, scores, labels, boxes_xywh, label_to_category, *, min_score=0.0):
  """Model detections -> COCO results list.

  Args:
    image_ids: [N] int; entries < 0 are batch padding and are skipped.
    scores: [N, K] float scores.
    labels: [N, K] int contiguous labels (0..C-1).
    boxes_xywh: [N, K, 4] absolute COCO xywh boxes in original-image pixels.
    label_to_category: sequence or dict mapping a contiguous label to its COCO category id.
    min_score: detections with a lower score are dropped.

  Returns:
    list of {"image_id", "category_id", "bbox": [x, y, w, h], "score"} dicts (python floats).
  """
  image_ids, scores = np.asarray(image_ids), np.asarray(scores, np.float64)
  labels, boxes_xywh = np.asarray(labels), np.asarray(boxes_xywh, np.float64)
  results = []
  for n, image_id in enumerate(image_ids):
    if image_id < 0:
      continue
    for k in np.nonzero(scores[n] >= min_score)[0]:
      results.append({
          "image_id": int(image_id),
          "category_id": int(label_to_category[int(labels[n, k])]),
          "bbox": [round(float(v), 3) for v in boxes_xywh[n, k]],
          "score": round(float(scores[n, k]), 5),
      })
  return results


def coco_metrics(gt, detections, *, image_ids=None):
  """Run pycocotools' bbox COCOeval.

  Args:
    gt: ground truth (json path, dataset dict, or COCO).
    detections: COCO results list (as from `detections_to_coco`).
    image_ids: evaluate on these images only (default: every image of `gt`).

  Returns:
    (metrics, summary): dict of METRIC_NAMES -> float in [0, 1] (-1 where COCO has no ground
    truth of that kind, as pycocotools reports), and the printed COCOeval summary text.
  """
  coco_gt = load_coco(gt)
  if not detections:  # loadRes rejects an empty list; no detection means zero AP and AR.
    return {name: 0.0 for name in METRIC_NAMES}, "no detections"
  out = io.StringIO()
  with contextlib.redirect_stdout(out):
    coco_dt = coco_gt.loadRes(detections)
    coco_eval = COCOeval(coco_gt, coco_dt, "bbox")
    if image_ids is not None:
      coco_eval.params.imgIds = sorted(int(i) for i in image_ids)
    coco_eval.evaluate()
    coco_eval.accumulate()
    coco_eval.summarize()
  return {name: float(v) for name, v in zip(METRIC_NAMES, coco_eval.stats)}, out.getvalue()


def write_evaluation(workdir, step, detections, metrics):
  """Write `detections_<step>.json`, `eval_metrics.json` (latest) and append `eval_metrics.jsonl`."""
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, f"detections_{step}.json"), "w") as f:
    json.dump(detections, f)
  record = {"step": int(step), **metrics}
  tmp = os.path.join(workdir, "eval_metrics.json.tmp")
  with open(tmp, "w") as f:
    json.dump(record, f, indent=1)
  os.replace(tmp, os.path.join(workdir, "eval_metrics.json"))  # atomic: never a half-written file
  with open(os.path.join(workdir, "eval_metrics.jsonl"), "a") as f:
    f.write(json.dumps(record) + "\n")
  return record


def plot_per_size(metrics, path, *, box_loss_share=None, title=""):
  """PNG bar chart of AP per size class, with the share of the box loss per class if given.

  Args:
    metrics: dict with APs, APm, APl (0-1).
    path: output PNG path.
    box_loss_share: optional dict small/medium/large -> fraction of the box regression loss.
    title: figure title (e.g. config name and step).
  """
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  ap = [max(metrics[k], 0.0) for k in ("APs", "APm", "APl")]
  ncols = 2 if box_loss_share else 1
  fig, axes = plt.subplots(1, ncols, figsize=(4 * ncols, 3.2), squeeze=False)
  axes[0, 0].bar(SIZE_CLASSES, ap, color=["#d95f02", "#7570b3", "#1b9e77"])
  axes[0, 0].set_ylim(0, 1)
  axes[0, 0].set_ylabel("AP")
  axes[0, 0].set_title(f"AP by size (AP={metrics['AP']:.3f})")
  if box_loss_share:
    share = [box_loss_share.get(k, 0.0) for k in SIZE_CLASSES]
    axes[0, 1].bar(SIZE_CLASSES, share, color="#666666")
    axes[0, 1].set_ylim(0, 1)
    axes[0, 1].set_title("box-loss share by size")
  if title:
    fig.suptitle(title)
  fig.tight_layout()
  fig.savefig(path, dpi=80)
  plt.close(fig)
  return path


def format_metrics_table(metrics):
  """Two-line text table of the metrics (names over 0-1 values)."""
  names = [n for n in METRIC_NAMES if n in metrics]
  return " ".join(f"{n:>6s}" for n in names) + "\n" + " ".join(f"{metrics[n]:6.3f}" for n in names)
