"""Semi-DETR as a `method.Method` (`config.method = "semi_detr"`)."""
import dataclasses
import functools
from typing import NamedTuple

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np

from sized_detr_jax import box_ops
from sized_detr_jax import criterion
from sized_detr_jax import dino_method
from sized_detr_jax import method as method_lib
from sized_detr_jax.data import pipeline
from sized_detr_jax.semi import config as semi_config
from sized_detr_jax.semi import model as semi_model
from sized_detr_jax.semi import pseudo_labels
from sized_detr_jax.semi import sampler
from sized_detr_jax.semi import step


class Stage(NamedTuple):
  """A compiled-step key of the "by_prob" batch sampler: the detector stage and the step's
  labeled images per group (each combination is one batch shape)."""
  detector: int
  labeled_per_group: int


def detector_stage(stage):
  """The detector stage (1 or 2) of a `stage_at` key (an int, or a `Stage`)."""
  return stage.detector if isinstance(stage, Stage) else stage


def semi_batches(data_config, *, composition=None, **kwargs):
  """`{"labeled": batch, "unlabeled": {"weak": view, "strong": view}}` per step.

  Args:
    data_config: `config.data`.
    composition: a `sampler.GroupComposition` for Semi-DETR's random labeled / unlabeled
      split (each step's sizes from its layouts); None: the configured fixed batch sizes.
    **kwargs: `seed`, `start_step`, `process_index`, `process_count` of the pipeline.
  """
  layouts = {}
  if composition is not None:
    if composition.groups % jax.device_count():
      raise ValueError(f"config.semi.batch_sampler='by_prob': {composition.groups} groups of "
                       f"{composition.images_per_group} images cannot be split evenly over "
                       f"{jax.device_count()} devices; use a device count dividing the groups")
    layouts = {"labeled": composition.labeled_layout,
               "unlabeled": composition.unlabeled_layout}
  labeled = pipeline.build_train_iterator(data_config, with_image_id=False,
                                          layout=layouts.get("labeled"), **kwargs)
  unlabeled = pipeline.build_unlabeled_iterator(data_config, with_image_id=False,
                                                layout=layouts.get("unlabeled"), **kwargs)
  if unlabeled is None:
    raise ValueError("config.method='semi_detr' needs unlabeled data: set config.data."
                     "unlabeled_ann/unlabeled_images (coco) or tfds_unlabeled_split (tfds)")
  return ({"labeled": l, "unlabeled": u} for l, u in zip(labeled, unlabeled))


def build_composition(semi, data_config, seed):
  """The "by_prob" sampler's `GroupComposition` (None for "fixed").

  Raises:
    ValueError: the step's images are not a whole number of groups.
  """
  if semi.batch_sampler == "fixed":
    return None
  total = int(data_config.batch_size) + int(data_config.unlabeled_batch_size)
  if total % semi.images_per_group:
    raise ValueError(f"config.semi.batch_sampler='by_prob': config.data.batch_size + "
                     f"unlabeled_batch_size = {total} is not a multiple of "
                     f"config.semi.images_per_group = {semi.images_per_group}")
  return sampler.GroupComposition(seed=seed, groups=total // semi.images_per_group,
                                  images_per_group=semi.images_per_group,
                                  sample_ratio=semi.sample_ratio)


def boxes_per_image(source):
  """int64 [N] non-crowd boxes of every image of a COCO-json source (no image is decoded).

  Raises:
    ValueError: the source keeps no annotation index (TFDS).
  """
  index = getattr(source, "index", None)
  if index is None or not hasattr(index, "iscrowd"):
    raise ValueError(f"config.semi.max_pseudo=0 sizes the pseudo-label slots from the labeled "
                     f"annotations, which a {type(source).__name__} does not index; set "
                     "config.semi.max_pseudo to a positive number")
  return np.array([int(np.sum(~np.asarray(c, bool))) for c in index.iscrowd], np.int64)


def resolve_max_pseudo(semi, data_config):
  """`semi` with `max_pseudo` = 0 replaced by the data's value (see `SemiConfig.max_pseudo`):
  the most non-crowd boxes of one labeled training image, at least 1, at most
  `max_detections` (the teacher never gives more). Positive values are kept."""
  if semi.max_pseudo > 0:
    return semi
  counts = boxes_per_image(pipeline.get_source(data_config, "train"))
  m = int(min(max(int(counts.max(initial=0)), 1), semi.max_detections))
  logging.info("config.semi.max_pseudo=0: %d pseudo-label slots per image (labeled boxes per "
               "image: max %d, 99.9th percentile %.1f, mean %.2f over %d images)", m,
               int(counts.max(initial=0)), float(np.percentile(counts, 99.9)),
               float(counts.mean()), len(counts))
  return dataclasses.replace(semi, max_pseudo=m)


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
  consistency projector is the student's. With `semi.batch_sampler="by_prob"` the stage keys
  are `Stage(detector, labeled_per_group)`: one compiled step per batch composition met.
  """
  semi = resolve_max_pseudo(semi_config.SemiConfig.from_config(config.get("semi")),
                            config.data)
  crit = criterion.CriterionConfig.from_config(config.get("criterion"))
  model, param_labels = semi_model.build_semi_detr(config.model, semi)
  num_select = int(config.model.get("num_select", 300))
  postprocess = {1: functools.partial(nms_postprocess, num_select=num_select,
                                      iou_threshold=float(semi.nms_iou)),
                 2: dino_method.topk_postprocess(num_select)}
  composition = build_composition(semi, config.data, int(config.get("seed", 0)))
  stage_at = semi.stage_at
  if composition is not None:
    stage_at = lambda step: Stage(semi.stage_at(step), composition.labeled_per_group(step))
  return method_lib.Method(
      name="semi_detr", model=model, param_labels=param_labels,
      loss_fn=lambda stage: step.make_semi_loss(model, crit, semi, detector_stage(stage)),
      stage_at=stage_at,
      train_batches=functools.partial(semi_batches, composition=composition),
      images_per_step=int(config.data.batch_size) + int(config.data.unlabeled_batch_size),
      postprocess=lambda stage: postprocess[detector_stage(stage)],
      ema_subtree=lambda params: {"dino": params["dino"]})
