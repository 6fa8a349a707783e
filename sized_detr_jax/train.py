"""Training loop: sharded jitted train step, orbax auto-resume, logging, periodic COCO eval.

Read top to bottom: `train_and_evaluate` sets up the mesh, the data, the model and optimiser,
restores the newest checkpoint in the workdir (if any), then loops over jitted train steps,
logging, checkpointing and evaluating at their intervals.

State is one pytree (`TrainState`): params, frozen model variables, optimiser state, step, a raw
PRNG key, and optional EMA params. The step is a pure function `(state, batch) -> (state,
metrics)` jitted with explicit shardings on a `("data",)` mesh over every device of every host:
the batch is sharded on `data`, the state replicated, and the state buffer donated. The
Hungarian matcher runs inside it on the host (`criterion.dino_criterion` with the mesh: one host
call per device shard). Randomness is `fold_in(rng, step)`, and the data pipeline is indexed by
step, so a resumed run reproduces an uninterrupted one bit for bit on CPU.

`config.method` picks the model and loss (`build_model`, `make_loss_fn`): "dino" (default),
"semi_detr" (`semi.step`: batches {"labeled", "unlabeled": {"weak", "strong"}}, the EMA params
are the teacher, one compiled step per stage, switched at `semi.switch_step`) or "co_dino"
(`co_dino`: auxiliary heads and positive queries, training only). Every model is called like
DINO and returns DINO outputs, so evaluation and prediction are shared.
"""
import os
import time
from typing import Any, Optional

from absl import logging
import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from sized_detr_jax import checkpointing
from sized_detr_jax import criterion as criterion_lib
from sized_detr_jax import evaluate
from sized_detr_jax import metrics_log
from sized_detr_jax import optim

DATA_AXIS = "data"


@flax.struct.dataclass
class TrainState:
  """Everything a step reads and writes; a pytree (checkpointed whole)."""
  step: jax.Array                 # [] int32
  params: Any                     # trainable params
  model_state: Any                # other model variables (e.g. frozen BN statistics), constant
  opt_state: Any
  rng: jax.Array                  # [2] uint32 raw key; per-step keys are fold_in(rng, step)
  ema_params: Optional[Any] = None  # EMA ("teacher") params, or None


def ema_update(ema_params, params, step, momentum):
  """Semi-DETR's EMA: m = min(momentum, step / (step + 1)); ema = m * ema + (1 - m) * params.

  At step 0 m is 0, so the teacher starts as a copy of the student.
  """
  step = jnp.asarray(step, jnp.float32)
  m = jnp.minimum(momentum, step / (step + 1.0))
  return jax.tree.map(lambda e, p: m * e + (1.0 - m) * p, ema_params, params)


# ---------------------------------------------------------------------------------------------
# Mesh and batches.
# ---------------------------------------------------------------------------------------------
def make_mesh(num_devices=None):
  """1-D ("data",) mesh over every device of every process (or the first `num_devices`).

  Axis type Auto: the compiler propagates shardings (jax >= 0.7 defaults make_mesh to
  Explicit, which would demand sharding-typed code in the model).
  """
  n = num_devices or jax.device_count()
  return jax.make_mesh((n,), (DATA_AXIS,), axis_types=(jax.sharding.AxisType.Auto,),
                       devices=jax.devices()[:n])


def global_batch(local_batch, mesh):
  """Process-local numpy batch (a dict, possibly nested) -> global jax arrays sharded on the
  batch axis."""
  sharding = NamedSharding(mesh, P(DATA_AXIS))
  return jax.tree.map(lambda v: jax.make_array_from_process_local_data(sharding, np.asarray(v)),
                      local_batch)


# ---------------------------------------------------------------------------------------------
# Model, state and step.
# ---------------------------------------------------------------------------------------------
METHODS = ("dino", "semi_detr", "co_dino")


def _method(config):
  method = config.get("method", "dino")
  if method not in METHODS:
    raise ValueError(f"config.method must be one of {METHODS}, got {method!r}")
  return method


def build_model(config):
  """(Flax module, param_labels function) for `config.method` and `config.model`.

  Every module is called as `model.apply(vars, images, pixel_mask, targets=None, train=False)`
  and returns DINO outputs, so evaluation and prediction do not depend on the method.
  """
  method = _method(config)
  if method == "semi_detr":
    from sized_detr_jax.semi import model as semi_model  # pylint: disable=g-import-not-at-top
    return semi_model.build_semi_detr(config)
  if method == "co_dino":
    from sized_detr_jax import co_dino  # pylint: disable=g-import-not-at-top
    return co_dino.build_co_dino(config)
  from sized_detr_jax.models import dino  # pylint: disable=g-import-not-at-top
  return dino.build_dino(config.model), dino.param_labels


def make_loss_fn(model, config, mesh, stage=1):
  """`loss_fn(params, state, batch, rng) -> (loss, metrics dict)` of `config.method`.

  `stage` (static) selects Semi-DETR's one-to-many (1) or one-to-one (2) stage.
  """
  method = _method(config)
  if method == "semi_detr":
    from sized_detr_jax.semi import step as semi_step  # pylint: disable=g-import-not-at-top
    return semi_step.make_semi_loss(model, config, mesh, stage, data_axis=DATA_AXIS)
  if method == "co_dino":
    from sized_detr_jax import co_dino  # pylint: disable=g-import-not-at-top
    criterion_fn = co_dino.co_dino_criterion
  else:
    criterion_fn = criterion_lib.dino_criterion

  def loss_fn(params, state, batch, rng):
    dn_rng, dropout_rng = jax.random.split(rng)
    outputs = model.apply({"params": params, **state.model_state}, model_images(batch),
                          batch["pixel_mask"], targets=model_targets(batch), train=True,
                          rngs={"dn": dn_rng, "dropout": dropout_rng})
    crit_config = config if method == "co_dino" else config.criterion
    losses = criterion_fn(outputs, model_targets(batch), crit_config, mesh=mesh,
                          data_axis=DATA_AXIS)
    return losses["loss"], losses

  return loss_fn


def model_images(batch):
  """Model input images: float ImageNet-normalised (uint8 batches are normalised on device)."""
  if batch["image"].dtype == jnp.uint8:
    from sized_detr_jax.data import transforms  # pylint: disable=g-import-not-at-top
    return transforms.normalize_image_jax(batch["image"], batch["pixel_mask"])
  return batch["image"]


def model_targets(batch):
  return {k: batch[k] for k in ("boxes", "labels", "valid", "orig_size", "size") if k in batch}


def init_state(model, tx, config, example_batch, mesh):
  """Initialise the TrainState directly with replicated shardings (never on one device first)."""
  replicated = NamedSharding(mesh, P())

  def init_fn(rng):
    init_rng, state_rng = jax.random.split(rng)
    variables = model.init({"params": init_rng, "dropout": init_rng, "dn": init_rng},
                           example_batch["image"], example_batch["pixel_mask"], train=False)
    variables = flax.core.unfreeze(variables)
    params = variables.pop("params")
    ema = params if config.get("ema_momentum") else None
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, model_state=variables,
                      opt_state=tx.init(params), rng=state_rng, ema_params=ema)

  rng = jax.random.PRNGKey(config.seed)
  abstract = jax.eval_shape(init_fn, rng)
  shardings = jax.tree.map(lambda _: replicated, abstract)
  return jax.jit(init_fn, out_shardings=shardings)(rng), shardings


def make_train_step(model, tx, schedule, config, mesh, state_shardings, *, stage=1):
  """Jitted `(state, batch) -> (state, metrics)`; batch sharded on `data`, state donated.

  The loss is `make_loss_fn(model, config, mesh, stage)`; the EMA params (Semi-DETR's teacher)
  are updated after the optimiser step, inside the same jitted function.
  """
  ema_momentum = config.get("ema_momentum")
  loss_fn = make_loss_fn(model, config, mesh, stage)

  def step_fn(state, batch):
    rng = jax.random.fold_in(state.rng, state.step)
    grads, losses = jax.grad(loss_fn, has_aux=True)(state.params, state, batch, rng)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    ema = state.ema_params
    if ema is not None:
      ema = ema_update(ema, params, state.step, ema_momentum)
    metrics = {**losses, "grad_norm": optax.tree.norm(grads), "lr": schedule(state.step)}
    new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state,
                              ema_params=ema)
    return new_state, metrics

  replicated = NamedSharding(mesh, P())
  batch_sharding = NamedSharding(mesh, P(DATA_AXIS))
  return jax.jit(step_fn, in_shardings=(state_shardings, batch_sharding),
                 out_shardings=(state_shardings, replicated), donate_argnums=(0,))


def make_predict_fn(model, config, mesh, state_shardings, *, nms=False):
  """Jitted `(params, model_state, batch) -> detections` (top-K per image, original pixels).

  `nms`: class-wise NMS (IoU `semi.nms_iou`, 0.6) instead of DINO's NMS-free top-K, as
  Semi-DETR evaluates a model trained with one-to-many assignment (before its switch).
  """
  from sized_detr_jax import box_ops  # pylint: disable=g-import-not-at-top
  from sized_detr_jax.models import dino  # pylint: disable=g-import-not-at-top
  from sized_detr_jax.semi import pseudo_labels  # pylint: disable=g-import-not-at-top
  num_select = config.model.get("num_select", 300)

  def predict(params, model_state, batch):
    outputs = model.apply({"params": params, **model_state}, model_images(batch),
                          batch["pixel_mask"], train=False)
    if not nms:
      detections = dino.postprocess(outputs, batch["orig_size"], num_select=num_select)
      return {**detections, "image_id": batch["image_id"]}
    q, c = outputs["pred_logits"].shape[1:]
    det = pseudo_labels.teacher_detections(
        outputs, batch["orig_size"], method="nms", score_threshold=0.001,
        iou_threshold=float(config.semi.get("nms_iou", 0.6)), max_detections=num_select,
        num_candidates=min(q * c, max(num_select, 1000)))
    scores = jnp.where(det["valid"], det["scores"], 0.0)
    return {"scores": scores, "labels": det["labels"], "boxes_xyxy": det["boxes_xyxy"],
            "boxes_xywh": box_ops.box_xyxy_to_xywh(det["boxes_xyxy"]),
            "image_id": batch["image_id"]}

  replicated = NamedSharding(mesh, P())
  batch_sharding = NamedSharding(mesh, P(DATA_AXIS))
  return jax.jit(predict, in_shardings=(state_shardings.params, state_shardings.model_state,
                                        batch_sharding), out_shardings=replicated)


# ---------------------------------------------------------------------------------------------
# Evaluation.
# ---------------------------------------------------------------------------------------------
def run_evaluation(predict_fn, params, model_state, eval_batches, mesh, data_info, workdir, step,
                   *, box_loss_share=None, title=""):
  """Predict every eval batch, score with pycocotools on process 0, write files and a plot.

  Each process feeds its own shard; the predictions come back replicated, so process 0 sees
  every image. Batch padding has image_id < 0 and is dropped.

  Returns:
    metrics dict (AP, AP50, AP75, APs, APm, APl, ...) on process 0, None elsewhere.
  """
  dets = []
  for local in eval_batches:
    out = jax.device_get(predict_fn(params, model_state, global_batch(local, mesh)))
    if jax.process_index() == 0:
      dets += evaluate.detections_to_coco(out["image_id"], out["scores"], out["labels"],
                                          out["boxes_xywh"], data_info["category_ids"],
                                          min_score=0.001)
  if jax.process_index() != 0:
    return None
  metrics, _ = evaluate.coco_metrics(data_info["val_gt_json"], dets)
  evaluate.write_evaluation(workdir, step, dets, metrics)
  evaluate.plot_per_size(metrics, os.path.join(workdir, f"per_size_{step}.png"),
                         box_loss_share=box_loss_share, title=title or f"step {step}")
  logging.info("eval at step %d:\n%s", step, evaluate.format_metrics_table(metrics))
  return metrics


def box_loss_share(metrics):
  """Share of the final layer's box loss per size class, from the criterion's metric_* terms."""
  totals = {s: metrics.get(f"metric_loss_bbox_{s}", 0.0) * metrics.get(f"metric_num_boxes_{s}", 0.0)
            for s in criterion_lib.SIZE_NAMES}
  z = sum(totals.values())
  return {s: v / z for s, v in totals.items()} if z > 0 else None


# ---------------------------------------------------------------------------------------------
# The loop.
# ---------------------------------------------------------------------------------------------
def default_workdir(config):
  name = config.get("name", "run")
  return os.path.join("runs", f"{name}-{time.strftime('%Y%m%d-%H%M%S')}")


def maybe_initialize_distributed(config):
  """`jax.distributed.initialize` from `config.distributed` (multi-host); no-op if absent."""
  dist = config.get("distributed")
  if dist and dist.get("enabled", False):
    kwargs = {k: dist[k] for k in ("coordinator_address", "num_processes", "process_id")
              if dist.get(k) is not None}
    jax.distributed.initialize(**kwargs)


class NonFiniteLossError(FloatingPointError):
  """The loss or gradient norm became NaN/inf; the last checkpoint is kept untouched."""


def _check_finite(metrics, step, last_checked):
  for key in ("loss", "grad_norm"):
    if not np.isfinite(metrics[key]):
      raise NonFiniteLossError(
          f"{key} is {metrics[key]} at step {step} (first non-finite between steps "
          f"{last_checked + 1} and {step}); no checkpoint was written after step {last_checked}.")


def _load_pretrained(state, shardings, model_config):
  """Fresh run: converted weights (convert_torch .npz) into params (and the EMA copy)."""
  from sized_detr_jax import convert_torch  # pylint: disable=g-import-not-at-top
  params = jax.device_get(state.params)
  if "dino" in params:  # Semi-DETR / Co-DINO wrap a DINO under "dino"
    params = {**params, "dino": convert_torch.load_pretrained(params["dino"], model_config)}
  else:
    params = convert_torch.load_pretrained(params, model_config)
  params = jax.device_put(params, shardings.params)
  logging.info("Loaded pretrained weights: backbone=%r full=%r",
               model_config.get("pretrained_backbone"), model_config.get("pretrained"))
  return state.replace(params=params,
                       ema_params=None if state.ema_params is None else params)


def _setup(config, workdir):
  """Mesh, data, model, optimiser, state (restored when the workdir has a checkpoint)."""
  from sized_detr_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  mesh = make_mesh(config.get("num_devices"))
  data_info = pipeline.dataset_info(config.data)
  if config.model.num_classes != data_info["num_classes"]:
    raise ValueError(f"config.model.num_classes={config.model.num_classes} but the data has "
                     f"{data_info['num_classes']} categories ({data_info['category_names'][:5]}...)")
  model, param_labels = build_model(config)
  height, width = data_info["buckets"][0]
  example = {"image": jnp.zeros((1, height, width, 3), jnp.float32),
             "pixel_mask": jnp.ones((1, height, width), bool)}
  abstract_vars = jax.eval_shape(
      lambda: model.init({"params": jax.random.PRNGKey(0), "dropout": jax.random.PRNGKey(0),
                          "dn": jax.random.PRNGKey(0)}, example["image"], example["pixel_mask"],
                         train=False))
  tx, schedule = optim.make_optimizer(abstract_vars["params"],
                                      param_labels(abstract_vars["params"]), config.optimizer)
  state, shardings = init_state(model, tx, config, example, mesh)
  ckpt = checkpointing.Checkpointer(workdir, every=config.checkpoint_every,
                                    keep=config.get("keep_checkpoints", 3))
  restored = ckpt.restore_latest(checkpointing.abstract_like(state))
  if restored is not None:
    step, state, _ = restored
    logging.info("Resumed from %s at step %d.", ckpt.directory, step)
  elif config.model.get("pretrained") or config.model.get("pretrained_backbone"):
    state = _load_pretrained(state, shardings, config.model)
  return mesh, data_info, model, tx, schedule, state, shardings, ckpt


def _eval_batches(config):
  from sized_detr_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  batches, _ = pipeline.build_eval_iterator(config.data, process_index=jax.process_index(),
                                            process_count=jax.process_count())
  return batches


def _stage(config, step):
  """Semi-DETR's training stage after `step` completed steps (1 for other methods)."""
  if _method(config) != "semi_detr":
    return 1
  from sized_detr_jax.semi import step as semi_step  # pylint: disable=g-import-not-at-top
  return semi_step.stage_at(step, config)


def _eval_nms(config, step):
  """Semi-DETR evaluates with class-wise NMS while it trains one-to-many (before the switch)."""
  return _method(config) == "semi_detr" and _stage(config, step) == 1


def _train_batches(config, start):
  """Iterator of process-local batches from step `start` on: the labeled batch dict, or for
  Semi-DETR {"labeled": ..., "unlabeled": {"weak": ..., "strong": ...}}."""
  from sized_detr_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  kwargs = dict(seed=config.seed, start_step=start, process_index=jax.process_index(),
                process_count=jax.process_count())
  labeled = pipeline.build_train_iterator(config.data, **kwargs)
  if _method(config) != "semi_detr":
    return labeled
  unlabeled = pipeline.build_unlabeled_iterator(config.data, **kwargs)
  if unlabeled is None:
    raise ValueError("config.method='semi_detr' needs unlabeled data: set config.data."
                     "unlabeled_ann/unlabeled_images (coco) or tfds_unlabeled_split (tfds)")
  return ({"labeled": l, "unlabeled": u} for l, u in zip(labeled, unlabeled))


def train_and_evaluate(config, workdir):
  """Train `config.total_steps` steps (resuming from the workdir), evaluate, return metrics."""
  maybe_initialize_distributed(config)
  workdir = workdir or default_workdir(config)
  os.makedirs(workdir, exist_ok=True)
  if jax.process_index() == 0:
    with open(os.path.join(workdir, "config.json"), "w") as f:
      f.write(config.to_json_best_effort(indent=1))
  mesh, data_info, model, tx, schedule, state, shardings, ckpt = _setup(config, workdir)
  steps = {}  # stage -> jitted step (Semi-DETR compiles its second stage at the switch)

  def train_step(state, batch, step):
    stage = _stage(config, step - 1)
    if stage not in steps:
      steps[stage] = make_train_step(model, tx, schedule, config, mesh, shardings, stage=stage)
    return steps[stage](state, batch)

  predict_fns = {}  # stage -> jitted predict (NMS in Semi-DETR's one-to-many stage)

  def predict_fn_at(step):
    stage = _stage(config, step)
    if stage not in predict_fns:
      predict_fns[stage] = make_predict_fn(model, config, mesh, shardings,
                                           nms=_eval_nms(config, step))
    return predict_fns[stage]

  total = int(config.total_steps)
  start = int(jax.device_get(state.step))
  log = metrics_log.MetricsLog(workdir, total_steps=total)
  batches = _train_batches(config, start)
  images_per_step = config.data.batch_size
  if _method(config) == "semi_detr":
    images_per_step += config.data.unlabeled_batch_size
  last_checked, last_metrics, eval_metrics = start, None, None
  try:
    for step in range(start + 1, total + 1):
      state, metrics = train_step(state, global_batch(next(batches), mesh), step)
      is_log = step % config.log_every == 0 or step == total
      is_ckpt = (config.checkpoint_every and step % config.checkpoint_every == 0) or step == total
      is_eval = ((config.get("eval_every") and step % config.eval_every == 0)
                 or (step == total and config.get("eval_at_end", True)))
      if is_log or is_ckpt or is_eval:
        last_metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
        _check_finite(last_metrics, step, last_checked)
        last_checked = step
        if is_log:
          log.write(step, last_metrics, images_per_step=images_per_step)
        if is_ckpt:
          ckpt.maybe_save(step, state, {"step": step, "config": config.get("name", "")},
                          force=True)
      if is_eval:
        eval_metrics = run_evaluation(
            predict_fn_at(step), state.params, state.model_state, _eval_batches(config), mesh,
            data_info,
            workdir, step, box_loss_share=box_loss_share(last_metrics),
            title=f"{config.get('name', '')} step {step}")
  finally:
    # Also on errors (a NaN loss): let pending async saves of good steps complete.
    ckpt.close()
    log.close()
  if jax.process_index() == 0 and eval_metrics is not None:
    print(f"\nEvaluation ({data_info['val_gt_json']}):\n"
          f"{evaluate.format_metrics_table(eval_metrics)}\n\nFiles in {os.path.abspath(workdir)}: "
          "metrics.jsonl, eval_metrics.json, detections_<step>.json, per_size_<step>.png, "
          "checkpoints/")
  return eval_metrics


def _restore_for_inference(config, workdir, mode):
  """(mesh, data_info, model, params, model_state, predict_fn, step) of the newest checkpoint."""
  if not workdir:
    raise ValueError(f"--mode={mode} needs --workdir pointing at a training run")
  maybe_initialize_distributed(config)
  mesh, data_info, model, _, _, state, shardings, ckpt = _setup(config, workdir)
  ckpt.close()
  step = int(jax.device_get(state.step))
  if step == 0:
    raise FileNotFoundError(f"no checkpoint in {os.path.join(workdir, 'checkpoints')}")
  use_ema = config.get("eval_ema") and state.ema_params is not None
  params = state.ema_params if use_ema else state.params
  predict_fn = make_predict_fn(model, config, mesh, shardings,
                               nms=_eval_nms(config, step))
  return mesh, data_info, params, state.model_state, predict_fn, step


def evaluate_only(config, workdir):
  """Evaluate the newest checkpoint of `workdir` (EMA params if `config.eval_ema`)."""
  mesh, data_info, params, model_state, predict_fn, step = _restore_for_inference(
      config, workdir, "eval")
  metrics = run_evaluation(predict_fn, params, model_state, _eval_batches(config), mesh,
                           data_info, workdir, step)
  if metrics is not None:
    print(evaluate.format_metrics_table(metrics))
  return metrics


def predict(config, workdir, image_paths, *, min_score=0.3):
  """Detect objects in image files with the newest checkpoint; PNGs to WORKDIR/predictions/."""
  from sized_detr_jax import visualize  # pylint: disable=g-import-not-at-top
  from sized_detr_jax.data import image_files  # pylint: disable=g-import-not-at-top
  from sized_detr_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  source = image_files.ImageFilesSource(image_paths)
  mesh, data_info, params, model_state, predict_fn, _ = _restore_for_inference(
      config, workdir, "predict")
  batch_fn = pipeline.make_eval_batch_fn(source, config.data, process_index=jax.process_index(),
                                         process_count=jax.process_count())
  out_dir = os.path.join(workdir, "predictions")
  os.makedirs(out_dir, exist_ok=True)
  written = []
  num_batches = -(-len(source) // pipeline.resolve_data_config(config.data).eval_batch_size)
  for step in range(num_batches):
    out = jax.device_get(predict_fn(params, model_state, global_batch(batch_fn(step), mesh)))
    if jax.process_index() != 0:
      continue
    for k, image_id in enumerate(out["image_id"]):
      if image_id < 0:
        continue
      example = source[int(image_id)]
      drawn = visualize.draw_detections(example["image"], out["boxes_xyxy"][k], out["scores"][k],
                                        out["labels"][k], data_info["category_names"],
                                        min_score=min_score)
      stem = os.path.splitext(os.path.basename(source.paths[int(image_id)]))[0]
      path = os.path.join(out_dir, f"{stem}.png")
      drawn.save(path)
      written.append(path)
  if written:
    print(f"Wrote {len(written)} images with detections (score >= {min_score}) to {out_dir}")
  return written
