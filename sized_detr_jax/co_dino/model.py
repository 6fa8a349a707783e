"""Co-DINO (Co-DETR on DINO): a DINO detector plus training-only auxiliary heads whose
one-to-many assignments also feed "customized positive queries" back into the decoder.

As Sense-X/Co-DETR projects/models/co_detr.py CoDETR.forward_train with the
co_dino_5scale_r50_1x_coco.py config:

1. `self.dino.encode`: backbone (C2-C5), 5 input levels, deformable encoder; the encoder memory
   reshaped per level plus one extra 3x3 stride-2 conv + GN map on the coarsest one
   (CoDINOHead.downsample) give 6 maps, strides 4..128.
2. Auxiliary heads on those maps (`co_dino.heads`), each with its own one-to-many assignment
   (`co_dino.assigners`), computed here under stop_gradient so that the positive queries can
   use them:
   * RPN (max-IoU 0.7 / 0.3, 256 anchors sampled @ 0.5) -> proposals (per-level top-k, NMS)
     -> RoI head (ground truth added as proposals, max-IoU 0.5, 512 RoIs sampled @ 0.25,
     RoIAlign 7x7 on the 5 memory maps);
   * ATSS (top-9 adaptive IoU threshold) on every anchor.
3. Customized positive queries (CoDeformDETRHead.get_aux_targets, CoDinoTransformer.forward_aux):
   for each query-producing head (RoI head, then ATSS: Co-DETR's head order) up to `N =
   num_pos_queries` of its positive boxes per image (a random subset if more), padded with
   random negatives (background class, no box loss) up to `clip(max positives among the
   images of the same device shard (Co-DETR: per GPU), min_pos_queries, N)` slots; slots beyond that are invalid (no loss, attend to nothing).
   The reference box of a slot is its anchor / RoI (normalised cxcywh), its content
   `LayerNorm(Linear(sine embedding of the box))` with a Linear/LN per head. Each head's slots
   form one isolated group of `DINO.decode`'s `extra_queries`: one decoder pass with the
   matching and denoising queries, equivalent to Co-DETR's separate pass per head (they see
   only their own head's slots; nobody sees them).
4. Outputs: DINO's outputs dict plus `extra_outputs` ({head name: decoder predictions of its
   positive queries on every layer, [L, B, N, .]}) and `co_outputs` (each auxiliary head's
   predictions with their assigned targets, and the positive queries' targets) for
   `co_dino.criterion`.

With `train=False` (or without targets) the module returns plain DINO outputs: inference and
evaluation use only `params["dino"]`, which is a DINO params tree.

Randomness (sampling of RPN anchors, RoIs and positive-query subsets) draws from the "dn" rng
stream, the trainer's per-step training noise.
"""
from typing import Dict, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from sized_detr_jax.co_dino import anchors as anchors_lib
from sized_detr_jax.co_dino import assigners
from sized_detr_jax.co_dino import config as co_config
from sized_detr_jax import sharding
from sized_detr_jax.co_dino import heads
from sized_detr_jax.models import dino as dino_lib
from sized_detr_jax.models.layers import inverse_sigmoid
from sized_detr_jax.models.position_encoding import sine_embedding_of_boxes
from sized_detr_jax.models.roi_align import multi_level_roi_align


def select_positive_queries(key, gt_index, boxes_xyxy, *, num_slots, min_slots, num_groups=1):
  """Co-DETR's positive-query slots of one head (get_aux_targets), static shapes.

  Args:
    key: PRNG key.
    gt_index: [B, M] int32 assignment of the head's candidates (>= 0 positive, NEGATIVE,
      IGNORE).
    boxes_xyxy: [B, M, 4] the candidates' boxes (anchors / RoIs) in pixels.
    num_slots: N static slots (max_pos_coords).
    min_slots: least slots used (9).
    num_groups: the batch's device shards: the used slot count is the max positives within
      each image's shard (Co-DETR: per GPU), B must divide by it.

  Returns:
    dict of [B, N] arrays: `boxes_xyxy` [B, N, 4], `gt_index` (-1 for negatives and invalid
    slots), `positive`, `valid` (positive, or a padding negative within the used slots).
  """
  samples = assigners.random_sample(key, gt_index, num=num_slots, pos_fraction=1.0)
  num_pos = jnp.sum(samples.positive, axis=1)  # [B]
  per_group = jnp.max(num_pos.reshape(num_groups, -1), axis=1, keepdims=True)  # per device
  used = jnp.clip(jnp.broadcast_to(per_group, (num_groups, num_pos.shape[0] // num_groups)),
                  min_slots, num_slots).reshape(-1)  # [B]
  valid = samples.valid & (jnp.arange(num_slots)[None, :] < used[:, None])
  boxes = jnp.take_along_axis(boxes_xyxy, samples.index[..., None], axis=1)
  assigned = jnp.take_along_axis(gt_index, samples.index, axis=1)
  positive = samples.positive & valid
  return {"boxes_xyxy": boxes, "gt_index": jnp.where(positive, assigned, -1),
          "positive": positive, "valid": valid}


def _device_groups(batch):
  """Device shards of the batch axis under the mesh entered with `jax.set_mesh` (1 without)."""
  mesh = sharding.context_mesh()
  shards = 1 if mesh is None else mesh.shape[sharding.DATA_AXIS]
  return shards if batch % shards == 0 else 1


def _take(x, index):
  """Gather rows: x [B, M, ...], index [B, K] -> [B, K, ...]."""
  return jnp.take_along_axis(x, index.reshape(index.shape + (1,) * (x.ndim - 2)), axis=1)


class CoDINO(nn.Module):
  """DINO + Co-DETR auxiliary heads and positive queries (training only).

  Attributes:
    dino: the DINO detector (its params are `params["dino"]`).
    aux: `co_dino.config.AuxConfig` (the `heads` section of CoDINOConfig).
  """
  dino: dino_lib.DINO
  aux: co_config.AuxConfig = co_config.AuxConfig()

  def setup(self):
    unknown = sorted(set(self.aux.heads) - set(co_config.HEAD_KINDS))
    if unknown:
      raise ValueError(f"CoDINO: unknown auxiliary heads {unknown}; known: "
                       f"{co_config.HEAD_KINDS}")
    dt = dino_lib.DTYPES[self.dino.dtype]
    d = self.dino.hidden_dim
    self.downsample = dino_lib.InputProjection(d, 3, 2, self.aux.gn_groups, dt)
    num_maps = self.dino.num_feature_levels + 1
    if "atss" in self.aux.heads:
      self.atss_head = heads.ATSSHead(self.dino.num_classes, num_maps, self.aux.feat_channels,
                                      self.aux.gn_groups, dt)
    if "rpn_roi" in self.aux.heads:
      self.rpn_head = heads.RPNHead(len(self.aux.rpn_ratios) * self.aux.rpn_scales_per_octave,
                                    self.aux.feat_channels, dt)
      self.roi_head = heads.RoIBoxHead(self.dino.num_classes, self.aux.roi_fc_dim, dt)
    names = self._query_heads()
    # One Linear + LayerNorm per query-producing head (CoDinoTransformer aux_pos_trans[_norm]),
    # named query_proj_{k} / query_norm_{k} in co_config.QUERY_HEADS order.
    self.query_proj = [nn.Dense(d, kernel_init=nn.initializers.xavier_uniform(), dtype=dt,
                                param_dtype=jnp.float32) for _ in names]
    self.query_norm = [nn.LayerNorm(epsilon=1e-5, dtype=dt, param_dtype=jnp.float32)
                       for _ in names]

  def _query_heads(self):
    present = {"roi": "rpn_roi" in self.aux.heads, "atss": "atss" in self.aux.heads}
    return tuple(n for n in co_config.QUERY_HEADS if present[n])

  def _strides(self):
    """Strides of the 6 auxiliary maps (the C2 level has stride 4)."""
    first = 2 ** (6 - self.dino.num_backbone_levels)
    return tuple(first * 2 ** l for l in range(self.dino.num_feature_levels + 1))

  def __call__(self, images, pixel_mask, targets: Optional[Dict[str, jax.Array]] = None,
               train: bool = False):
    """Runs Co-DINO.

    Args:
      images: [B, H, W, 3] float32, ImageNet-normalised, padded.
      pixel_mask: [B, H, W] bool, True on real pixels.
      targets: `boxes` [B, G, 4] normalised cxcywh, `labels` [B, G] int32, `valid` [B, G]
        bool (the batch dict).
      train: with targets: the auxiliary heads, positive queries and denoising (needs the
        "dn" rng); otherwise plain DINO.

    Returns:
      DINO's outputs dict; in training with targets also `extra_outputs` and `co_outputs`
      (module docstring). With `aux.heads` empty: plain DINO (the same-model baseline).
    """
    if not (train and targets is not None and self.aux.heads):
      # Inference, or no auxiliary head configured: exactly DINO.
      outputs = self.dino(images, pixel_mask, targets, train)
      if self.is_initializing() and self.aux.heads:
        self._init_aux(images.shape[0])
      return outputs
    encoded = self.dino.encode(images, pixel_mask)
    memory_maps = list(encoded["memory_maps"])
    extra = self.downsample(memory_maps[-1])
    maps = memory_maps + [extra]
    image_size = anchors_lib.image_size_from_mask(pixel_mask)
    gt_xyxy = anchors_lib.normalized_to_pixels(targets["boxes"].astype(jnp.float32), image_size)
    gt_valid = targets["valid"].astype(bool)
    key = self.make_rng("dn")
    k_rpn, k_roi, k_queries = jax.random.split(key, 3)

    co_outputs, candidates = {}, {}
    if "rpn_roi" in self.aux.heads:
      co_outputs["rpn"], co_outputs["roi"], candidates["roi"] = self._rpn_roi(
          maps, image_size, gt_xyxy, gt_valid, targets["labels"], k_rpn, k_roi)
    if "atss" in self.aux.heads:
      co_outputs["atss"], candidates["atss"] = self._atss(maps, image_size, gt_xyxy, gt_valid,
                                                          targets["labels"])
    names = self._query_heads()
    pos, contents, refs, groups = {}, [], [], []
    n = self.aux.num_pos_queries
    for k, (name, qkey) in enumerate(zip(names, jax.random.split(k_queries, len(names)))):
      gt_index, boxes = candidates[name]
      sel = select_positive_queries(qkey, jax.lax.stop_gradient(gt_index),
                                    jax.lax.stop_gradient(boxes), num_slots=n,
                                    min_slots=self.aux.min_pos_queries,
                                    num_groups=(self.aux.pos_query_groups
                                                or _device_groups(gt_index.shape[0])))
      box = jnp.clip(anchors_lib.pixels_to_normalized(sel["boxes_xyxy"], image_size), 0.0, 1.0)
      unsig = inverse_sigmoid(box)
      embed = sine_embedding_of_boxes(jax.nn.sigmoid(unsig)[..., (1, 0, 2, 3)],
                                      num_pos_feats=self.dino.hidden_dim // 2)
      # sine_embedding_of_boxes orders (y, x, w, h); swapping x/y first gives Co-DETR's
      # get_proposal_pos_embed order (cx, cy, w, h).
      contents.append(self.query_norm[k](self.query_proj[k](embed)))
      refs.append(unsig)
      slot = jnp.arange(k * n, (k + 1) * n, dtype=jnp.int32)[None, :]
      groups.append(jnp.where(sel["valid"], k, -1 - slot))
      gt = jnp.maximum(sel["gt_index"], 0)
      pos[name] = {"labels": jnp.where(sel["positive"], _take(targets["labels"], gt), -1),
                   "boxes": _take(targets["boxes"].astype(jnp.float32), gt),
                   "positive": sel["positive"], "valid": sel["valid"]}
    extra_queries = {"content": jnp.concatenate(contents, axis=1),
                     "boxes_unsigmoid": jnp.concatenate(refs, axis=1),
                     "group": jnp.concatenate(groups, axis=1).astype(jnp.int32),
                     "isolated": True}
    outputs = self.dino.decode(encoded, targets, True, extra_queries)
    # The decoder returns every head's slots in one block; hand them out per head name.
    block = outputs.pop("extra_outputs")
    outputs["extra_outputs"] = {
        name: {k: block[k][:, :, k_head * n:(k_head + 1) * n] for k in ("pred_logits",
                                                                       "pred_boxes")}
        for k_head, name in enumerate(names)}
    co_outputs["pos_queries"] = pos
    outputs["co_outputs"] = co_outputs
    return outputs

  def _rpn_roi(self, maps, image_size, gt_xyxy, gt_valid, gt_labels, k_rpn, k_roi):
    """RPN and RoI head forward with their assignments; returns (rpn, roi, roi candidates)."""
    aux = self.aux
    strides = self._strides()
    grid = anchors_lib.anchor_grid([m.shape[1:3] for m in maps], strides,
                                   octave_base_scale=aux.rpn_octave_base_scale,
                                   scales_per_octave=aux.rpn_scales_per_octave,
                                   ratios=aux.rpn_ratios)
    anchors = jnp.asarray(grid.boxes)
    objectness, deltas = self.rpn_head(maps)
    valid = anchors_lib.anchor_valid(grid, image_size)
    gt_index, _ = assigners.max_iou_assign(anchors, valid, gt_xyxy, gt_valid,
                                           pos_iou_thr=aux.rpn_pos_iou,
                                           neg_iou_thr=aux.rpn_neg_iou,
                                           min_pos_iou=aux.rpn_min_pos_iou,
                                           match_low_quality=True)
    s = assigners.random_sample(k_rpn, gt_index, num=aux.rpn_num_samples,
                                pos_fraction=aux.rpn_pos_fraction)
    rpn = {"logits": _take(objectness, s.index), "deltas": _take(deltas, s.index),
           "anchors": anchors[s.index],
           "gt_boxes_xyxy": _take(gt_xyxy, jnp.maximum(_take(gt_index, s.index), 0)),
           "positive": s.positive, "valid": s.valid}

    proposals, _, proposal_valid = heads.rpn_proposals(
        objectness, deltas, grid, image_size, nms_pre=aux.rpn_nms_pre,
        max_proposals=aux.rpn_max_proposals, nms_iou=aux.rpn_nms_iou, use_nms=aux.rpn_use_nms)
    proposal_index, _ = assigners.max_iou_assign(proposals, proposal_valid, gt_xyxy, gt_valid,
                                                 pos_iou_thr=aux.roi_pos_iou,
                                                 neg_iou_thr=aux.roi_neg_iou,
                                                 min_pos_iou=aux.roi_pos_iou,
                                                 match_low_quality=False)
    # mmdet's add_gt_as_proposals: the ground truth boxes join the candidates, assigned to
    # themselves.
    g = gt_valid.shape[1]
    gt_self = jnp.where(gt_valid, jnp.arange(g, dtype=jnp.int32)[None, :], assigners.IGNORE)
    cand_boxes = jnp.concatenate([gt_xyxy, proposals], axis=1)
    cand_index = jnp.concatenate([gt_self, proposal_index], axis=1)
    s = assigners.random_sample(k_roi, cand_index, num=aux.roi_num_samples,
                                pos_fraction=aux.roi_pos_fraction)
    rois = jax.lax.stop_gradient(_take(cand_boxes, s.index))
    roi_gt = jnp.where(s.valid, _take(cand_index, s.index), assigners.IGNORE)
    levels = self.dino.num_feature_levels
    feats = multi_level_roi_align(maps[:levels], rois, strides=strides[:levels],
                                  output_size=aux.roi_output_size,
                                  sampling_ratio=aux.roi_sampling_ratio,
                                  finest_scale=aux.roi_finest_scale)
    cls_logits, roi_deltas = self.roi_head(feats)
    gt = jnp.maximum(roi_gt, 0)
    roi = {"cls_logits": cls_logits, "deltas": roi_deltas, "rois": rois,
           "labels": jnp.where(s.positive, _take(gt_labels, gt), -1),
           "gt_boxes_xyxy": _take(gt_xyxy, gt), "positive": s.positive, "valid": s.valid}
    return rpn, roi, (roi_gt, rois)

  def _atss(self, maps, image_size, gt_xyxy, gt_valid, gt_labels):
    """ATSS head forward with its assignment; returns (atss, candidates)."""
    grid = anchors_lib.anchor_grid([m.shape[1:3] for m in maps], self._strides(),
                                   octave_base_scale=self.aux.atss_octave_base_scale)
    anchors = jnp.asarray(grid.boxes)
    cls_logits, deltas, centerness = self.atss_head(maps)
    valid = anchors_lib.anchor_valid(grid, image_size)
    gt_index, _ = assigners.atss_assign(anchors, valid, grid.level_sizes, gt_xyxy, gt_valid,
                                        topk=self.aux.atss_topk)
    gt = jnp.maximum(gt_index, 0)
    atss = {"cls_logits": cls_logits, "deltas": deltas, "centerness": centerness,
            "anchors": anchors, "valid": valid,
            "labels": jnp.where(gt_index >= 0, _take(gt_labels, gt), -1),
            "gt_boxes_xyxy": _take(gt_xyxy, gt)}
    b = gt_valid.shape[0]
    return atss, (gt_index, jnp.broadcast_to(anchors, (b,) + anchors.shape))

  def _init_aux(self, batch):
    """Creates the auxiliary parameters (their shapes do not depend on the image size)."""
    d = self.dino.hidden_dim
    dt = dino_lib.DTYPES[self.dino.dtype]
    x = jnp.zeros((batch, 4, 4, d), dt)
    maps = [x] * self.dino.num_feature_levels + [self.downsample(x)]
    if "atss" in self.aux.heads:
      self.atss_head(maps)
    if "rpn_roi" in self.aux.heads:
      self.rpn_head(maps)
      size = self.aux.roi_output_size
      self.roi_head(jnp.zeros((batch, 1, size, size, d), dt))
    for proj, norm in zip(self.query_proj, self.query_norm):
      norm(proj(jnp.zeros((batch, 1, 2 * d), dt)))


# ---------------------------------------------------------------------------------------------
# Building from a config.


def param_labels(params):
  """Optimiser groups: `dino.param_labels` on params["dino"], "default" for the auxiliary
  heads and positive-query projections."""
  return {k: (dino_lib.param_labels(v) if k == "dino"
              else jax.tree.map(lambda _: "default", v)) for k, v in params.items()}


def build_co_dino(model_config, heads: co_config.AuxConfig):
  """(CoDINO module, param_labels function) from `config.model` (DINO's fields, as for
  `models.dino.build_dino`) and the resolved `heads` section of `config.co_dino`."""
  return CoDINO(dino_lib.build_dino(model_config), heads), param_labels
