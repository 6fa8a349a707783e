"""Per-run numbers of a study: the COCO metrics of a finished run and its training log.

AP, AP50, AP75, APs, APm, APl come from the run's `eval_metrics.json`; the rest is recomputed
with pycocotools (`evaluate.coco_evaluation`) from `detections_<step>.json` and the config's val
ground truth: AP50/AP75 per size (`AP50_small`, ...: COCOeval's precision at that IoU and area
range, 100 detections per image) and the class-agnostic `agnostic_AP*` (every category merged
into one, in the ground truth and the detections: localisation without classification; a box
detected under several labels then counts once as a hit and otherwise as false positives).
pycocotools' -1 (no ground truth of that size) is treated as missing by the statistics.
"""
import os

import numpy as np

from sized_detr_jax import criterion
from sized_detr_jax import evaluate
from sized_detr_jax import metrics_log
from sized_detr_jax.study import runner

COCO_METRICS = ("AP", "AP50", "AP75", "APs", "APm", "APl")
PER_SIZE_METRICS = tuple(f"AP{iou}_{size}" for iou in (50, 75) for size in criterion.SIZE_NAMES)
AGNOSTIC_METRICS = tuple(f"agnostic_{m}" for m in COCO_METRICS)
METRICS = COCO_METRICS + PER_SIZE_METRICS + AGNOSTIC_METRICS
LOSS_CURVES = ("loss", "loss_ce", "loss_bbox", "loss_giou")
SHARE_CURVES = tuple(f"share_{s}" for s in criterion.SIZE_NAMES)  # box_loss_share per size
# Gradient diagnostics (config.log_grad_split=True): total norm before clipping, per loss kind
# (logged on log steps) and the share of steps whose gradient was clipped.
GRAD_CURVES = ("grad_norm", "grad_norm_ce", "grad_norm_bbox", "grad_norm_giou", "clip_fraction")
CURVES = LOSS_CURVES + SHARE_CURVES + GRAD_CURVES


def precision_ap(coco_eval, *, iou=None, area="all", max_dets=100):
  """AP from COCOeval's precision array [T, R, K, A, M] as pycocotools' summarize averages it.

  Args:
    coco_eval: an accumulated COCOeval.
    iou: IoU threshold (e.g. 0.5), or None for the mean over 0.50:0.95.
    area: "all", "small", "medium" or "large".
    max_dets: detections per image (one of params.maxDets).

  Returns:
    float in [0, 1], or -1.0 when no ground truth has that size (pycocotools' convention).
  """
  p = coco_eval.params
  precision = coco_eval.eval["precision"]  # [T, R, K, A, M]
  if iou is not None:
    t = np.nonzero(np.isclose(p.iouThrs, iou))[0]
    if not len(t):
      raise ValueError(f"IoU {iou} is not one of COCOeval's thresholds {list(p.iouThrs)}")
    precision = precision[t]
  precision = precision[:, :, :, p.areaRngLbl.index(area), p.maxDets.index(max_dets)]
  valid = precision[precision > -1]
  return float(np.mean(valid)) if valid.size else -1.0


def class_agnostic(gt_dataset, detections):
  """(gt dataset, detections) with every category merged into category 1."""
  gt = dict(gt_dataset)
  gt["categories"] = [{"id": 1, "name": "object", "supercategory": "object"}]
  gt["annotations"] = [{**a, "category_id": 1} for a in gt_dataset["annotations"]]
  return gt, [{**d, "category_id": 1} for d in detections]


def detection_metrics(gt_dataset, detections):
  """PER_SIZE_METRICS and AGNOSTIC_METRICS of one run's detections (see the module docstring).

  Args:
    gt_dataset: COCO ground-truth dict (the config's val_gt_json).
    detections: COCO results list ({image_id, category_id, bbox xywh in pixels, score}).
  """
  out = {}
  ev, _ = evaluate.coco_evaluation(gt_dataset, detections)
  for iou in (50, 75):
    for size in criterion.SIZE_NAMES:
      out[f"AP{iou}_{size}"] = 0.0 if ev is None else precision_ap(ev, iou=iou / 100, area=size)
  ev, _ = evaluate.coco_evaluation(*class_agnostic(gt_dataset, detections))
  for name, value in zip(COCO_METRICS, np.zeros(6) if ev is None else ev.stats[:6]):
    out[f"agnostic_{name}"] = float(value)
  return out


def run_metrics(workdir, step, gt_json, gt_cache=None):
  """All METRICS of a finished run; the pycocotools part is cached in `<run>/study_eval.json`."""
  metrics = {k: v for k, v in runner.read_json(os.path.join(workdir, "eval_metrics.json")).items()
             if k in COCO_METRICS}
  cache_path = os.path.join(workdir, "study_eval.json")
  cache = runner.read_json(cache_path, {})
  if cache.get("step") == step and cache.get("gt_json") == gt_json and all(
      k in cache.get("metrics", {}) for k in PER_SIZE_METRICS + AGNOSTIC_METRICS):
    return {**metrics, **cache["metrics"]}
  gt_cache = {} if gt_cache is None else gt_cache
  if gt_json not in gt_cache:
    gt_cache[gt_json] = runner.read_json(gt_json)
    if gt_cache[gt_json] is None:
      raise FileNotFoundError(f"cannot read the val ground truth {gt_json}")
  detections = runner.read_json(os.path.join(workdir, f"detections_{step}.json"))
  extra = detection_metrics(gt_cache[gt_json], detections)
  runner.write_json(cache_path, {"step": step, "gt_json": gt_json, "metrics": extra})
  return {**metrics, **extra}


def val_gt_json(config):
  """The val ground-truth json path the trainer evaluates against (as the CLI resolves it)."""
  from sized_detr_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  return pipeline.dataset_info(config.data)["val_gt_json"]


def read_metrics_jsonl(path):
  """Records of a metrics.jsonl by ascending step (`metrics_log.read_metrics`: superseded rows
  before a resume/restart event dropped), the last record of a step winning (files written
  before the events existed). Unreadable lines are skipped; a missing file gives []."""
  try:
    records = metrics_log.read_metrics(path)
  except OSError:
    return []
  by_step = {int(r["step"]): r for r in records if isinstance(r.get("step"), (int, float))}
  return [by_step[s] for s in sorted(by_step)]
