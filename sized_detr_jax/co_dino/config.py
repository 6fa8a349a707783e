"""Co-DINO's settings, resolved once from `config.co_dino` into a frozen `CoDINOConfig` with two
sections: `heads` (the auxiliary heads and positive queries, read by the model) and `loss` (the
loss weights, read by the criterion). Both model.py and criterion.py import this file, never
each other.
"""
import dataclasses
from typing import Tuple

import ml_collections

from sized_detr_jax import config_lib

HEAD_KINDS = ("rpn_roi", "atss")
# Positive-query groups in Co-DETR's order (roi_head before bbox_head).
QUERY_HEADS = ("roi", "atss")


@dataclasses.dataclass(frozen=True)
class AuxConfig:
  """Settings of the auxiliary heads and positive queries (Co-DINO R50 1x values).

  heads: subset of HEAD_KINDS ("rpn_roi": RPN + RoI head; "atss").
  num_pos_queries: static positive-query slots per head and image (Co-DETR max_pos_coords 300).
  min_pos_queries: least slots used per head (9 in Co-DETR).
  pos_query_groups: the used slot count is the max positives within a group of images: 0 =
    one group per device shard of the mesh (Co-DETR: per GPU), k > 0: k equal groups.
  feat_channels, gn_groups: ATSS/RPN conv width and ATSS GroupNorm groups (256, 32).
  atss_*: ATSS assigner topk (9) and anchor scale (8 x stride).
  rpn_*: anchors (octave base 4, 3 scales, ratios 0.5/1/2), assigner (0.7 / 0.3 / 0.3, low
    quality matches), sampler (256 @ 0.5), proposals (per-level top `rpn_nms_pre`, NMS IoU
    0.7, `rpn_max_proposals` kept; mmdet's nms_pre is 4000, see experiments/co_dino.py).
  roi_*: assigner (0.5 / 0.5), sampler (512 @ 0.25), RoIAlign (7x7, fixed sampling ratio,
    mmdet finest_scale 56), fc width (1024).
  """
  heads: Tuple[str, ...] = HEAD_KINDS
  num_pos_queries: int = 300
  min_pos_queries: int = 9
  pos_query_groups: int = 0
  feat_channels: int = 256
  gn_groups: int = 32
  atss_topk: int = 9
  atss_octave_base_scale: float = 8.0
  rpn_octave_base_scale: float = 4.0
  rpn_scales_per_octave: int = 3
  rpn_ratios: Tuple[float, ...] = (0.5, 1.0, 2.0)
  rpn_pos_iou: float = 0.7
  rpn_neg_iou: float = 0.3
  rpn_min_pos_iou: float = 0.3
  rpn_num_samples: int = 256
  rpn_pos_fraction: float = 0.5
  rpn_nms_pre: int = 1000
  rpn_max_proposals: int = 1000
  rpn_nms_iou: float = 0.7
  rpn_use_nms: bool = True
  roi_pos_iou: float = 0.5
  roi_neg_iou: float = 0.5
  roi_num_samples: int = 512
  roi_pos_fraction: float = 0.25
  roi_output_size: int = 7
  roi_sampling_ratio: int = 2
  roi_finest_scale: float = 56.0
  roi_fc_dim: int = 1024


@dataclasses.dataclass(frozen=True)
class LossWeights:
  """Co-DINO's loss weights (co_dino_5scale_r50_1x_coco.py).

  The auxiliary heads' base weights are multiplied by `num_decoder_layers x lambda_2` (Co-DETR:
  6 x 2 = 12); the positive-query terms by `lambda_1` on top of the main head's coefficients.
  """
  lambda_1: float = 1.0
  lambda_2: float = 2.0
  rpn_cls_weight: float = 1.0
  rpn_bbox_weight: float = 1.0
  roi_cls_weight: float = 1.0
  roi_giou_weight: float = 10.0
  atss_cls_weight: float = 1.0
  atss_giou_weight: float = 2.0
  atss_centerness_weight: float = 1.0
  num_decoder_layers: int = 6


@dataclasses.dataclass(frozen=True)
class CoDINOConfig:
  """`config.co_dino` split into its two sections."""
  heads: AuxConfig = AuxConfig()
  loss: LossWeights = LossWeights()

  @classmethod
  def from_config(cls, section=None, *, num_decoder_layers=6):
    """`config.co_dino` (flat ConfigDict or dict; None: defaults) -> CoDINOConfig.

    Args:
      section: AuxConfig fields and LossWeights fields side by side (flat, as on the command
        line: `--config.co_dino.atss_topk=9`, `--config.co_dino.lambda_2=2.0`).
      num_decoder_layers: `config.model.dec_layers` (the auxiliary weights' factor).

    Raises:
      ValueError: unknown fields (named, with the known ones) or unknown head kinds.
    """
    head_fields = {f.name for f in dataclasses.fields(AuxConfig)}
    loss_fields = {f.name for f in dataclasses.fields(LossWeights)} - {"num_decoder_layers"}
    given = config_lib.section_fields(section, head_fields | loss_fields, "config.co_dino")
    heads = {k: v for k, v in given.items() if k in head_fields}
    for k in ("heads", "rpn_ratios"):
      if k in heads:
        heads[k] = tuple(heads[k])
    bad_heads = sorted(set(heads.get("heads", ())) - set(HEAD_KINDS))
    if bad_heads:
      raise ValueError(f"config.co_dino.heads: unknown auxiliary heads {bad_heads}; known: "
                       f"{HEAD_KINDS}")
    loss = {k: float(v) for k, v in given.items() if k in loss_fields}
    return cls(AuxConfig(**heads), LossWeights(**loss, num_decoder_layers=int(num_decoder_layers)))


def default_co_dino_config():
  """`config.co_dino` defaults as one flat ConfigDict (both sections' fields)."""
  return ml_collections.ConfigDict({**dataclasses.asdict(AuxConfig()),
                                    **{k: v for k, v in dataclasses.asdict(LossWeights()).items()
                                       if k != "num_decoder_layers"}})
