"""Co-DINO (Co-DETR on DINO): auxiliary one-to-many heads and customized positive queries.

`build(config) -> method.Method`. Modules: config (CoDINOConfig: `heads` and `loss`
sections), anchors, assigners, heads (RPN / RoI / ATSS), aux_losses, model (CoDINO = DINO +
auxiliary heads), criterion (main head + auxiliary + positive-query losses), method.
"""
from sized_detr_jax.co_dino.method import build

__all__ = ["build"]
