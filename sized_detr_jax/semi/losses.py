"""Semi-DETR's detection losses: supervised + weighted unsupervised criteria, stage-wise
assignment, class-agnostic encoder proposals, and the per-branch box loss choice (`bbox_loss` x
`sized_l1_branches`, the paper's Tables 1-3)."""
import dataclasses

import jax.numpy as jnp

from sized_detr_jax import criterion as criterion_lib

STAGES = (1, 2)


def branch_criterion_configs(crit, semi, stage):
  """Criterion configs of the supervised and unsupervised branches.

  Args:
    crit: the supervised branch's `criterion.CriterionConfig` (its `bbox_loss` = "l1" |
      "sized_l1").
    semi: `semi.config.SemiConfig`; `sized_l1_branches` = "both" (the configured bbox_loss in
      both branches) | "sup_only" (the configured loss in the supervised branch, plain L1 for
      pseudo-labels).
    stage: 1 (one-to-many, before the switch) or 2 (one-to-one, after it).

  Returns:
    (sup CriterionConfig, unsup CriterionConfig). The unsupervised branch has no denoising loss
    in stage 1 (Semi-DETR: "the unsupervised denoising loss is active only after the switch").

  Raises:
    ValueError: unknown stage.
  """
  if stage not in STAGES:
    raise ValueError(f"semi_losses: stage must be one of {STAGES}, got {stage!r}")
  unsup = crit
  if semi.sized_l1_branches == "sup_only":
    unsup = dataclasses.replace(unsup, bbox_loss="l1")
  if stage == 1:
    unsup = dataclasses.replace(unsup, use_dn=False)
  return crit, unsup


_TERMS = ("loss_ce", "loss_bbox", "loss_giou")


def branch_losses(outputs, targets, cfg, stage, *, agnostic_interm=True, axis_name=None):
  """One branch's criterion: stage 1 one-to-many, stage 2 Hungarian; encoder proposals optionally
  class-agnostic.

  With `agnostic_interm` the encoder-proposal ("interm") branch is assigned and scored against
  the same boxes with every label 0, as Semi-DETR's head (detr_od/models/dense_heads/
  dino_detr_ssod_head.py `loss`: `binary_labels_list = zeros_like(gt_labels)` for
  `enc_cls_scores`, in the supervised and the unsupervised branch, both stages): the proposals
  learn objectness in their class-0 logit, every other logit is a negative. The decoder and
  denoising branches keep the real labels. Stage 2 still makes one host matching call: the
  interm cost columns use the class-0 logit for every class (the focal cost reads only the
  labelled column, so this is the all-zero-label cost).

  Args:
    outputs, targets: as `criterion.set_criterion` (targets need `labels`; outputs
      `interm_outputs` for the agnostic branch to apply).
    cfg: the branch's `criterion.CriterionConfig`.
    stage: 1 or 2 (static).
    agnostic_interm: class-agnostic encoder proposals (Semi-DETR) or DINO's labelled ones.
    axis_name: only inside `jax.shard_map`.

  Returns:
    The criterion's flat dict; `loss_{ce,bbox,giou}_interm` are the agnostic terms (weighted by
    `criterion.loss_weights`, included in `loss` and `metric_weighted_*`).
  """
  kwargs = dict(axis_name=axis_name)
  if not agnostic_interm or "interm_outputs" not in outputs:
    if stage == 1:
      return criterion_lib.one_to_many_criterion(outputs, targets, cfg, **kwargs)
    return criterion_lib.dino_criterion(outputs, targets, cfg, **kwargs)
  interm = {k: outputs["interm_outputs"][k] for k in ("pred_logits", "pred_boxes")}
  main = {k: v for k, v in outputs.items() if k != "interm_outputs"}
  agnostic = {**targets, "labels": jnp.zeros_like(targets["labels"])}
  interm_cfg = dataclasses.replace(cfg, use_dn=False)
  if stage == 1:
    result = criterion_lib.one_to_many_criterion(main, targets, cfg, **kwargs)
    extra = criterion_lib.one_to_many_criterion(interm, agnostic, interm_cfg, **kwargs)
  else:
    logits = interm["pred_logits"]
    probe = {**main, "interm_outputs": {
        "pred_logits": jnp.broadcast_to(logits[..., :1], logits.shape),
        "pred_boxes": interm["pred_boxes"]}}
    matches = criterion_lib.compute_matches(probe, targets, cfg, **kwargs)
    interm_matches = {"final": matches.pop("interm")}
    result = criterion_lib.set_criterion(main, targets, matches, cfg, **kwargs)
    extra = criterion_lib.set_criterion(interm, agnostic, interm_matches, interm_cfg, **kwargs)
  terms = {f"{k}_interm": extra[k] for k in _TERMS}
  weights = criterion_lib.loss_weights(terms, cfg)
  result = dict(result)
  result.update(terms)
  result["loss"] = result["loss"] + sum(weights[k] * v for k, v in terms.items())
  for kind in ("ce", "bbox", "giou"):
    name = f"loss_{kind}_interm"
    result[f"metric_weighted_{kind}"] = result[f"metric_weighted_{kind}"] + (
        weights[name] * terms[name])
  return result


def semi_losses(student_outputs_l, targets_l, student_outputs_u, pseudo_targets, crit, semi,
                stage, *, axis_name=None):
  """Supervised + weighted unsupervised detection losses of one Semi-DETR step.

  Stage 1 uses `criterion.one_to_many_criterion` (task-aligned one-to-many assignment) in both
  branches, stage 2 `criterion.dino_criterion` (Hungarian); the switch covers every decoder
  layer and the encoder proposals, which are class-agnostic in both
  branches with `semi.agnostic_interm` (`branch_losses`). `stage` is static: compile one step
  per stage (the switch happens once) or select with `jax.lax.cond`.

  Args:
    student_outputs_l: the student's outputs on the labeled batch (shared contract).
    targets_l: the labeled batch's targets (`boxes`, `labels`, `valid`, `orig_size`/`size`).
    student_outputs_u: the student's outputs on the strong view of the unlabeled batch
      (denoising outputs built from the pseudo-labels, if any).
    pseudo_targets: `pseudo_labels.pseudo_targets`' dict (`boxes`, `labels`, `valid`, `size`).
    crit: `criterion.CriterionConfig`; semi: `semi.config.SemiConfig` (`unsup_weight`: 4.0,
      2.0 on COCO-full, scales every unsupervised term). See `branch_criterion_configs`.
    stage: 1 or 2 (static Python int).
    axis_name: only inside `jax.shard_map` (see `criterion.set_criterion`).

  Returns:
    Flat dict of [] f32: `loss` = sup loss + unsup_weight * unsup loss; `loss_sup`,
    `loss_unsup` (unweighted totals); every term of both criteria prefixed `sup_` / `unsup_`.
  """
  sup_cfg, unsup_cfg = branch_criterion_configs(crit, semi, stage)

  def run(outputs, targets, cfg):
    return branch_losses(outputs, targets, cfg, stage, agnostic_interm=semi.agnostic_interm,
                         axis_name=axis_name)

  sup = run(student_outputs_l, targets_l, sup_cfg)
  unsup = run(student_outputs_u, pseudo_targets, unsup_cfg)
  result = {"loss": sup["loss"] + float(semi.unsup_weight) * unsup["loss"],
            "loss_sup": sup["loss"], "loss_unsup": unsup["loss"]}
  result.update({f"sup_{k}": v for k, v in sup.items() if k != "loss"})
  result.update({f"unsup_{k}": v for k, v in unsup.items() if k != "loss"})
  return result
