"""The method protocol: what the trainer needs to know about a detection method.

A method (plain DINO, Semi-DETR, Co-DINO, ...) is one folder or module exposing
`build(config) -> Method`; `methods.py` maps names to those functions. The trainer and the
evaluation code read only the fields below, so adding a method never touches them.

Conventions shared by every method:
  * `model.apply({"params": p, **model_state}, images, pixel_mask, targets=None, train=False)`
    returns DINO's outputs dict (`pred_logits [B, Q, C]`, `pred_boxes [B, Q, 4]` normalised
    cxcywh, ...), so evaluation and prediction work for every method;
  * `loss_fn(stage)(params, state, batch, rng) -> (loss, metrics)`, with `state` the
    `state.TrainState` (its `model_state` and `ema_params` are read, never written), `batch` as
    produced by `train_batches` (global, sharded on the mesh's `data` axis) and `metrics` a
    flat dict of [] scalars including `loss`;
  * `stage` is a static Python int: the trainer compiles one step per stage it meets;
  * one-to-one matching goes through `matching.hungarian_matching`: the split train step
    (`split_step.py`, `config.split_step`) finds those calls when it traces the loss and
    solves them between its two executables, so a method declares no matching problems. The
    problems of one step must not depend on each other's results.
"""
from typing import Any, Callable, Iterator, NamedTuple

import jax

from sized_detr_jax.data import batch as batch_lib
from sized_detr_jax.data import pipeline

LossFn = Callable[..., Any]


class Method(NamedTuple):
  """Everything the trainer and evaluation need from a method.

  Attributes:
    name: registry name (`config.method`).
    model: the Flax module (called like DINO, see the module docstring).
    param_labels: params -> pytree of optimiser group names ("frozen", "backbone", ...).
    loss_fn: stage -> `loss_fn(params, state, batch, rng) -> (loss, metrics)`.
    stage_at: completed steps -> training stage (static int; 1 for single-stage methods).
    train_batches: `(data_config, *, seed, start_step, process_index, process_count)` ->
      iterator of process-local numpy batches (the `loss_fn`'s batch structure).
    images_per_step: images consumed per step (for img/s).
    postprocess: stage -> `fn(outputs, batch) -> {"scores" [B, K], "labels" [B, K],
      "boxes_xyxy" [B, K, 4], "boxes_xywh" [B, K, 4]}` in original-image pixels.
    ema_subtree: params -> the subtree the EMA teacher tracks (`TrainState.ema_params`), used
      when `config.ema_momentum` is set.
  """
  name: str
  model: Any
  param_labels: Callable[[Any], Any]
  loss_fn: Callable[[int], LossFn]
  stage_at: Callable[[int], int]
  train_batches: Callable[..., Iterator[Any]]
  images_per_step: int
  postprocess: Callable[[int], Callable[..., Any]]
  ema_subtree: Callable[[Any], Any] = lambda params: params


def single_stage(step: int) -> int:
  """`stage_at` of methods without stages."""
  del step
  return 1


def labeled_batches(data_config, **kwargs) -> Iterator[Any]:
  """`train_batches` of supervised methods: the labeled pipeline's batches.

  Training batches carry `image_index`, not the int32 `image_id` (COCO ids >= 2**31 work).
  """
  return pipeline.build_train_iterator(data_config, with_image_id=False, **kwargs)


def detector_loss(model, criterion_fn) -> LossFn:
  """`loss_fn` of a supervised detector: one training forward pass, then `criterion_fn`.

  Args:
    model: the Flax module.
    criterion_fn: `(outputs, targets) -> flat loss dict with "loss"` (configs already bound).
  """

  def loss_fn(params, state, batch, rng):
    dn_rng, dropout_rng = jax.random.split(rng)
    targets = batch_lib.model_targets(batch)
    outputs = model.apply({"params": params, **state.model_state},
                          batch_lib.model_images(batch), batch["pixel_mask"], targets=targets,
                          train=True, rngs={"dn": dn_rng, "dropout": dropout_rng})
    losses = criterion_fn(outputs, targets)
    return losses["loss"], losses

  return loss_fn
