"""Semi-DETR as a `method.Method` (`config.method = "semi_detr"`)."""
import functools

import jax.numpy as jnp

from sized_detr_jax import box_ops
from sized_detr_jax import criterion
from sized_detr_jax import method as method_lib
from sized_detr_jax.data import pipeline
from sized_detr_jax.models import dino
from sized_detr_jax.semi import config as semi_config
from sized_detr_jax.semi import model as semi_model
from sized_detr_jax.semi import pseudo_labels
from sized_detr_jax.semi import step


def semi_batches(data_config, **kwargs):
  """`{"labeled": batch, "unlabeled": {"weak": view, "strong": view}}` per step."""
  labeled = pipeline.build_train_iterator(data_config, with_image_id=False, **kwargs)
  unlabeled = pipeline.build_unlabeled_iterator(data_config, with_image_id=False, **kwargs)
  if unlabeled is None:
    raise ValueError("config.method='semi_detr' needs unlabeled data: set config.data."
                     "unlabeled_ann/unlabeled_images (coco) or tfds_unlabeled_split (tfds)")
  return ({"labeled": l, "unlabeled": u} for l, u in zip(labeled, unlabeled))


def nms_postprocess(outputs, batch, *, num_select, iou_threshold):
  """Class-wise NMS detections (Semi-DETR's evaluation while it trains one-to-many).

  Same output contract as `dino.postprocess` (suppressed slots score 0).
  """
  q, c = outputs["pred_logits"].shape[1:]
  det = pseudo_labels.teacher_detections(
      outputs, batch["orig_size"], method="nms", score_threshold=0.001,
      iou_threshold=iou_threshold, max_detections=num_select,
      num_candidates=min(q * c, max(num_select, 1000)))
  scores = jnp.where(det["valid"], det["scores"], 0.0)
  return {"scores": scores, "labels": det["labels"], "boxes_xyxy": det["boxes_xyxy"],
          "boxes_xywh": box_ops.box_xyxy_to_xywh(det["boxes_xyxy"])}


def build(config) -> method_lib.Method:
  """Semi-DETR from `config.model` (DINO fields), `config.criterion`, `config.semi`, `config.data`.

  Stage 1 (one-to-many, evaluated with class-wise NMS) until `semi.switch_step`, stage 2
  (one-to-one, DINO's top-K) after it. The EMA teacher tracks `params["dino"]` only: the
  consistency projector is the student's.
  """
  semi = semi_config.SemiConfig.from_config(config.get("semi"))
  crit = criterion.CriterionConfig.from_config(config.get("criterion"))
  model, param_labels = semi_model.build_semi_detr(config.model, semi)
  num_select = int(config.model.get("num_select", 300))
  postprocess = {1: functools.partial(nms_postprocess, num_select=num_select,
                                      iou_threshold=float(semi.nms_iou)),
                 2: dino.topk_postprocess(num_select)}
  return method_lib.Method(
      name="semi_detr", model=model, param_labels=param_labels,
      loss_fn=lambda stage: step.make_semi_loss(model, crit, semi, stage),
      stage_at=semi.stage_at, train_batches=semi_batches,
      images_per_step=int(config.data.batch_size) + int(config.data.unlabeled_batch_size),
      postprocess=postprocess.__getitem__,
      ema_subtree=lambda params: {"dino": params["dino"]})
