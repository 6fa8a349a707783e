"""Co-DINO (Co-DETR on DINO): auxiliary one-to-many heads and customized positive queries.

`build_co_dino(config)` -> (CoDINO module, param_labels); `co_dino_criterion(outputs, targets,
config, mesh=..., data_axis=...)` -> flat loss dict. See model.py and criterion.py.
"""
from sized_detr_jax.co_dino.criterion import co_dino_criterion
from sized_detr_jax.co_dino.criterion import co_dino_loss_weights
from sized_detr_jax.co_dino.model import AuxConfig
from sized_detr_jax.co_dino.model import build_co_dino
from sized_detr_jax.co_dino.model import CoDINO
from sized_detr_jax.co_dino.model import param_labels

__all__ = ["AuxConfig", "CoDINO", "build_co_dino", "co_dino_criterion", "co_dino_loss_weights",
           "param_labels"]
