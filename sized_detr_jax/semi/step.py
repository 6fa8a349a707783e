"""The Semi-DETR loss of one training step: teacher on the weak view, student on the labeled
batch and the strong view, pseudo-labels, cost-based mining and the cross-view consistency.

`make_semi_loss(model, crit, semi, stage)` returns `loss_fn(params, state, batch, rng) ->
(loss, metrics)` (`Method.loss_fn(stage)`); the trainer differentiates it, applies the optimiser
and updates the EMA teacher (`state.ema_params` = EMA of `params["dino"]`) in the same step. `batch` is
`{"labeled": <labeled batch>, "unlabeled": {"weak": <view>, "strong": <view>}}`, both sharded on
the batch axis. `stage` is static (1: one-to-many, 2: one-to-one after `semi.switch_step`): the
trainer compiles one step per stage and switches once.

Per step (design.md section 9, Semi-DETR's detr_ssod/models/dino_detr_ssod.py):
1. teacher (EMA params, no gradient): encode the weak view once, decode it -> pseudo-labels
   (`pseudo_labels.pseudo_targets`: class-wise NMS, the adaptive initial set, score >= 0.4,
   boxes mapped into the strong view);
2. student on the labeled batch (denoising from its ground truth) and on the strong view
   (denoising from the pseudo-labels in stage 2 only);
3. stage 1 with `semi.consistency`: consistency queries for every initial pseudo box (content =
   the student's projector over RoIAlign of the teacher's weak-view features, reference = the box
   in each view), decoded in the student's strong-view pass and in a second decode of the
   teacher's weak-view encoding; the loss counts the boxes in the final set or mined by the GMM
   over the student's matched costs (gathered over the whole global batch by jit);
4. `semi.losses.semi_losses` (supervised + unsup_weight x unsupervised, per-branch box loss) plus
   unsup_weight x the consistency loss.

Queries are built for the whole initial set and the mined subset only masks the loss, because
mining needs the student's predictions of the same pass that carries the consistency queries.
"""
import jax
import jax.numpy as jnp

from sized_detr_jax.data import batch as batch_lib
from sized_detr_jax.semi import consistency
from sized_detr_jax.semi import gmm
from sized_detr_jax.semi import losses as semi_losses_lib
from sized_detr_jax.semi import model as semi_model
from sized_detr_jax.semi import pseudo_labels


def make_semi_loss(model, crit, cfg, stage):
  """Semi-DETR's `loss_fn(params, state, batch, rng) -> (loss, metrics)` for one stage.

  Args:
    model: `semi.model.SemiDETR`.
    crit: `criterion.CriterionConfig` of the supervised branch (also the mining costs).
    cfg: `semi.config.SemiConfig`.
    stage: 1 or 2 (static).

  Returns:
    loss_fn; its metrics are `semi.losses.semi_losses`' dict plus `loss_consistency*`,
    `metric_pseudo_{initial,final,mined}` (mean boxes per image), `metric_gmm_threshold`.
    The teacher is `state.ema_params` ({"dino": ...}); host matching follows the mesh entered
    with `jax.set_mesh`.
  """
  unsup_weight = float(cfg.unsup_weight)
  use_consistency = bool(cfg.consistency) and stage == 1

  def loss_fn(params, state, batch, rng):
    labeled, weak, strong = batch["labeled"], batch["unlabeled"]["weak"], batch["unlabeled"][
        "strong"]
    variables = lambda p: {"params": p, **state.model_state}
    teacher = variables(jax.lax.stop_gradient(state.ema_params))
    rng_l, rng_u, rng_drop = jax.random.split(rng, 3)

    # 1. Teacher on the weak view -> pseudo-labels in the strong view.
    enc_t = model.apply(teacher, batch_lib.model_images(weak), weak["pixel_mask"],
                        method=semi_model.encode)
    out_t = model.apply(teacher, enc_t, method=semi_model.decode)
    pseudo = pseudo_labels.pseudo_targets(
        out_t, weak, strong, method=cfg.pseudo_method, max_pseudo=int(cfg.max_pseudo),
        final_threshold=float(cfg.final_threshold), iou_threshold=float(cfg.nms_iou),
        num_candidates=int(cfg.nms_candidates), max_detections=int(cfg.max_detections))

    # 2. Student: labeled batch, strong view (+ consistency queries in stage 1).
    student = variables(params)
    out_l = model.apply(student, batch_lib.model_images(labeled), labeled["pixel_mask"],
                        batch_lib.model_targets(labeled), train=True,
                        rngs={"dn": rng_l, "dropout": rng_drop})
    extra_s = extra_t = None
    if use_consistency:
      initial = pseudo["initial_valid"]
      rois = consistency.roi_features(enc_t["srcs"], pseudo["weak_boxes_xyxy"])
      content = model.apply(student, rois, initial, method=semi_model.project)
      extra_s = consistency.consistency_queries(pseudo["boxes"], content, initial)
      extra_t = consistency.consistency_queries(pseudo["weak_boxes"],
                                                jax.lax.stop_gradient(content), initial)
    out_u = model.apply(student, batch_lib.model_images(strong), strong["pixel_mask"],
                        pseudo if stage == 2 else None, train=True,
                        extra_queries=extra_s, rngs={"dn": rng_u, "dropout": rng_drop})

    # 3. Losses.
    losses = semi_losses_lib.semi_losses(out_l, batch_lib.model_targets(labeled), out_u, pseudo,
                                         crit, cfg, stage)
    metrics = {"metric_pseudo_initial": jnp.mean(jnp.sum(pseudo["initial_valid"], -1)),
               "metric_pseudo_final": jnp.mean(jnp.sum(pseudo["valid"], -1))}
    if use_consistency:
      mined = jnp.zeros_like(pseudo["valid"])
      if cfg.mining:
        costs, matched = gmm.matched_costs(out_u, pseudo, pseudo["initial_valid"], crit)
        mined, threshold = gmm.mine_by_cost(costs, matched)
        metrics["metric_gmm_threshold"] = threshold
      metrics["metric_pseudo_mined"] = jnp.mean(jnp.sum(mined, -1))
      chosen = consistency.consistency_set(pseudo, mined)
      out_tc = model.apply(teacher, enc_t, extra_queries=extra_t, method=semi_model.decode)
      groups = extra_s["valid"].shape[1] // chosen.shape[1]
      cons = consistency.consistency_loss(
          out_u["extra_outputs"]["hidden"], out_tc["extra_outputs"]["hidden"],
          jnp.concatenate([chosen] * groups, axis=1))
      losses["loss"] = losses["loss"] + unsup_weight * cons["loss_consistency"]
      losses.update(cons)
    losses.update(metrics)
    return losses["loss"], losses

  return loss_fn
