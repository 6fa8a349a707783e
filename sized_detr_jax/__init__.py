"""sized_detr_jax: DINO-family detectors with the Sized L1 loss, in JAX/Flax.

The public API (docs/api.md has runnable examples):

  Losses (boxes normalised (cx, cy, w, h), shapes [..., 4], `valid` masks [...]):
    sized_l1_loss, l1_loss, giou_loss, box_loss
  Boxes (xyxy / cxcywh / xywh conversions, IoU):
    box_cxcywh_to_xyxy, box_xyxy_to_cxcywh, box_xywh_to_xyxy, box_xyxy_to_xywh,
    box_cxcywh_to_xywh, box_xywh_to_cxcywh, box_area, box_iou, generalized_box_iou
  Matching (the Hungarian solve runs on the host, callable under jit):
    matching_cost, hungarian_matching
  The DINO criterion:
    CriterionConfig, dino_criterion
  Trained models (a run folder -> detections; docs/inference.md):
    Detector

Names are imported on first use (PEP 562), so `import sized_detr_jax` is cheap and loads none of
TensorFlow, TFDS, grain, orbax, pycocotools, matplotlib or torch; each name brings only its own
module's imports (the losses: jax and chex).
"""
import importlib
from typing import Any

__version__ = "0.2.0"

# Public name -> the module that defines it.
_API = {
    **{name: "losses" for name in ("sized_l1_loss", "l1_loss", "giou_loss", "box_loss")},
    **{name: "box_ops" for name in (
        "box_cxcywh_to_xyxy", "box_xyxy_to_cxcywh", "box_xywh_to_xyxy", "box_xyxy_to_xywh",
        "box_cxcywh_to_xywh", "box_xywh_to_cxcywh", "box_area", "box_iou",
        "generalized_box_iou")},
    "matching_cost": "matching",
    "hungarian_matching": "matching",
    "CriterionConfig": "criterion",
    "dino_criterion": "criterion",
    "Detector": "detector",
}

__all__ = sorted(_API) + ["__version__"]


def __getattr__(name: str) -> Any:
  if name not in _API:
    raise AttributeError(f"module 'sized_detr_jax' has no attribute {name!r}")
  value = getattr(importlib.import_module(f"{__name__}.{_API[name]}"), name)
  globals()[name] = value  # later lookups skip this function
  return value


def __dir__() -> list[str]:
  return sorted(set(globals()) | set(_API))
