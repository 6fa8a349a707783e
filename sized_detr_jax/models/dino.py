"""DINO-4scale: ResNet backbone + input projections + deformable transformer + CDN denoising.

The assembled detector of IDEA-Research/DINO `models/dino/dino.py` as one Flax module whose
`apply` is a pure function of the params pytree:

    outputs = model.apply({"params": params}, images, pixel_mask, targets, train=True,
                          rngs={"dn": key})

Outputs follow the shared data contract: `pred_logits [B,Q,C]`, `pred_boxes [B,Q,4]`
(normalised cxcywh, last decoder layer), `aux_outputs` (layers 0..L-2), `interm_outputs`
(top-Q encoder proposals) and, in training with targets, `dn_outputs` ([L,B,D,...] for all
decoder layers) and `dn_meta` (gt_index / positive / valid, [B,D]).

`DINO.encode` (backbone, projections, encoder) and `DINO.decode` (query selection, denoising,
decoder) can be applied separately (`model.apply(vars, ..., method=DINO.encode)`): Semi-DETR
decodes the teacher's encoding twice, Co-DINO runs its auxiliary heads on the encoder memory in
between. `decode` also takes extra query groups (`extra_queries`): Semi-DETR's consistency
queries and Co-DETR's customized positive queries.

`postprocess` turns outputs into top-300 detections over queries x classes.
`param_labels` tags every parameter for the optimiser: "frozen" (frozen BN, stem, layer1),
"backbone" (lr 1e-5 in DINO), "linear_proj" (sampling offsets, lr x 0.1) or "default".
"""
import dataclasses
from typing import Any, Dict, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from sized_detr_jax import box_ops
from sized_detr_jax.models import denoising
from sized_detr_jax.models.deformable_transformer import (QUERY_SELECTION_RULES,
                                                          DeformableTransformer)
from sized_detr_jax.models.position_encoding import downsample_mask, sine_position_embedding
from sized_detr_jax.models.resnet import ResNet

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


class GroupNorm(nn.Module):
  """GroupNorm (PyTorch semantics, eps 1e-5), statistics optionally over real pixels only.

  Attributes:
    num_groups: channel groups (32 in DINO).
    dtype: compute dtype of the output (statistics in float32).
  """
  num_groups: int = 32
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, mask=None):
    """Args: x [B, H, W, C]; mask optional [B, H, W] bool (True = real pixel)."""
    b, h, w, c = x.shape
    if c % self.num_groups:
      raise ValueError(f"GroupNorm: {c} channels not divisible by {self.num_groups} groups")
    scale = self.param("scale", nn.initializers.ones, (c,), jnp.float32)
    bias = self.param("bias", nn.initializers.zeros, (c,), jnp.float32)
    xg = x.astype(jnp.float32).reshape(b, h, w, self.num_groups, c // self.num_groups)
    if mask is None:
      weight = jnp.ones((b, h, w, 1, 1), jnp.float32)
    else:
      weight = mask.astype(jnp.float32)[..., None, None]
    count = jnp.sum(weight, axis=(1, 2, 4), keepdims=True) * (c // self.num_groups)
    count = jnp.maximum(count, 1.0)
    mean = jnp.sum(xg * weight, axis=(1, 2, 4), keepdims=True) / count
    var = jnp.sum(jnp.square(xg - mean) * weight, axis=(1, 2, 4), keepdims=True) / count
    y = ((xg - mean) * jax.lax.rsqrt(var + 1e-5)).reshape(b, h, w, c)
    return (y * scale + bias).astype(self.dtype)


class InputProjection(nn.Module):
  """Conv (1x1, or 3x3 stride 2 for the extra level) + GroupNorm (DINO input_proj[l])."""
  hidden_dim: int
  kernel: int
  stride: int
  gn_groups: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, mask=None):
    pad = (self.kernel - 1) // 2
    x = nn.Conv(self.hidden_dim, (self.kernel, self.kernel), strides=(self.stride,) * 2,
                padding=((pad, pad), (pad, pad)), kernel_init=nn.initializers.xavier_uniform(),
                dtype=self.dtype, param_dtype=jnp.float32, name="conv")(x)
    m = None if mask is None else downsample_mask(mask, x.shape[1:3])
    return GroupNorm(self.gn_groups, self.dtype, name="norm")(x, m)


class DINO(nn.Module):
  """DINO detector. Field defaults are DINO-4scale R50 (IDEA-Research/DINO
  config/DINO/DINO_4scale.py).

  Attributes:
    num_classes: C (91 for COCO category ids, 80 for contiguous COCO labels).
    hidden_dim, nheads, dim_feedforward, enc_layers, dec_layers, num_queries,
      num_feature_levels, enc_n_points, dec_n_points: transformer settings.
    backbone_blocks, backbone_width: ResNet depth/width ((3, 4, 6, 3), 64 = ResNet-50).
    backbone_norm: "frozen_bn" (DINO) or "group_norm" (trainable, for training from scratch;
      see resnet.py).
    pe_temperature: sine position embedding temperature (20).
    gn_groups: GroupNorm groups of the input projections (32).
    dn_number, dn_box_noise_scale, dn_label_noise_ratio, dn_labelbook_size, dn_groups:
      contrastive denoising (`denoising.py`); dn_number 0 disables it.
    padding_invariant: mask-aware backbone/GroupNorm/query embedding so outputs for real
      pixels do not depend on extra padding (not in PyTorch DINO; default off for fidelity).
      Needs query_selection="valid_only".
    query_selection: which encoder tokens may become queries (`deformable_transformer.
      selection_scores`): "dino" (default, the official DINO / Semi-DETR / Co-DETR code:
      padded tokens and border anchors compete in top-k with their constant logit) or
      "valid_only" (they are excluded).
    share_decoder_heads: True (DINO): one class Linear and one box MLP for all decoder layers;
      False (Co-DETR): one pair per decoder layer (the encoder-proposal heads are separate in
      both).
    dtype: "float32" or "bfloat16" compute (params stay float32).
    msda_implementation: `msda.IMPLEMENTATIONS` key.
    remat: rematerialise transformer layers in the backward pass (memory for compute).
    scan_layers: run the encoder and decoder layers as one lax.scan each (compile time; same
      parameter tree), see `DeformableTransformer`.
    num_backbone_levels: 3 (C3-C5, strides 8-32: DINO-4scale) or 4 (C2-C5, strides 4-32:
      Co-DINO 5-scale with num_feature_levels=5).
  """
  num_classes: int = 91
  hidden_dim: int = 256
  nheads: int = 8
  dim_feedforward: int = 2048
  enc_layers: int = 6
  dec_layers: int = 6
  num_queries: int = 900
  num_feature_levels: int = 4
  enc_n_points: int = 4
  dec_n_points: int = 4
  backbone_blocks: Sequence[int] = (3, 4, 6, 3)
  backbone_width: int = 64
  backbone_norm: str = "frozen_bn"
  pe_temperature: float = 20.0
  gn_groups: int = 32
  dn_number: int = 100
  dn_box_noise_scale: float = 0.4
  dn_label_noise_ratio: float = 0.5
  dn_labelbook_size: int = 91
  dn_groups: int = 0
  padding_invariant: bool = False
  query_selection: str = "dino"
  share_decoder_heads: bool = True
  dtype: str = "float32"
  msda_implementation: str = "gather"
  remat: bool = False
  scan_layers: bool = False

  num_backbone_levels: int = 3

  def setup(self):
    if self.dtype not in DTYPES:
      raise ValueError(f"DINO: dtype must be one of {sorted(DTYPES)}, got {self.dtype!r}")
    if self.num_feature_levels < self.num_backbone_levels:
      raise ValueError(f"DINO: num_feature_levels {self.num_feature_levels} < "
                       f"num_backbone_levels {self.num_backbone_levels}")
    if self.query_selection not in QUERY_SELECTION_RULES:
      raise ValueError(f"DINO: query_selection must be one of {QUERY_SELECTION_RULES}, got "
                       f"{self.query_selection!r}")
    if self.padding_invariant and self.query_selection != "valid_only":
      raise ValueError("DINO: padding_invariant=True needs query_selection='valid_only' (with "
                       f"{self.query_selection!r} padded tokens compete for the queries)")
    dt = DTYPES[self.dtype]
    self.backbone = ResNet(tuple(self.backbone_blocks), self.backbone_width, dt,
                           norm=self.backbone_norm, num_levels=self.num_backbone_levels)
    # 1x1 projections of the backbone levels, then 3x3 stride-2 convs for the extra levels
    # (the first on C5, the next ones on the previous extra level).
    self.input_proj = [
        InputProjection(self.hidden_dim, 1 if lvl < self.num_backbone_levels else 3,
                        1 if lvl < self.num_backbone_levels else 2, self.gn_groups, dt)
        for lvl in range(self.num_feature_levels)]
    self.label_enc = nn.Embed(self.dn_labelbook_size + 1, self.hidden_dim,
                              embedding_init=nn.initializers.normal(1.0), param_dtype=jnp.float32)
    self.transformer = DeformableTransformer(
        num_classes=self.num_classes, d_model=self.hidden_dim, n_heads=self.nheads,
        dim_feedforward=self.dim_feedforward, num_queries=self.num_queries,
        enc_layers=self.enc_layers, dec_layers=self.dec_layers,
        n_levels=self.num_feature_levels, enc_n_points=self.enc_n_points,
        dec_n_points=self.dec_n_points, padding_invariant=self.padding_invariant,
        query_selection=self.query_selection, share_decoder_heads=self.share_decoder_heads,
        dtype=dt,
        msda_implementation=self.msda_implementation, remat=self.remat,
        scan_layers=self.scan_layers)

  def __call__(self, images, pixel_mask, targets: Optional[Dict[str, jax.Array]] = None,
               train: bool = False, extra_queries: Optional[Dict[str, Any]] = None):
    """Runs the detector: `decode(encode(images, pixel_mask), targets, train, extra_queries)`.

    Args:
      images: [B, H, W, 3] float32, ImageNet-normalised, padded.
      pixel_mask: [B, H, W] bool, True on real pixels.
      targets: optional dict with `boxes` [B, G, 4] (normalised cxcywh), `labels` [B, G] int32,
        `valid` [B, G] bool (e.g. the batch dict). Used for denoising when `train`.
      train: adds denoising queries when targets are given (needs the "dn" rng).
      extra_queries: optional extra query groups, see `decode`.

    Returns:
      The outputs dict of the data contract (all float32).
    """
    outputs = self.decode(self.encode(images, pixel_mask), targets, train, extra_queries)
    if self.is_initializing():
      # Keep label_enc in the params tree for inference-only init (DINO has it always).
      self.label_enc(jnp.zeros((1,), jnp.int32))
    return outputs

  def encode(self, images, pixel_mask):
    """Backbone, input projections and the deformable encoder.

    Args:
      images: [B, H, W, 3] float32, ImageNet-normalised, padded.
      pixel_mask: [B, H, W] bool, True on real pixels.

    Returns:
      dict of per-level lists (finest first, L = num_feature_levels): `srcs` [B, H_l, W_l, D]
      projected input maps (the "neck" features: Semi-DETR's RoIAlign source), `masks`
      [B, H_l, W_l] bool (True = real pixel) and `memory_maps` [B, H_l, W_l, D] the encoder
      output reshaped back per level (Co-DINO's auxiliary-head input).
    """
    if images.ndim != 4 or images.shape[-1] != 3 or pixel_mask.shape != images.shape[:3]:
      raise ValueError(f"DINO: images must be [B,H,W,3] and pixel_mask [B,H,W], got "
                       f"{images.shape} and {pixel_mask.shape}")
    pixel_mask = pixel_mask.astype(bool)
    feature_mask = pixel_mask if self.padding_invariant else None
    features = self.backbone(images, feature_mask)
    srcs = []
    for lvl, proj in enumerate(self.input_proj):
      if lvl < len(features):
        srcs.append(proj(features[lvl], feature_mask))
      else:
        srcs.append(proj(features[-1] if lvl == len(features) else srcs[-1], feature_mask))
    masks = [downsample_mask(pixel_mask, s.shape[1:3]) for s in srcs]
    pos = [sine_position_embedding(m, num_pos_feats=self.hidden_dim // 2,
                                   temperature=self.pe_temperature) for m in masks]
    memory = self.transformer.encode(srcs, masks, pos)
    memory_maps, start = [], 0
    for s in srcs:
      b, h, w, c = s.shape
      memory_maps.append(memory[:, start:start + h * w].reshape(b, h, w, c))
      start += h * w
    return {"srcs": srcs, "masks": masks, "memory_maps": memory_maps}

  def decode(self, encoded, targets: Optional[Dict[str, jax.Array]] = None, train: bool = False,
             extra_queries: Optional[Dict[str, Any]] = None):
    """Query selection, denoising and extra query groups, and the decoder.

    Args:
      encoded: `encode`'s dict (only `masks` and `memory_maps` are read).
      targets, train: as `__call__` (denoising queries when train and targets are given).
      extra_queries: optional dict of N extra slots decoded with the matching queries:
        `content` [B, N, D], `boxes_unsigmoid` [B, N, 4] (inverse-sigmoid of normalised cxcywh
        reference boxes), `group` [B, N] int32 (slots with the same id >= 0 attend to each
        other; give padding unique negative ids) and optional `isolated` (Python bool, default
        False). They are placed before the denoising slots (Semi-DETR's order). Nobody else
        attends to them; with isolated=False they see the matching queries (DINO's denoising
        rule: Semi-DETR's consistency queries), with isolated=True only their own group (one
        Co-DETR auxiliary decoder pass per group, batched into this pass).

    Returns:
      The outputs dict of the data contract, plus `extra_outputs` when extra_queries is given:
      `hidden` [L, B, N, D] decoder-normed states, `pred_logits` [L, B, N, C], `pred_boxes`
      [L, B, N, 4] (normalised cxcywh) for every decoder layer.
    """
    masks = encoded["masks"]
    b = masks[0].shape[0]
    memory = jnp.concatenate([m.reshape(b, -1, m.shape[-1]) for m in encoded["memory_maps"]],
                             axis=1)
    use_dn = train and targets is not None and self.dn_number > 0
    contents, references, groups = [], [], []
    if extra_queries is not None:
      n = extra_queries["group"].shape[1]
      contents.append(extra_queries["content"].astype(jnp.float32))
      references.append(extra_queries["boxes_unsigmoid"].astype(jnp.float32))
      groups.append(_disjoint_groups(extra_queries["group"]))
    else:
      n = 0
    dn = None
    if use_dn:
      dn = denoising.build_denoising_queries(
          self.make_rng("dn"), targets["boxes"], targets["labels"], targets["valid"],
          num_classes=self.num_classes, dn_number=self.dn_number,
          label_noise_ratio=self.dn_label_noise_ratio,
          box_noise_scale=self.dn_box_noise_scale, dn_groups=self.dn_groups)
      contents.append(jnp.where(dn["valid"][..., None], self.label_enc(dn["labels"]), 0.0))
      references.append(dn["boxes_unsigmoid"])
      groups.append(dn["group"])
    content = reference = blocked = None
    if groups:
      content = jnp.concatenate(contents, axis=1)
      reference = jnp.concatenate(references, axis=1)
      blocked = denoising.denoising_attention_mask(jnp.concatenate(groups, axis=1),
                                                   self.num_queries)
      if extra_queries is not None and extra_queries.get("isolated", False):
        t = blocked.shape[-1]
        is_extra = jnp.arange(t) < n
        blocked = blocked | (is_extra[:, None] & ~is_extra[None, :])[None]
    out = self.transformer.decode(memory, masks, content, reference, blocked)
    p = content.shape[1] if content is not None else 0
    logits, boxes = out["logits"], out["boxes"]  # [L, B, P + Q, ...]
    outputs = {
        "pred_logits": logits[-1, :, p:],
        "pred_boxes": boxes[-1, :, p:],
        "aux_outputs": [{"pred_logits": logits[i, :, p:], "pred_boxes": boxes[i, :, p:]}
                        for i in range(logits.shape[0] - 1)],
        "interm_outputs": {"pred_logits": out["interm_logits"],
                           "pred_boxes": out["interm_boxes"]},
    }
    if dn is not None:
      outputs["dn_outputs"] = {"pred_logits": logits[:, :, n:p], "pred_boxes": boxes[:, :, n:p]}
      outputs["dn_meta"] = {k: dn[k] for k in ("gt_index", "positive", "valid")}
    if extra_queries is not None:
      outputs["extra_outputs"] = {"hidden": out["hidden"][:, :, :n].astype(jnp.float32),
                                  "pred_logits": logits[:, :, :n], "pred_boxes": boxes[:, :, :n]}
    return outputs


# Extra-query group ids are moved here so they never equal a denoising group id (valid dn
# groups are in [0, 2 * dn_number), padded dn slots -1 - slot).
_EXTRA_GROUP_BASE = 1 << 24


def _disjoint_groups(group):
  """[B, N] int32 extra-slot group ids -> ids disjoint from `models.denoising`'s."""
  slot = jnp.arange(group.shape[1], dtype=jnp.int32)[None, :]
  return jnp.where(group >= 0, _EXTRA_GROUP_BASE + (group % _EXTRA_GROUP_BASE),
                   -_EXTRA_GROUP_BASE - slot).astype(jnp.int32)


# config.model keys that configure loading/postprocessing, not the module.
NON_MODULE_FIELDS = ("num_select", "soft_nms_iou", "pretrained_backbone", "pretrained")


def default_model_config() -> Dict[str, Any]:
  """`config.model` defaults: every `DINO` field at its DINO-4scale R50 default, plus

  num_select: detections kept by `postprocess` (DINO's 300);
  pretrained_backbone / pretrained: converted weights (python -m sized_detr_jax.convert_torch),
    an .npz of a torchvision ImageNet ResNet-50 for the backbone or of a full PyTorch DINO
    checkpoint ("" = none).
  (`soft_nms_iou` exists only where a config sets it: Co-DINO's test-time soft-NMS.)
  Configs state only the fields that differ.
  """
  fields = {f.name: f.default for f in dataclasses.fields(DINO)
            if f.name not in ("parent", "name")}
  return dict(fields, num_select=300, pretrained_backbone="", pretrained="")


def build_dino(model_config) -> DINO:
  """Builds `DINO` from a `config.model` ConfigDict/dict (unknown keys raise a clear error)."""
  fields = {f for f in DINO.__dataclass_fields__ if f not in ("parent", "name")}
  cfg = {k: v for k, v in dict(model_config).items() if k not in NON_MODULE_FIELDS}
  unknown = sorted(set(cfg) - fields)
  if unknown:
    raise ValueError(f"config.model: unknown fields {unknown}; known: {sorted(fields)}")
  if "backbone_blocks" in cfg:
    cfg["backbone_blocks"] = tuple(cfg["backbone_blocks"])
  return DINO(**cfg)


def postprocess(outputs, target_sizes, num_select=300):
  """Top-`num_select` detections over queries x classes (DINO PostProcess, no NMS).

  Args:
    outputs: model outputs with `pred_logits` [B, Q, C] and `pred_boxes` [B, Q, 4] (normalised
      cxcywh).
    target_sizes: [B, 2] (h, w) to scale boxes to, usually the original image size.
    num_select: detections per image (300 in DINO; clipped to Q * C).

  Returns:
    dict: `scores` [B, K] float32 sigmoid probabilities (descending), `labels` [B, K] int32
    class ids, `boxes_xyxy` [B, K, 4] absolute (x0, y0, x1, y1), `boxes_xywh` [B, K, 4]
    absolute COCO (x, y, w, h).
  """
  logits = outputs["pred_logits"].astype(jnp.float32)
  b, q, c = logits.shape
  k = min(num_select, q * c)
  scores, index = jax.lax.top_k(jax.nn.sigmoid(logits).reshape(b, q * c), k)
  query = index // c
  labels = (index % c).astype(jnp.int32)
  boxes = jnp.take_along_axis(outputs["pred_boxes"].astype(jnp.float32), query[..., None],
                              axis=1)
  h, w = target_sizes[:, 0].astype(jnp.float32), target_sizes[:, 1].astype(jnp.float32)
  scale = jnp.stack([w, h, w, h], axis=-1)[:, None, :]
  xyxy = box_ops.box_cxcywh_to_xyxy(boxes) * scale
  return {"scores": scores, "labels": labels, "boxes_xyxy": xyxy,
          "boxes_xywh": box_ops.box_xyxy_to_xywh(xyxy)}


def _label(path):
  keys = [getattr(k, "key", str(k)) for k in path]
  if keys[0] == "backbone":
    frozen_stage = keys[1] in ("conv1", "bn1") or keys[1].startswith("layer1_")
    frozen_bn = keys[-1] in ("scale", "bias", "mean", "var")  # only FrozenBatchNorm has these
    return "frozen" if (frozen_stage or frozen_bn) else "backbone"
  if "sampling_offsets" in keys:
    return "linear_proj"
  return "default"


def param_labels(params):
  """Optimiser group of every parameter, for `optax.multi_transform` / masks.

  Returns:
    Pytree like `params` of str: "frozen" (never updated, no weight decay: frozen BatchNorm,
    stem, layer1), "backbone" (layer2-4 convs, DINO lr 1e-5), "linear_proj" (MSDA sampling
    offsets, DINO lr x 0.1) or "default".
  """
  return jax.tree_util.tree_map_with_path(lambda p, _: _label(p), params)
