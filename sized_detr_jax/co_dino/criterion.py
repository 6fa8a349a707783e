"""Co-DINO's training loss: DINO's set criterion on the main head, the auxiliary heads' losses
and the positive-query losses, as one flat dict of scalars.

* Main head: `criterion.dino_criterion` (Hungarian matching, classification / L1 or Sized L1 /
  GIoU over final, auxiliary, encoder-proposal and denoising outputs) with `config.criterion`;
  Co-DINO's recipe sets `cls_loss="qfl"` (quality focal loss, IoU soft targets, as
  co_dino_head.py) there and for the positive queries.
* Auxiliary heads (`co_dino.aux_losses`): each weight is its base weight times
  `num_decoder_layers x lambda_2` (Co-DETR: 6 x 2 = 12): RPN CE 1 / L1 1, RoI CE 1 / GIoU 10,
  ATSS focal 1 / GIoU 2 / centerness 1.
* Positive queries (Co-DETR co_dino_head.py loss_single_aux): on every decoder layer, focal
  classification of the valid slots (padding negatives learn the background), box and GIoU
  losses of the positive slots against the ground truth their head assigned (no Hungarian),
  each normalised by the head's global number of positive slots (>= 1) and weighted like the
  main head's terms times lambda_1 (1.0). The box term is the main head's `bbox_loss`, so the
  paper's "Sized L1 in the main DETR head only" covers matching, denoising and positive
  queries, while the auxiliary heads keep their own losses.

Loss names: the main head's (criterion.py); `loss_{atss,rpn,roi}_*`; positive queries
`loss_{ce,bbox,giou}_pos_{roi,atss}` (last layer) and `..._pos_{head}_aux_{i}` (layer i).
`metric_loss_main` is the main head's weighted total.
"""
import jax
import jax.numpy as jnp

from sized_detr_jax import criterion as criterion_lib
from sized_detr_jax import losses
from sized_detr_jax.co_dino import aux_losses
from sized_detr_jax.co_dino import config as co_config

# Auxiliary loss name -> its `co_config.LossWeights` field.
_AUX_TERMS = {
    "loss_rpn_cls": "rpn_cls_weight", "loss_rpn_bbox": "rpn_bbox_weight",
    "loss_roi_cls": "roi_cls_weight", "loss_roi_giou": "roi_giou_weight",
    "loss_atss_cls": "atss_cls_weight", "loss_atss_giou": "atss_giou_weight",
    "loss_atss_centerness": "atss_centerness_weight",
}


def positive_query_losses(extra, queries, cfg, *, name, axis_name=None):
  """Losses of one head's positive queries on every decoder layer (unweighted).

  Args:
    extra: {"pred_logits": [L, B, N, C], "pred_boxes": [L, B, N, 4]} this head's slots.
    queries: {"labels": [B, N] int32 (-1 background), "boxes": [B, N, 4] normalised cxcywh
      targets, "positive": [B, N] bool, "valid": [B, N] bool}.
    cfg: `criterion.CriterionConfig` of the main head (cls_loss: focal or quality focal,
      bbox_loss).
    name: the head's name in the loss keys.

  Returns:
    {loss_ce_pos_{name}, loss_bbox_pos_{name}, loss_giou_pos_{name}} for the last layer and
    the same with `_aux_{i}` for layer i < L - 1.
  """
  logits, boxes = extra["pred_logits"], extra["pred_boxes"]
  valid = queries["valid"]
  positive = queries["positive"] & valid
  onehot = jax.nn.one_hot(jnp.where(positive, queries["labels"], -1), logits.shape[-1],
                          dtype=logits.dtype)
  target = jnp.broadcast_to(queries["boxes"][None], boxes.shape)
  ce = cfg.classification_loss(logits, onehot[None], boxes, target)
  ce = jnp.where(valid[None, ..., None], ce, 0.0)
  pos = jnp.broadcast_to(positive[None], boxes.shape[:-1])
  box = cfg.box_loss(boxes, target, pos, axis_name=axis_name)
  giou = losses.giou_loss(boxes, target, pos)
  num = jnp.maximum(losses.global_sum(positive.astype(jnp.float32), axis_name), 1.0)
  result = {}
  num_layers = logits.shape[0]
  for layer in range(num_layers):
    suffix = f"_pos_{name}" + ("" if layer == num_layers - 1 else f"_aux_{layer}")
    result[f"loss_ce{suffix}"] = losses.global_sum(ce[layer], axis_name) / num
    result[f"loss_bbox{suffix}"] = losses.global_sum(box[layer], axis_name) / num
    result[f"loss_giou{suffix}"] = losses.global_sum(giou[layer], axis_name) / num
  return result


def co_dino_loss_weights(names, crit, weights):
  """Weight of every Co-DINO loss name (auxiliary and positive-query terms).

  Args:
    names: loss names from `co_dino_criterion` other than the main head's.
    crit: the main head's `criterion.CriterionConfig` (positive-query coefficients).
    weights: `co_dino.config.LossWeights`.

  Returns:
    dict name -> float.
  """
  scale = float(weights.num_decoder_layers) * weights.lambda_2
  per_prefix = {"loss_ce": crit.cls_loss_coef, "loss_bbox": crit.bbox_loss_coef,
                "loss_giou": crit.giou_loss_coef}
  result = {}
  for name in names:
    if name in _AUX_TERMS:
      result[name] = getattr(weights, _AUX_TERMS[name]) * scale
    elif "_pos_" in name:
      result[name] = per_prefix[name.split("_pos_")[0]] * weights.lambda_1
    else:
      raise ValueError(f"co_dino_loss_weights: unknown loss name {name!r}")
  return result


def co_dino_criterion(outputs, targets, crit=None, weights=None, *, axis_name=None):
  """The Co-DINO training loss (`Method.loss_fn` of "co_dino").

  Args:
    outputs: `CoDINO` training outputs (DINO's dict plus `co_outputs` and `extra_outputs`
      {head name: {"pred_logits": [L, B, N, C], "pred_boxes": [L, B, N, 4]}}); plain DINO
      outputs give DINO's criterion alone.
    targets: the batch's `boxes` [B, G, 4] normalised cxcywh, `labels` [B, G], `valid`
      [B, G], optionally `orig_size` / `size` (per-size metrics).
    crit: the main head's `criterion.CriterionConfig` (None: DINO's defaults).
    weights: `co_dino.config.LossWeights` (None: Co-DINO R50 1x's).
    axis_name: only inside `jax.shard_map`: the batch's mesh axis.

  Returns:
    Flat dict of [] float32: `loss` (weighted total), every unweighted `loss_*` term,
    `metric_*` diagnostics (the main head's, plus `metric_loss_main`).
  """
  crit = crit or criterion_lib.CriterionConfig()
  weights = weights or co_config.LossWeights()
  main = criterion_lib.dino_criterion(outputs, targets, crit, axis_name=axis_name)
  co = outputs.get("co_outputs")
  if co is None:
    return main
  extra_terms = {}
  if "atss" in co:
    extra_terms.update(aux_losses.atss_losses(co["atss"], axis_name=axis_name))
  if "rpn" in co:
    extra_terms.update(aux_losses.rpn_losses(co["rpn"], axis_name=axis_name))
  if "roi" in co:
    extra_terms.update(aux_losses.roi_losses(co["roi"], axis_name=axis_name))
  for name, queries in co.get("pos_queries", {}).items():
    extra_terms.update(positive_query_losses(outputs["extra_outputs"][name], queries, crit,
                                             name=name, axis_name=axis_name))
  weights_by_name = co_dino_loss_weights(extra_terms, crit, weights)
  total = main["loss"] + sum(weights_by_name[k] * v for k, v in extra_terms.items())
  return {**main, **extra_terms, "loss": total, "metric_loss_main": main["loss"]}
