"""Co-DINO as a `method.Method` (`config.method = "co_dino"`)."""
import functools

from sized_detr_jax import criterion
from sized_detr_jax import dino_method
from sized_detr_jax import method as method_lib
from sized_detr_jax import soft_nms
from sized_detr_jax.co_dino import config as co_config
from sized_detr_jax.co_dino import criterion as co_criterion
from sized_detr_jax.co_dino import model as co_model


def build(config) -> method_lib.Method:
  """Co-DINO from `config.model` (DINO fields), `config.criterion` (the main head's),
  `config.co_dino` (heads and loss weights, one flat section) and `config.data`.

  Training adds the auxiliary heads and positive queries; evaluation is the DINO inside
  (`params["dino"]`), with DINO's top-K postprocess or, with `model.soft_nms_iou` set (0.8 in
  Co-DETR), top-900 + class-wise soft-NMS (`soft_nms.co_dino_postprocess`).
  """
  co = co_config.CoDINOConfig.from_config(config.get("co_dino"),
                                          num_decoder_layers=config.model.dec_layers)
  crit = criterion.CriterionConfig.from_config(config.get("criterion"))
  model, param_labels = co_model.build_co_dino(config.model, co.heads)
  loss = method_lib.detector_loss(
      model, functools.partial(co_criterion.co_dino_criterion, crit=crit, weights=co.loss))
  num_select = int(config.model.get("num_select", 300))
  soft_nms_iou = config.model.get("soft_nms_iou")
  if soft_nms_iou:  # Co-DETR's test time: top-900 -> class-wise soft-NMS -> keep num_select
    postprocess_fn = lambda outputs, batch: soft_nms.co_dino_postprocess(
        outputs, batch["orig_size"], num_select=num_select, iou_threshold=float(soft_nms_iou))
  else:
    postprocess_fn = dino_method.topk_postprocess(num_select)
  return method_lib.Method(
      name="co_dino", model=model, param_labels=param_labels, loss_fn=lambda stage: loss,
      stage_at=method_lib.single_stage, train_batches=method_lib.labeled_batches,
      images_per_step=int(config.data.batch_size), postprocess=lambda stage: postprocess_fn)
