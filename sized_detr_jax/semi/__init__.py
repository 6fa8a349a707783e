"""Semi-DETR (docs/methods.md) with the Sized L1 loss: `build(config) -> method.Method`.

Modules: config (SemiConfig), model (DINO student + consistency projector), pseudo_labels
(teacher detections -> pseudo targets in the strong view), gmm (cost-based mining), consistency
(RoIAlign projector, consistency queries and loss), losses (supervised + unsupervised criteria,
per-branch box loss), step (the loss of one training step), method (the Method).
"""
from sized_detr_jax.semi.method import build

__all__ = ["build"]
