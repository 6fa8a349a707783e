"""The Semi-DETR student: a DINO detector plus the trainable consistency projector, one module.

Params are `{"dino": <a DINO params tree>, "projector": <Projector params>}`, so one
TrainState holds both, the EMA teacher is `ema_params = {"dino": ...}` (the projector is not
EMA'd: Semi-DETR feeds the student's projector output to both views), and a checkpoint's
`params["dino"]` is a plain DINO for evaluation and export. Calling the module runs the
student detector, so the trainer's evaluation and prediction code works unchanged.
"""
import flax.linen as nn
import jax
import jax.numpy as jnp

from sized_detr_jax.models import dino as dino_lib
from sized_detr_jax.semi import consistency


class SemiDETR(nn.Module):
  """DINO student + consistency projector.

  Attributes:
    dino: the DINO module.
    projector: `consistency.Projector` (RoI features of the detector's hidden width).
    roi_size: RoIAlign output side (7).
  """
  dino: dino_lib.DINO
  projector: consistency.Projector
  roi_size: int = 7

  def __call__(self, images, pixel_mask, targets=None, train=False, extra_queries=None):
    """The student detector's outputs (see `DINO.__call__`)."""
    if self.is_initializing():
      hidden = self.dino.hidden_dim
      self.projector(jnp.zeros((1, 1, self.roi_size, self.roi_size, hidden)),
                     jnp.ones((1, 1), bool))
    return self.dino(images, pixel_mask, targets, train, extra_queries)


def encode(module, images, pixel_mask):
  """`model.apply(..., method=encode)`: the detector's `DINO.encode`."""
  return module.dino.encode(images, pixel_mask)


def decode(module, encoded, targets=None, train=False, extra_queries=None):
  """`model.apply(..., method=decode)`: the detector's `DINO.decode`."""
  return module.dino.decode(encoded, targets, train, extra_queries)


def project(module, roi_features, valid):
  """`model.apply(..., method=project)`: the projector."""
  return module.projector(roi_features, valid)


def param_labels(params):
  """Optimiser groups: DINO's for the detector, "default" for the projector."""
  return {"dino": dino_lib.param_labels(params["dino"]),
          "projector": jax.tree.map(lambda _: "default", params["projector"])}


def build_semi_detr(model_config, semi):
  """(SemiDETR module, param_labels) from `config.model` (DINO fields) and a `SemiConfig`."""
  detector = dino_lib.build_dino(model_config)
  projector = consistency.Projector(conv_dim=detector.hidden_dim,
                                    fc_dim=int(semi.projector_fc_dim),
                                    out_dim=detector.hidden_dim)
  return SemiDETR(dino=detector, projector=projector), param_labels
