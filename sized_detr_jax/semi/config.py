"""Semi-DETR's settings (`config.semi`), resolved once into a frozen `SemiConfig`."""
import dataclasses
from typing import Optional

import ml_collections
from ml_collections import config_dict

from sized_detr_jax import config_lib

SIZED_L1_BRANCHES = ("both", "sup_only")
PSEUDO_METHODS = ("nms", "topk")
CONSISTENCY_QUERIES = ("chosen", "initial")
BATCH_SAMPLERS = ("fixed", "by_prob")


@dataclasses.dataclass(frozen=True)
class SemiConfig:
  """Typed `config.semi` (Semi-DETR's COCO-partial values as defaults).

  Attributes:
    sized_l1_branches: "both" (the criterion's bbox_loss in both branches) | "sup_only" (plain
      L1 on the pseudo-labels).
    unsup_weight: weight of every unsupervised term (4.0; 2.0 on COCO-full).
    switch_step: one-to-many -> one-to-one switch (completed steps); < 0: never (Table 5).
      None: round(switch_fraction x total_steps), set by `config_lib.finalize`.
    switch_fraction: the switch as a fraction of `total_steps` (Semi-DETR: half way, 60k of
      120k); used when switch_step is None.
    consistency: cross-view query consistency (stage 1 only).
    mining: GMM cost-based mining (feeds the consistency set).
    pseudo_method: teacher detections: "nms" (Semi-DETR) | "topk".
    max_pseudo: static pseudo-label slots per image (Semi-DETR has no cap); boxes of the
      initial set beyond it (the lowest-scored) are dropped and logged
      (`metric_pseudo_dropped`, `metric_pseudo_final_dropped`, `metric_pseudo_truncated`).
      0: sized from the data when the method is built (`resolve_max_pseudo`): the largest
      number of non-crowd boxes of one image in the labeled training annotations.
    final_threshold: score of the final pseudo-label set (0.4).
    nms_iou: class-wise NMS IoU of the teacher's detections and of stage-1 evaluation (0.6).
    nms_candidates: (query, class) pairs entering NMS.
    max_detections: teacher detections kept after NMS.
    projector_fc_dim: hidden width of the consistency projector.
    consistency_queries: which pseudo boxes get consistency queries: "chosen" (Semi-DETR:
      the final and the mined ones; one extra student decode for the mining) | "initial" (the
      whole initial set, loss masked to the chosen ones; one decode, but the masked queries
      share self-attention with the chosen ones, so the consistency loss differs).
    batch_sampler: labeled / unlabeled images per step: "fixed" (`config.data.batch_size` /
      `unlabeled_batch_size` every step) | "by_prob" (Semi-DETR's SemiBalanceSampler with
      by_prob=True: the step's `batch_size + unlabeled_batch_size` images form groups of
      `images_per_group`, each group's labeled count drawn per step, see `semi.sampler`).
    sample_ratio: ("by_prob") labeled : unlabeled sampling weights ((1, 4)).
    images_per_group: ("by_prob") the reference's images per GPU (5).
    agnostic_interm: class-agnostic encoder-proposal targets (all labels 0) in both branches,
      as Semi-DETR's head; False: DINO's labelled proposals.
  """
  sized_l1_branches: str = "both"
  unsup_weight: float = 4.0
  switch_step: Optional[int] = None
  switch_fraction: Optional[float] = 0.5
  consistency: bool = True
  mining: bool = True
  pseudo_method: str = "nms"
  max_pseudo: int = 30
  final_threshold: float = 0.4
  nms_iou: float = 0.6
  nms_candidates: int = 1000
  max_detections: int = 300
  projector_fc_dim: int = 1024
  consistency_queries: str = "chosen"
  agnostic_interm: bool = True
  batch_sampler: str = "fixed"
  sample_ratio: tuple = (1, 4)
  images_per_group: int = 5

  def __post_init__(self):
    object.__setattr__(self, "sample_ratio", tuple(self.sample_ratio))
    config_lib.check_choice("config.semi.sized_l1_branches", self.sized_l1_branches,
                            SIZED_L1_BRANCHES)
    config_lib.check_choice("config.semi.consistency_queries", self.consistency_queries,
                            CONSISTENCY_QUERIES)
    config_lib.check_choice("config.semi.batch_sampler", self.batch_sampler, BATCH_SAMPLERS)
    config_lib.check_choice("config.semi.pseudo_method", self.pseudo_method, PSEUDO_METHODS)
    if self.max_pseudo < 0:
      raise ValueError(f"config.semi.max_pseudo must be >= 0 (0: from the data), "
                       f"got {self.max_pseudo}")

  @classmethod
  def from_config(cls, section=None):
    """`config.semi` (ConfigDict or dict; None: defaults) -> SemiConfig; unknown fields raise."""
    return cls(**config_lib.section_fields(section, [f.name for f in dataclasses.fields(cls)],
                                           "config.semi"))

  def stage_at(self, step):
    """Detector stage: 1 before the switch, 2 from `switch_step` completed steps on (never if
    it is < 0)."""
    if self.switch_step is None:
      raise ValueError("config.semi.switch_step is unresolved (None): finalise the config with "
                       "config_lib.finalize (switch_fraction x total_steps)")
    return 2 if 0 <= self.switch_step <= step else 1


def default_semi_config():
  """`config.semi` defaults as a ConfigDict (the fields of `SemiConfig`)."""
  fields = dataclasses.asdict(SemiConfig())
  fields["switch_step"] = config_dict.placeholder(int)  # overridable; finalize resolves it
  return ml_collections.ConfigDict(fields)
