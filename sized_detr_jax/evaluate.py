"""Inference and COCO evaluation: predict, score with pycocotools, eval and predict modes.

* `Predictor`: the jitted `(params, model_state, batch) -> detections` of a method, per stage
  (the method's postprocess: DINO's top-K, or Semi-DETR's NMS before its switch).
* `run_evaluation`: predict every eval batch, COCO results json, `COCOeval` per box size,
  `detections_<step>.json`, `eval_metrics.json(l)`, `per_size_<step>.png`.
* `evaluate_only`: `run.py --mode=eval` on a workdir's newest checkpoint (`--mode=predict` is
  `predict.py`, on `detector.Detector`).
* Host-side helpers: `detections_to_coco`, `coco_evaluation`, `coco_metrics`,
  `write_evaluation`, `plot_per_size`.

Metrics are AP, AP50, AP75, APs, APm, APl (and the recalls) as 0-1 floats. Size classes follow
COCO: small < 32^2 px area <= medium < 96^2 <= large.
"""
import contextlib
import copy
import functools
import io
import json
import os
from typing import Any, NamedTuple

from absl import logging
import jax
import numpy as np
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from sized_detr_jax import config_lib
from sized_detr_jax import criterion
from sized_detr_jax import fs
from sized_detr_jax import sharding
from sized_detr_jax import state as state_lib
from sized_detr_jax.data import batch as batch_lib
from sized_detr_jax.data import pipeline

# Order of COCOeval.stats for iouType="bbox".
METRIC_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl",
                "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")


def pycocotools_coco(gt):
  """A pycocotools COCO from a json path, a dataset dict, or an existing COCO (returned as is)."""
  if isinstance(gt, COCO):
    return gt
  coco = COCO()
  if isinstance(gt, (str, os.PathLike)):
    coco.dataset = json.loads(fs.path(gt).read_text())
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


def coco_evaluation(gt, detections, *, image_ids=None):
  """pycocotools' bbox COCOeval, evaluated, accumulated and summarised.

  Args:
    gt: ground truth (json path, dataset dict, or COCO).
    detections: COCO results list (as from `detections_to_coco`); not modified.
    image_ids: evaluate on these images only (default: every image of `gt`).

  Returns:
    (coco_eval, summary): the COCOeval (its `stats`, `eval["precision"]` [T, R, K, A, M]) and
    the printed summary text; (None, "no detections") for an empty list, which pycocotools'
    loadRes rejects.
  """
  coco_gt = pycocotools_coco(gt)
  if not detections:
    return None, "no detections"
  out = io.StringIO()
  with contextlib.redirect_stdout(out):
    coco_dt = coco_gt.loadRes(copy.deepcopy(detections))  # loadRes adds fields to each dict
    coco_eval = COCOeval(coco_gt, coco_dt, "bbox")
    if image_ids is not None:
      coco_eval.params.imgIds = sorted(int(i) for i in image_ids)
    coco_eval.evaluate()
    coco_eval.accumulate()
    coco_eval.summarize()
  return coco_eval, out.getvalue()


def coco_metrics(gt, detections, *, image_ids=None):
  """COCO bbox metrics of `detections` (arguments as `coco_evaluation`).

  Returns:
    (metrics, summary): dict of METRIC_NAMES -> float in [0, 1] (-1 where COCO has no ground
    truth of that kind, as pycocotools reports; all 0 without detections), and the printed
    COCOeval summary text.
  """
  coco_eval, summary = coco_evaluation(gt, detections, image_ids=image_ids)
  if coco_eval is None:  # no detection means zero AP and AR
    return {name: 0.0 for name in METRIC_NAMES}, summary
  return {name: float(v) for name, v in zip(METRIC_NAMES, coco_eval.stats)}, summary


def write_evaluation(workdir, step, detections, metrics):
  """Write `detections_<step>.json`, `eval_metrics.json` (latest) and append `eval_metrics.jsonl`."""
  workdir = fs.path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  (workdir / f"detections_{step}.json").write_text(json.dumps(detections))
  record = {"step": int(step), **metrics}
  # Atomic: never a half-written file.
  fs.write_text_atomic(workdir / "eval_metrics.json", json.dumps(record, indent=1))
  fs.append_text(workdir / "eval_metrics.jsonl", json.dumps(record) + "\n")
  return record


def plot_per_size(metrics, path, *, box_loss_share=None, title="", share_title=""):
  """PNG bar chart of AP per size class (values on the bars), with the share of the box loss per
  class if given.

  Args:
    metrics: dict with APs, APm, APl (0-1).
    path: output PNG path.
    box_loss_share: optional dict small/medium/large -> fraction of the box regression loss.
    title: figure title (e.g. config name and step).
    share_title: what the share was computed over (e.g. "last 10 logged steps").
  """
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  ap = [max(metrics[k], 0.0) for k in ("APs", "APm", "APl")]
  ncols = 2 if box_loss_share else 1
  fig, axes = plt.subplots(1, ncols, figsize=(4 * ncols, 3.2), squeeze=False)
  bars = axes[0, 0].bar(criterion.SIZE_NAMES, ap, color=["#d95f02", "#7570b3", "#1b9e77"])
  axes[0, 0].bar_label(bars, fmt="%.3f")
  axes[0, 0].set_ylim(0, 1)
  axes[0, 0].set_ylabel("AP")
  axes[0, 0].set_title(f"AP by size (AP={metrics['AP']:.3f})")
  if box_loss_share:
    share = [box_loss_share.get(k, 0.0) for k in criterion.SIZE_NAMES]
    bars = axes[0, 1].bar(criterion.SIZE_NAMES, share, color="#666666")
    axes[0, 1].bar_label(bars, fmt="%.2f")
    axes[0, 1].set_ylim(0, 1)
    axes[0, 1].set_title("box-loss share by size" + (f"\n({share_title})" if share_title
                                                      else ""), fontsize=9)
  if title:
    fig.suptitle(title)
  fig.tight_layout()
  with fs.path(path).open("wb") as f:
    fig.savefig(f, dpi=80, format="png")
  plt.close(fig)
  return path


def format_metrics_table(metrics):
  """Two-line text table of the metrics (names over 0-1 values)."""
  names = [n for n in METRIC_NAMES if n in metrics]
  return " ".join(f"{n:>6s}" for n in names) + "\n" + " ".join(f"{metrics[n]:6.3f}" for n in names)


# ---------------------------------------------------------------------------------------------
# Prediction and the evaluation loop.


def detect(model, postprocess, params, model_state, batch):
  """One eval batch's detections: the model's forward pass at inference, then `postprocess`.

  Args:
    model: the Flax module (`method.Method.model`, or the DINO inside it).
    postprocess: `fn(outputs, batch)` (`method.Method.postprocess(stage)`).
    params, model_state: the model's variables.
    batch: `image` [B, H, W, 3] (float32 normalised or uint8), `pixel_mask` [B, H, W],
      `orig_size` [B, 2], `image_index` [B].

  Returns:
    the postprocess dict (`scores` [B, K], `labels` [B, K], `boxes_xyxy` / `boxes_xywh`
    [B, K, 4] in original-image pixels, ...) plus the batch's `image_index`.
  """
  outputs = model.apply({"params": params, **model_state}, batch_lib.model_images(batch),
                        batch["pixel_mask"], train=False)
  return {**postprocess(outputs, batch), "image_index": batch["image_index"]}


class Predictor:
  """Jitted `(params, model_state, batch) -> detections` of a method, one per stage.

  Detections: `scores` [B, K], `labels` [B, K] contiguous, `boxes_xyxy` / `boxes_xywh`
  [B, K, 4] in original-image pixels, `image_index` [B] (the position in the source, < 0 for
  batch padding; `pipeline.image_ids_of` maps it to int64 COCO ids); replicated.
  """

  def __init__(self, method, mesh):
    # Params and model state are replicated on the mesh, the batch sharded on `data`.
    self.method, self.mesh = method, mesh
    self._fns = {}

  def __call__(self, step):
    """The predict function for the model after `step` completed steps."""
    stage = self.method.stage_at(step)
    if stage not in self._fns:
      predict = functools.partial(detect, self.method.model, self.method.postprocess(stage))
      replicated = sharding.replicated(self.mesh)
      self._fns[stage] = jax.jit(
          predict, in_shardings=(replicated, replicated, sharding.batch_sharding(self.mesh)),
          out_shardings=replicated)
    return self._fns[stage]


def eval_batches(config):
  """(this process's evaluation batches (process-local numpy), the val source).

  The batches carry `image_index` and no int32 `image_id`, so COCO ids >= 2**31 work.
  """
  batches, _ = pipeline.build_eval_iterator(config.data, process_index=jax.process_index(),
                                            process_count=jax.process_count(),
                                            with_image_id=False)
  return batches, pipeline.get_source(config.data, "val")


def box_loss_share(records):
  """Share of the final layer's box loss per size class, summed over logged metric records.

  Args:
    records: one metrics dict or a sequence of them (e.g. the last K logged steps), each with
      the criterion's `metric_loss_bbox_{size}` (mean) and `metric_num_boxes_{size}` (count).

  Returns:
    {size: share} summing to 1, or None when no record has a box.
  """
  records = [records] if isinstance(records, dict) else list(records)
  totals = {s: sum(r.get(f"metric_loss_bbox_{s}", 0.0) * r.get(f"metric_num_boxes_{s}", 0.0)
                   for r in records) for s in criterion.SIZE_NAMES}
  z = sum(totals.values())
  return {s: v / z for s, v in totals.items()} if z > 0 else None


def run_evaluation(predictor, params, model_state, step, workdir, data_info, batches, *,
                   loss_share=None, share_title="", title=""):
  """Predict every eval batch, score with pycocotools on process 0, write files and a plot.

  Each process feeds its own shard; the predictions come back replicated, so process 0 sees
  every image. `batches` is `eval_batches(config)`: (batches, val source); batch padding has
  image_index < 0 and is dropped.

  Returns:
    metrics dict (AP, AP50, AP75, APs, APm, APl, ...) on process 0, None elsewhere.
  """
  predict_fn = predictor(step)
  batches, source = batches
  dets = []
  for local in batches:
    out = jax.device_get(predict_fn(params, model_state, sharding.global_batch(local,
                                                                              predictor.mesh)))
    if jax.process_index() == 0:
      image_ids = pipeline.image_ids_of(source, out["image_index"])
      dets += detections_to_coco(image_ids, out["scores"], out["labels"],
                                 out["boxes_xywh"], data_info["category_ids"], min_score=0.001)
  if jax.process_index() != 0:
    return None
  metrics, _ = coco_metrics(data_info["val_gt_json"], dets)
  write_evaluation(workdir, step, dets, metrics)
  plot_per_size(metrics, fs.path(workdir) / f"per_size_{step}.png",
                box_loss_share=loss_share, share_title=share_title, title=title or f"step {step}")
  logging.info("eval at step %d:\n%s", step, format_metrics_table(metrics))
  return metrics


def eval_params(config, state):
  """The params evaluation uses: the EMA params when `config.eval_ema` and the state has them
  (`config.ema_momentum` set), else the trained params. Training's own evaluations,
  `--mode=eval` and `detector.Detector` (via inference.json) follow it."""
  if config.get("eval_ema") and state.ema_params is not None:
    return state.ema_params
  return state.params


class Restored(NamedTuple):
  """The newest checkpoint of a workdir, ready for inference."""
  mesh: Any
  data_info: dict
  params: Any           # the EMA params when config.eval_ema and the state has them
  model_state: Any
  predictor: Predictor
  step: int


def restore_for_inference(config, workdir, mode) -> Restored:
  """The newest checkpoint of `workdir` with its predictor (`--mode=eval`).

  Logs (and prints) which step is used and why (e.g. a newer step was unreadable). A workdir
  without checkpoints is an error and is left untouched; checkpoints of another model raise
  `checkpointing.CheckpointMismatchError` naming the first differing param.
  """
  if not workdir:
    raise ValueError(f"--mode={mode} needs --workdir pointing at a training run")
  ckpt_dir = fs.path(workdir) / "checkpoints"
  if not ckpt_dir.is_dir():
    raise FileNotFoundError(f"--mode={mode}: {ckpt_dir} does not exist (--workdir must be the "
                            "folder of a training run)")
  sharding.maybe_initialize_distributed(config)
  run = state_lib.setup(config, workdir)
  run.checkpointer.close()
  if run.restored.step is None:
    raise FileNotFoundError(f"--mode={mode}: no readable checkpoint in {ckpt_dir} "
                            f"({run.restored.describe()})")
  step = int(run.restored.step)
  if jax.process_index() == 0:
    print(f"--mode={mode}: using checkpoint {run.restored.describe()}")
  return Restored(run.mesh, run.data_info, eval_params(config, run.state),
                  run.state.model_state, Predictor(run.method, run.mesh), step)


def evaluate_only(config, workdir):
  """Evaluate the newest checkpoint of `workdir` (EMA params if `config.eval_ema`)."""
  config_lib.require_finalized(config, "evaluate.evaluate_only")
  r = restore_for_inference(config, workdir, "eval")
  metrics = run_evaluation(r.predictor, r.params, r.model_state, r.step, workdir, r.data_info,
                           eval_batches(config))
  if metrics is not None:
    print(format_metrics_table(metrics))
  return metrics
