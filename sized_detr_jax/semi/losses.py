"""Semi-DETR's detection losses: supervised + weighted unsupervised criteria, stage-wise
assignment, and the per-branch box loss choice (`bbox_loss` x `sized_l1_branches`, the paper's
Tables 1-3)."""
import dataclasses

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


def semi_losses(student_outputs_l, targets_l, student_outputs_u, pseudo_targets, crit, semi,
                stage, *, axis_name=None):
  """Supervised + weighted unsupervised detection losses of one Semi-DETR step.

  Stage 1 uses `criterion.one_to_many_criterion` (task-aligned one-to-many assignment) in both
  branches, stage 2 `criterion.dino_criterion` (Hungarian); the switch covers every decoder
  layer and the encoder proposals (design.md section 9). `stage` is static: compile one step per
  stage (the switch happens once) or select with `jax.lax.cond`.

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
    if stage == 1:
      return criterion_lib.one_to_many_criterion(outputs, targets, cfg, axis_name=axis_name)
    return criterion_lib.dino_criterion(outputs, targets, cfg, axis_name=axis_name)

  sup = run(student_outputs_l, targets_l, sup_cfg)
  unsup = run(student_outputs_u, pseudo_targets, unsup_cfg)
  result = {"loss": sup["loss"] + float(semi.unsup_weight) * unsup["loss"],
            "loss_sup": sup["loss"], "loss_unsup": unsup["loss"]}
  result.update({f"sup_{k}": v for k, v in sup.items() if k != "loss"})
  result.update({f"unsup_{k}": v for k, v in unsup.items() if k != "loss"})
  return result
