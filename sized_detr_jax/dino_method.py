"""Plain DINO as a `method.Method` (`config.method = "dino"`): the model of `models/dino.py`,
DINO's set criterion and its top-k evaluation (the siblings: `semi/method.py`,
`co_dino/method.py`)."""
import functools

from sized_detr_jax import criterion
from sized_detr_jax import method as method_lib
from sized_detr_jax.models import dino


def topk_postprocess(num_select: int):
  """`Method.postprocess` of NMS-free DETR evaluation: `dino.postprocess` at the original size."""
  return lambda outputs, batch: dino.postprocess(outputs, batch["orig_size"],
                                                 num_select=num_select)


def build(config) -> method_lib.Method:
  """Plain DINO as a `method.Method`.

  Reads `config.model` (DINO's fields, `num_select`), `config.criterion` (resolved once into a
  `criterion.CriterionConfig`) and `config.data.batch_size`.
  """
  model = dino.build_dino(config.model)
  criterion_fn = functools.partial(
      criterion.dino_criterion,
      config=criterion.CriterionConfig.from_config(config.get("criterion")))
  loss = method_lib.detector_loss(model, criterion_fn)
  postprocess_fn = topk_postprocess(int(config.model.get("num_select", 300)))
  return method_lib.Method(
      name="dino", model=model, param_labels=dino.param_labels, loss_fn=lambda stage: loss,
      stage_at=method_lib.single_stage, train_batches=method_lib.labeled_batches,
      images_per_step=int(config.data.batch_size), postprocess=lambda stage: postprocess_fn)
