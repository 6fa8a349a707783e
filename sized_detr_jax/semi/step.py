"""The Semi-DETR loss of one training step: teacher on the weak view, student on the labeled
batch and the strong view, pseudo-labels, cost-based mining and the cross-view consistency.

`make_semi_loss(model, crit, semi, stage)` returns `loss_fn(params, state, batch, rng) ->
(loss, metrics)` (`Method.loss_fn(stage)`); the trainer differentiates it, applies the optimiser
and updates the EMA teacher (`state.ema_params` = EMA of `params["dino"]`) in the same step. `batch` is
`{"labeled": <labeled batch>, "unlabeled": {"weak": <view>, "strong": <view>}}`, both sharded on
the batch axis. `stage` is static (1: one-to-many, 2: one-to-one after `semi.switch_step`): the
trainer compiles one step per stage and switches once.

Per step (Semi-DETR's detr_ssod/models/dino_detr_ssod.py):
1. teacher (EMA params, no gradient): encode the weak view once, decode it -> pseudo-labels
   (`pseudo_labels.pseudo_targets`: class-wise NMS, the adaptive initial set, score >= 0.4,
   boxes mapped into the strong view);
2. student on the labeled batch (denoising from its ground truth) and on the strong view
   (denoising from the pseudo-labels in stage 2 only);
3. stage 1 with `semi.consistency`: consistency queries (content = the student's projector
   over RoIAlign of the teacher's weak-view features, reference = the box in each view) for the
   boxes in the final set or mined by the GMM over the student's matched costs (gathered over
   the whole global batch by jit), decoded in the student's strong-view pass and in a second
   decode of the teacher's weak-view encoding;
4. `semi.losses.semi_losses` (supervised + unsup_weight x unsupervised, per-branch box loss) plus
   unsup_weight x the consistency loss.

Which boxes get consistency queries (`semi.consistency_queries`): "chosen" (Semi-DETR: only
the final + mined boxes) needs the mining before the queries exist, so the student's
strong-view encoding is decoded twice, first without extra queries (the mining reads only the
matching queries, which consistency queries never change: the same outputs as in the second
decode, up to dropout), then with the queries (the loss pass). "initial": one decode with
queries for the whole initial set, the loss masked to the chosen ones; the masked queries still
share self-attention with the chosen ones of their group, so the consistency loss differs
(tests/test_semi_consistency.py measures it); the detection losses do not.
"""
import jax
import jax.numpy as jnp

from sized_detr_jax.data import batch as batch_lib
from sized_detr_jax.semi import consistency
from sized_detr_jax.semi import gmm
from sized_detr_jax.semi import losses as semi_losses_lib
from sized_detr_jax.semi import model as semi_model
from sized_detr_jax.semi import pseudo_labels


def pseudo_metrics(pseudo):
  """Pseudo-label counts of a step (means over the unlabeled images, [] f32 each).

  `metric_pseudo_initial` / `metric_pseudo_final`: boxes per image in the initial (high-recall)
  and final (score >= 0.4) sets; `metric_pseudo_dropped` / `metric_pseudo_final_dropped`:
  boxes of those sets per image lost to the `max_pseudo` slots; `metric_pseudo_truncated`: the
  fraction of images whose initial set did not fit.
  """
  dropped = pseudo["metric_pseudo_dropped"].astype(jnp.float32)
  return {"metric_pseudo_initial": jnp.mean(jnp.sum(pseudo["initial_valid"], -1)),
          "metric_pseudo_final": jnp.mean(jnp.sum(pseudo["valid"], -1)),
          "metric_pseudo_dropped": jnp.mean(dropped),
          "metric_pseudo_final_dropped": jnp.mean(
              pseudo["metric_pseudo_final_dropped"].astype(jnp.float32)),
          "metric_pseudo_truncated": jnp.mean((dropped > 0).astype(jnp.float32))}


def make_semi_loss(model, crit, cfg, stage):
  """Semi-DETR's `loss_fn(params, state, batch, rng) -> (loss, metrics)` for one stage.

  Args:
    model: `semi.model.SemiDETR`.
    crit: `criterion.CriterionConfig` of the supervised branch (also the mining costs).
    cfg: `semi.config.SemiConfig`.
    stage: 1 or 2 (static).

  Returns:
    loss_fn; its metrics are `semi.losses.semi_losses`' dict plus `loss_consistency*`,
    `pseudo_metrics`, `metric_pseudo_mined` and `metric_consistency_boxes` (mean boxes per
    image mined / given consistency queries), `metric_gmm_threshold`.
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
    metrics = pseudo_metrics(pseudo)
    rngs_u = {"dn": rng_u, "dropout": rng_drop}
    enc_s = model.apply(student, batch_lib.model_images(strong), strong["pixel_mask"],
                        method=semi_model.encode)
    decode_s = lambda extra=None: model.apply(student, enc_s, pseudo if stage == 2 else None,
                                              True, extra, method=semi_model.decode, rngs=rngs_u)
    if use_consistency:
      initial = pseudo["initial_valid"]

      def mine(outputs):
        if not cfg.mining:
          return jnp.zeros_like(initial)
        costs, matched = gmm.matched_costs(outputs, pseudo, initial, crit)
        mined, metrics["metric_gmm_threshold"] = gmm.mine_by_cost(costs, matched)
        return mined

      chosen_only = cfg.consistency_queries == "chosen"
      if chosen_only:
        # Mining reads only the matching queries, which no consistency query changes: a decode
        # without them (the reference's first student pass) picks the boxes that get queries.
        # Without mining the set is the final one, known already.
        mined = mine(decode_s() if cfg.mining else None)
        chosen = consistency.consistency_set(pseudo, mined)
      queried = chosen if chosen_only else initial
      rois = consistency.roi_features(enc_t["srcs"], pseudo["weak_boxes_xyxy"])
      content = model.apply(student, rois, queried, method=semi_model.project)
      extra_s = consistency.consistency_queries(pseudo["boxes"], content, queried)
      extra_t = consistency.consistency_queries(pseudo["weak_boxes"],
                                                jax.lax.stop_gradient(content), queried)
      out_u = decode_s(extra_s)
      if not chosen_only:
        mined = mine(out_u)
        chosen = consistency.consistency_set(pseudo, mined)
      metrics["metric_pseudo_mined"] = jnp.mean(jnp.sum(mined, -1))
      metrics["metric_consistency_boxes"] = jnp.mean(jnp.sum(chosen, -1))
    else:
      out_u = decode_s()

    # 3. Losses.
    losses = semi_losses_lib.semi_losses(out_l, batch_lib.model_targets(labeled), out_u, pseudo,
                                         crit, cfg, stage)
    if use_consistency:
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
