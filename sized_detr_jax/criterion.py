"""DINO's set criterion as pure functions: focal classification, L1 or Sized L1, and GIoU losses
over the final decoder layer, the auxiliary decoder layers, the encoder proposals (two-stage
"interm" output) and the denoising groups.

Entry points:
  * `set_criterion(outputs, targets, matches, config)`: the losses for given matches.
  * `dino_criterion(outputs, targets, config)`: matches every Hungarian-matched branch
    (final + aux + interm stacked, one host call per device shard, see `compute_matches`) and
    returns `set_criterion`'s result; the trainer calls this inside its jitted step.
  * `one_to_many_criterion(outputs, targets, config)`: Semi-DETR's first stage, the same losses
    under the task-aligned one-to-many assignment (on device, no host call).

All three return one flat dict of scalars:
  * `loss`: the weighted total (what to differentiate);
  * `loss_ce`, `loss_bbox`, `loss_giou`: final decoder layer; the same names with suffix
    `_aux_{i}` for decoder layer i (0 .. L-2), `_interm` for the encoder proposals, `_dn` for the
    last layer's denoising queries and `_dn_aux_{i}` for layer i's denoising queries. These are
    unweighted (as DINO's loss dict); `loss_weights` gives each one's weight;
  * `metric_*`: diagnostics that are not part of `loss`: `metric_num_boxes`,
    `metric_weighted_{ce,bbox,giou}` (each kind's weighted sum in `loss`) and, per COCO size
    (small / medium / large: area < 32^2, < 96^2, >= 96^2 pixels of the original image), the
    final layer's mean box loss `metric_loss_bbox_{size}`, mean GIoU loss
    `metric_loss_giou_{size}` and count `metric_num_boxes_{size}`.

Normalisation follows DINO (models/dino/dino.py SetCriterion.forward): every matched branch
divides its summed losses by `num_boxes`, the number of valid ground-truth boxes in the global
batch clamped at >= 1; the denoising losses by the number of positive denoising queries (DINO's
`num_boxes * dn groups`). Under `jax.jit` the sums are global even when the batch is sharded.
Inside `jax.shard_map` pass `axis_name` (the mesh axis of the batch): every sum is `psum`-ed, so
each shard returns the same global values.
(DINO clamps the per-GPU average count at 1 and lets DDP average the gradients; that equals the
global sum over the global count, which is what this computes, except for the clamp when a batch
has fewer boxes than devices.)

Boxes are normalised cxcywh; `targets` follows the shared batch contract (`boxes [B, G, 4]`,
`labels [B, G]`, `valid [B, G]`, `orig_size [B, 2]` (h, w)).
"""
from collections.abc import Iterable, Mapping
import dataclasses
from typing import Any

import chex
import jax
import jax.numpy as jnp
import ml_collections

from sized_detr_jax import box_ops
from sized_detr_jax import config_lib
from sized_detr_jax import losses
from sized_detr_jax import matching

# The model's outputs dict and the batch's targets dict (shapes: `set_criterion`).
Outputs = Mapping[str, Any]
Targets = Mapping[str, jax.Array]

CLS_LOSSES = ("focal", "qfl")

# COCO's area ranges (pycocotools COCOeval Params.areaRng): small < 32^2 <= medium < 96^2 <= large.
SIZE_THRESHOLDS = (32.0**2, 96.0**2)
SIZE_NAMES = ("small", "medium", "large")


@dataclasses.dataclass(frozen=True)
class CriterionConfig:
  """The criterion's settings (`config.criterion`), resolved once; defaults are DINO-4scale's
  (IDEA-Research/DINO config/DINO/DINO_4scale.py).

  Attributes:
    cls_loss_coef, bbox_loss_coef, giou_loss_coef: loss weights (1.0, 5.0, 2.0).
    set_cost_class, set_cost_bbox, set_cost_giou: matching cost weights (2.0, 5.0, 2.0).
    focal_alpha, focal_gamma: focal loss and focal matching cost parameters (0.25, 2.0).
    bbox_loss: "l1" (DINO) or "sized_l1" (the paper), used in every branch.
    sized_l1_rescale: rescale Sized L1 by the mean target width/height (losses.sized_l1_loss).
    cls_loss: "focal" (DINO) or "qfl" (Co-DINO's quality focal loss, IoU soft targets) in the
      matched and denoising branches; qfl_beta its exponent (2.0).
    matcher_box_cost: "l1" (DINO and the paper) or "sized_l1" box term of the matching cost
      (rescaled like the loss when sized_l1_rescale is set).
    matcher_prune: send the host only each ground truth's G cheapest queries instead of the
      whole [Q, G] matching cost (`matching.hungarian_matching(prune=True)`: the same optimal
      totals, less host traffic: docs/benchmarks.md). Off by default: with tied costs the
      chosen assignment may differ, so runs would not repeat the unpruned ones bit for bit.
    interm_loss_coef: extra factor on the encoder-proposal losses (1.0).
    use_dn: add the denoising losses when the outputs carry `dn_outputs`.
    o2m_topk, o2m_alpha, o2m_beta: task-aligned assigner of `one_to_many_criterion` (Semi-DETR
      stage 1: top-13 queries per ground truth, alignment `score^1 * IoU^6`).
  """
  cls_loss_coef: float = 1.0
  bbox_loss_coef: float = 5.0
  giou_loss_coef: float = 2.0
  set_cost_class: float = 2.0
  set_cost_bbox: float = 5.0
  set_cost_giou: float = 2.0
  focal_alpha: float = 0.25
  focal_gamma: float = 2.0
  bbox_loss: str = "l1"
  sized_l1_rescale: bool = False
  cls_loss: str = "focal"
  qfl_beta: float = 2.0
  matcher_box_cost: str = "l1"
  matcher_prune: bool = False
  interm_loss_coef: float = 1.0
  use_dn: bool = True
  o2m_topk: int = 13
  o2m_alpha: float = 1.0
  o2m_beta: float = 6.0

  def __post_init__(self):
    config_lib.check_choice("criterion config: cls_loss", self.cls_loss, CLS_LOSSES)
    for field in ("bbox_loss", "matcher_box_cost"):
      config_lib.check_choice(f"criterion config: {field}", getattr(self, field),
                              losses.BOX_LOSSES)

  def classification_loss(self, logits, onehot, pred_boxes=None, target_boxes=None):
    """Per-element classification loss against one-hot targets ([..., C], 0 rows: background).

    "focal": DINO's sigmoid focal loss. "qfl": Co-DINO's quality focal loss, the positives'
    target being the IoU of the (detached) predicted box with its ground truth: `pred_boxes`,
    `target_boxes` [..., 4] normalised cxcywh, aligned with the logits' leading dims.
    """
    if self.cls_loss == "focal":
      return losses.sigmoid_focal_loss(logits, onehot, alpha=self.focal_alpha,
                                       gamma=self.focal_gamma)
    iou = box_ops.elementwise_box_iou(
        box_ops.box_cxcywh_to_xyxy(jax.lax.stop_gradient(pred_boxes).astype(jnp.float32)),
        box_ops.box_cxcywh_to_xyxy(target_boxes.astype(jnp.float32)))
    return losses.quality_focal_loss(logits, onehot, iou, beta=self.qfl_beta)

  def box_loss(self, pred, target, valid, *, axis_name=None):
    """The configured box regression loss per box (`losses.box_loss` of `bbox_loss`)."""
    return losses.box_loss(self.bbox_loss, pred, target, valid, rescale=self.sized_l1_rescale,
                           axis_name=axis_name)

  @classmethod
  def from_config(cls, section=None, **overrides):
    """A `config.criterion` section (ConfigDict or dict; None: defaults) -> CriterionConfig.

    Resolved once where a method is built. Unknown fields are an error naming them.
    """
    given = config_lib.section_fields(section, [f.name for f in dataclasses.fields(cls)],
                                      "config.criterion")
    return cls(**{**given, **overrides})


def default_criterion_config():
  """`config.criterion` defaults as a ConfigDict (the fields of `CriterionConfig`)."""
  return ml_collections.ConfigDict(dataclasses.asdict(CriterionConfig()))


def _checked(config):
  """None -> the defaults; a CriterionConfig as is (resolve ConfigDicts once, with from_config)."""
  if config is None:
    return CriterionConfig()
  if not isinstance(config, CriterionConfig):
    raise TypeError(f"criterion: expected a CriterionConfig (CriterionConfig.from_config("
                    f"config.criterion)), got {type(config).__name__}")
  return config


def check_inputs(outputs, targets):
  """Trace-time shape checks of the criterion's public inputs (shared batch contract)."""
  logits, boxes = outputs["pred_logits"], outputs["pred_boxes"]
  chex.assert_rank(logits, 3)
  chex.assert_shape(boxes, logits.shape[:2] + (4,))
  chex.assert_rank([targets["boxes"], targets["labels"], targets["valid"]], [3, 2, 2])
  chex.assert_equal_shape([targets["labels"], targets["valid"], targets["boxes"][..., 0]])
  chex.assert_equal_shape_prefix([logits, targets["labels"]], 1)


# ---------------------------------------------------------------------------------------------
# Matched (Hungarian) branches.


def _matched_terms(logits, boxes, targets, matches, cfg, axis_name):
  """Per-element losses of one matched branch.

  As DINO's models/dino/dino.py SetCriterion.loss_labels (focal loss over every query and
  class, one-hot targets at the matched queries) and loss_boxes (L1 / Sized L1 and GIoU of the
  matched pairs).

  Args:
    logits: [B, Q, C]; boxes: [B, Q, 4] normalised cxcywh; matches: [B, G] int32 (-1 = none).

  Returns:
    (ce [B, Q, C], box [B, G], giou [B, G]) unreduced losses (0 for unmatched columns).
  """
  num_queries = logits.shape[-2]
  gt_boxes, gt_labels = targets["boxes"], targets["labels"]
  pair_valid = targets["valid"] & (matches >= 0) & (matches < num_queries)  # [B, G]
  # Label of the ground truth matched to each query, -1 if none (one_hot(-1) is all zeros).
  # A comparison instead of a scatter keeps it sharding-friendly (batch-sharded explicit meshes).
  assigned = pair_valid[:, None, :] & (matches[:, None, :] == jnp.arange(num_queries)[:, None])
  query_label = jnp.sum(jnp.where(assigned, gt_labels[:, None, :] + 1, 0), axis=-1) - 1  # [B, Q]
  onehot = jax.nn.one_hot(query_label, logits.shape[-1], dtype=logits.dtype)
  query_target = None
  if cfg.cls_loss != "focal":  # the box of the ground truth matched to each query
    query_target = jnp.sum(jnp.where(assigned[..., None], gt_boxes[:, None, :, :], 0.0), axis=2)
  ce = cfg.classification_loss(logits, onehot, boxes, query_target)

  src = jnp.take_along_axis(boxes, jnp.clip(matches, 0, num_queries - 1)[..., None], axis=1)
  box = cfg.box_loss(src, gt_boxes, pair_valid, axis_name=axis_name)  # [B, G]
  giou = losses.giou_loss(src, gt_boxes, pair_valid)
  return ce, box, giou


def _matched_losses(output, targets, matches, num_boxes, cfg, axis_name, suffix):
  """One matched branch: ({loss_ce, loss_bbox, loss_giou}+suffix normalised by num_boxes,
  per-column box loss [B, G], per-column GIoU loss [B, G])."""
  ce, box, giou = _matched_terms(output["pred_logits"], output["pred_boxes"], targets, matches,
                                 cfg, axis_name)
  normalised = {f"loss_ce{suffix}": losses.global_sum(ce, axis_name) / num_boxes,
                f"loss_bbox{suffix}": losses.global_sum(box, axis_name) / num_boxes,
                f"loss_giou{suffix}": losses.global_sum(giou, axis_name) / num_boxes}
  return normalised, box, giou


def _size_category(targets):
  """[B, G] int: 0 small, 1 medium, 2 large, by the box area in original-image pixels."""
  size = targets["orig_size"] if "orig_size" in targets else targets["size"]
  size = size.astype(jnp.float32)
  area = targets["boxes"][..., 2] * targets["boxes"][..., 3] * (size[:, 0] * size[:, 1])[:, None]
  return sum((area >= threshold).astype(jnp.int32) for threshold in SIZE_THRESHOLDS)


def _size_metrics(box, giou, targets, matches, axis_name):
  """Per-column box and GIoU losses [B, G] averaged within each COCO size range."""
  category = _size_category(targets)
  counted = targets["valid"] & (matches >= 0)
  metrics = {}
  for index, name in enumerate(SIZE_NAMES):
    in_range = counted & (category == index)
    count = losses.global_sum(in_range.astype(jnp.float32), axis_name)
    metrics[f"metric_num_boxes_{name}"] = count
    metrics[f"metric_loss_bbox_{name}"] = (
        losses.global_sum(jnp.where(in_range, box, 0.0), axis_name) / jnp.maximum(count, 1.0))
    metrics[f"metric_loss_giou_{name}"] = (
        losses.global_sum(jnp.where(in_range, giou, 0.0), axis_name) / jnp.maximum(count, 1.0))
  return metrics


# ---------------------------------------------------------------------------------------------
# Denoising branch.


def _dn_losses(dn_outputs, dn_meta, targets, cfg, axis_name):
  """Denoising losses of every decoder layer, on their known assignment.

  As DINO's models/dino/dino.py SetCriterion.forward (dn part): positive denoising queries learn
  their ground truth's label and box, negative ones the background; normalised by the number
  of positive queries (DINO: num_boxes * number of dn groups). Invalid (static padding) slots
  get no loss at all.

  Args:
    dn_outputs: {"pred_logits": [L, B, D, C], "pred_boxes": [L, B, D, 4]}.
    dn_meta: {"gt_index": [B, D] int32, "positive": [B, D] bool, "valid": [B, D] bool}.

  Returns:
    {loss_ce_dn, loss_bbox_dn, loss_giou_dn} for the last layer and the same with `_aux_{i}`
    for layer i < L - 1.
  """
  logits, boxes = dn_outputs["pred_logits"], dn_outputs["pred_boxes"]
  num_layers, num_classes = logits.shape[0], logits.shape[-1]
  gt_index = jnp.maximum(dn_meta["gt_index"], 0)
  gt_valid = jnp.take_along_axis(targets["valid"], gt_index, axis=1)
  positive = dn_meta["positive"] & dn_meta["valid"] & (dn_meta["gt_index"] >= 0) & gt_valid
  labels = jnp.take_along_axis(targets["labels"], gt_index, axis=1)  # [B, D]
  box_target = jnp.take_along_axis(targets["boxes"], gt_index[..., None], axis=1)  # [B, D, 4]
  cls_target = jax.nn.one_hot(labels, num_classes, dtype=logits.dtype) * positive[..., None]
  num_dn = jnp.maximum(losses.global_sum(positive.astype(jnp.float32), axis_name), 1.0)

  ce = cfg.classification_loss(logits, cls_target[None], boxes, box_target[None])
  ce = jnp.where(dn_meta["valid"][None, ..., None], ce, 0.0)  # [L, B, D, C]
  box = cfg.box_loss(boxes, box_target[None], positive[None], axis_name=axis_name)  # [L, B, D]
  giou = losses.giou_loss(boxes, box_target[None], positive[None])
  result = {}
  for layer in range(num_layers):
    suffix = "_dn" if layer == num_layers - 1 else f"_dn_aux_{layer}"
    result[f"loss_ce{suffix}"] = losses.global_sum(ce[layer], axis_name) / num_dn
    result[f"loss_bbox{suffix}"] = losses.global_sum(box[layer], axis_name) / num_dn
    result[f"loss_giou{suffix}"] = losses.global_sum(giou[layer], axis_name) / num_dn
  return result


# ---------------------------------------------------------------------------------------------
# Public API.


def loss_weights(names: Iterable[str], config: "CriterionConfig | None" = None
                 ) -> dict[str, float]:
  """Weight of every loss name: cls/bbox/giou coefficient by prefix, x interm_loss_coef for
  `_interm` (DINO's weight_dict in models/dino/dino.py build_dino).

  Args:
    names: iterable of loss names as returned by `set_criterion` (`loss_ce...`, `loss_bbox...`,
      `loss_giou...`).

  Returns:
    dict name -> float weight.

  Raises:
    ValueError: a name with none of the three prefixes.
  """
  cfg = _checked(config)
  prefixes = {"loss_ce": cfg.cls_loss_coef, "loss_bbox": cfg.bbox_loss_coef,
              "loss_giou": cfg.giou_loss_coef}
  weights = {}
  for name in names:
    prefix = next((p for p in prefixes if name == p or name.startswith(p + "_")), None)
    if prefix is None:
      raise ValueError(f"loss_weights: unknown loss name {name!r}")
    weight = prefixes[prefix]
    if name.endswith("_interm"):
      weight *= cfg.interm_loss_coef
    weights[name] = weight
  return weights


def num_valid_boxes(targets: Targets, axis_name: losses.AxisName = None) -> jax.Array:
  """DINO's `num_boxes`: valid ground-truth boxes in the global batch, clamped at >= 1 ([] f32)."""
  return jnp.maximum(losses.global_sum(targets["valid"].astype(jnp.float32), axis_name), 1.0)


def set_criterion(outputs: Outputs, targets: Targets, matches: Mapping[str, Any],
                  config: "CriterionConfig | None" = None, *,
                  axis_name: losses.AxisName = None) -> dict[str, jax.Array]:
  """DINO's losses for given matches.

  Args:
    outputs: the model's outputs dict (shared contract): `pred_logits [B, Q, C]`,
      `pred_boxes [B, Q, 4]`, optional `aux_outputs` (list of L-1 such dicts),
      `interm_outputs` (one such dict), `dn_outputs` + `dn_meta`.
    targets: `boxes [B, G, 4]` normalised cxcywh, `labels [B, G]` int32, `valid [B, G]` bool,
      and `orig_size [B, 2]` (or `size`) (h, w) for the per-size metrics (omitted if absent).
    matches: {"final": [B, G] int32, "aux": [L-1, B, G] int32 (or a list of [B, G]) when
      outputs has aux_outputs, "interm": [B, G] int32 when outputs has interm_outputs}; query
      index per ground-truth column, -1 for none (`hungarian_matching`'s output).
    config: a `CriterionConfig` (`CriterionConfig.from_config(config.criterion)`), or None for
      DINO's defaults.
    axis_name: only inside `jax.shard_map`: the mesh axis name(s) sharding the batch.

  Returns:
    Flat dict of [] float32 scalars (module docstring): `loss`, the `loss_*` terms, `metric_*`.
  """
  cfg = _checked(config)
  check_inputs(outputs, targets)
  num_boxes = num_valid_boxes(targets, axis_name)
  result, final_box, final_giou = _matched_losses(outputs, targets, matches["final"], num_boxes,
                                                  cfg, axis_name, "")
  for i, aux in enumerate(outputs.get("aux_outputs", ())):
    result.update(_matched_losses(aux, targets, matches["aux"][i], num_boxes, cfg, axis_name,
                                  f"_aux_{i}")[0])
  if "interm_outputs" in outputs:
    result.update(_matched_losses(outputs["interm_outputs"], targets, matches["interm"],
                                  num_boxes, cfg, axis_name, "_interm")[0])
  metrics = {}
  if "orig_size" in targets or "size" in targets:
    metrics = _size_metrics(final_box, final_giou, targets, matches["final"], axis_name)
  return _add_dn_and_total(result, metrics, outputs, targets, cfg, axis_name)


def _add_dn_and_total(result, metrics, outputs, targets, cfg, axis_name):
  """Adds the denoising losses (if any), the weighted total `loss` and `metric_num_boxes`."""
  if cfg.use_dn and "dn_outputs" in outputs:
    result.update(_dn_losses(outputs["dn_outputs"], outputs["dn_meta"], targets, cfg, axis_name))
  weights = loss_weights(result, cfg)
  total = sum(weights[name] * value for name, value in result.items())
  metrics["metric_num_boxes"] = losses.global_sum(targets["valid"].astype(jnp.float32), axis_name)
  # The weighted share of each kind of term in `loss` (the trainer's gradient split reads them).
  for kind in ("ce", "bbox", "giou"):
    metrics[f"metric_weighted_{kind}"] = sum(
        weights[name] * value for name, value in result.items()
        if name == f"loss_{kind}" or name.startswith(f"loss_{kind}_"))
  return {"loss": total, **result, **metrics}


def _task_aligned_losses(output, targets, cfg, axis_name, suffix):
  """One branch under the task-aligned one-to-many assignment (Semi-DETR stage 1).

  As Semi-DETR's detr_od/models/dense_heads/dino_detr_ssod_head.py loss_single (warm-up
  branch): task-aligned focal loss against the soft targets, box losses of every assigned query
  weighted by its soft target; all three divided by the global sum of soft targets clamped at
  >= 1 (their `sum_alignment_metrics` / `reg_avg_factor`, averaged over GPUs).
  """
  logits, boxes = output["pred_logits"], output["pred_boxes"]
  labels, gt_boxes = targets["labels"], targets["boxes"]
  assignment = matching.task_aligned_assign(logits, boxes, labels, gt_boxes, targets["valid"],
                                            topk=cfg.o2m_topk, alpha=cfg.o2m_alpha,
                                            beta=cfg.o2m_beta)
  weight = assignment.query_targets  # [B, Q]
  norm = jnp.maximum(losses.global_sum(weight, axis_name), 1.0)
  soft = matching.task_aligned_class_targets(assignment.query_gt, weight, labels,
                                             logits.shape[-1])
  ce = losses.task_aligned_focal_loss(logits, soft, gamma=cfg.focal_gamma)
  positive = assignment.query_gt >= 0
  target = jnp.take_along_axis(gt_boxes, jnp.maximum(assignment.query_gt, 0)[..., None], axis=1)
  box = cfg.box_loss(boxes, target, positive, axis_name=axis_name) * weight  # [B, Q]
  giou = losses.giou_loss(boxes, target, positive) * weight
  return {f"loss_ce{suffix}": losses.global_sum(ce, axis_name) / norm,
          f"loss_bbox{suffix}": losses.global_sum(box, axis_name) / norm,
          f"loss_giou{suffix}": losses.global_sum(giou, axis_name) / norm}


def one_to_many_criterion(outputs: Outputs, targets: Targets,
                          config: "CriterionConfig | None" = None, *,
                          axis_name: losses.AxisName = None) -> dict[str, jax.Array]:
  """Semi-DETR's first-stage losses: task-aligned one-to-many assignment on every branch.

  The final, auxiliary and interm branches are assigned on device by
  `matching.task_aligned_assign` (no host call) and scored with `_task_aligned_losses`; the
  denoising groups keep their known assignment and DINO's losses, as in `set_criterion`. Loss
  names, weights (`loss_weights`) and `axis_name` are those of `set_criterion`; Semi-DETR's
  stage-1 classification weight is 2.0 (set `cls_loss_coef`). No per-size metrics.

  Args:
    outputs, targets, config, axis_name: as `set_criterion` (no matches needed).

  Returns:
    Flat dict of [] float32 scalars: `loss`, the `loss_*` terms, `metric_num_boxes`.
  """
  cfg = _checked(config)
  check_inputs(outputs, targets)
  result = _task_aligned_losses(outputs, targets, cfg, axis_name, "")
  for i, aux in enumerate(outputs.get("aux_outputs", ())):
    result.update(_task_aligned_losses(aux, targets, cfg, axis_name, f"_aux_{i}"))
  if "interm_outputs" in outputs:
    result.update(_task_aligned_losses(outputs["interm_outputs"], targets, cfg, axis_name,
                                       "_interm"))
  return _add_dn_and_total(result, {}, outputs, targets, cfg, axis_name)


def compute_matches(outputs: Outputs, targets: Targets, config: "CriterionConfig | None" = None,
                    *, axis_name: losses.AxisName = None) -> dict[str, Any]:
  """Hungarian matches of the final, auxiliary and interm branches in ONE host call.

  The costs of all branches are stacked into [N, B, Q, G] (N = 1 + len(aux_outputs) + interm),
  so a jitted step makes one host call per device shard (`matching.hungarian_matching`).
  Branches with fewer queries are padded with rows of cost `matching.NONFINITE_COST`, which are
  only ever picked when an image has more ground truth than queries; such picks become -1.

  Args:
    outputs, targets: as `set_criterion`.
    config: matching costs from `set_cost_*`, `focal_*`, `matcher_box_cost`, `sized_l1_rescale`;
      `matcher_prune` for the host transfer.
    axis_name: only inside `jax.shard_map`, for a global mean box size in the rescaled
      Sized L1 cost.

  Returns:
    {"final": [B, G], "aux": [L-1, B, G] (if aux_outputs), "interm": [B, G] (if interm)} int32.
  """
  cfg = _checked(config)
  aux = list(outputs.get("aux_outputs", ()))
  branches = [outputs] + aux + ([outputs["interm_outputs"]] if "interm_outputs" in outputs else [])
  costs = [matching.matching_cost(
      b["pred_logits"], b["pred_boxes"], targets["labels"], targets["boxes"], targets["valid"],
      class_weight=cfg.set_cost_class, bbox_weight=cfg.set_cost_bbox,
      giou_weight=cfg.set_cost_giou, focal_alpha=cfg.focal_alpha, focal_gamma=cfg.focal_gamma,
      box_cost=cfg.matcher_box_cost, sized_l1_rescale=cfg.sized_l1_rescale,
      axis_name=axis_name) for b in branches]
  num_queries = [c.shape[-2] for c in costs]
  max_queries = max(num_queries)
  costs = [jnp.pad(c, ((0, 0), (0, max_queries - c.shape[-2]), (0, 0)),
                   constant_values=matching.NONFINITE_COST) for c in costs]
  # One host call per device shard of the mesh entered with jax.set_mesh (one call without).
  stacked = matching.hungarian_matching(jnp.stack(costs), targets["valid"],
                                        prune=cfg.matcher_prune)  # [N, B, G]
  limit = jnp.asarray(num_queries, jnp.int32)[:, None, None]
  stacked = jnp.where(stacked < limit, stacked, -1)
  result = {"final": stacked[0]}
  if aux:
    result["aux"] = stacked[1:1 + len(aux)]
  if "interm_outputs" in outputs:
    result["interm"] = stacked[-1]
  return result


def dino_criterion(outputs: Outputs, targets: Targets, config: "CriterionConfig | None" = None,
                   *, axis_name: losses.AxisName = None) -> dict[str, jax.Array]:
  """Match (one host call per shard) and compute DINO's losses: the trainer's one call.

  Args:
    outputs, targets, config: as `set_criterion`.
    axis_name: only inside `jax.shard_map` (see `set_criterion`).

  The host matching makes one call per device shard of the mesh entered with
  `jax.set_mesh(mesh)` (as the trainer does; `matching.hungarian_matching`), one call without.

  Returns:
    `set_criterion`'s dict.
  """
  matches = compute_matches(outputs, targets, config, axis_name=axis_name)
  return set_criterion(outputs, targets, matches, config, axis_name=axis_name)
