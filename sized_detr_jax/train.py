"""The training loop: jitted sharded train step, orbax auto-resume, logging, periodic COCO eval.

Read top to bottom: `train_and_evaluate` gets the run's set-up (`state.setup`: mesh, data,
the method from the registry, optimiser, state restored from the workdir), then loops over
jitted train steps, logging, checkpointing and evaluating at their intervals.

The trainer knows no method by name: the `method.Method` supplies the loss per stage, the
stage schedule, the batches and the eval postprocess. The step is a pure function
`(state, batch) -> (state, metrics)` jitted with explicit shardings on a `("data",)` mesh over
every device of every host: the batch sharded on `data`, the state replicated and donated. The
loop runs inside `jax.set_mesh(mesh)`, so the host Hungarian matching makes one call per device
shard. Randomness is `fold_in(rng, step)` and the data pipeline is indexed by step, so a resumed
run reproduces an uninterrupted one bit for bit on CPU.
"""
import os
import time

from absl import logging
import jax
import numpy as np
import optax

from sized_detr_jax import evaluate
from sized_detr_jax import metrics_log
from sized_detr_jax import sharding
from sized_detr_jax import state as state_lib


def make_train_step(loss_fn, tx, schedule, mesh, state_shardings, *, ema_momentum=None,
                    ema_subtree=lambda params: params):
  """Jitted `(state, batch) -> (state, metrics)`; batch sharded on `data`, state donated.

  Args:
    loss_fn: `(params, state, batch, rng) -> (loss, metrics)` (a `Method.loss_fn(stage)`).
    tx: the optax optimiser; schedule: step -> lr (logged).
    mesh, state_shardings: the mesh and the TrainState's shardings.
    ema_momentum: when set, `state.ema_params` (the teacher) follows `ema_subtree(params)` by
      `state.ema_update` after the optimiser step, inside the same jitted function.
  """

  def step_fn(state, batch):
    rng = jax.random.fold_in(state.rng, state.step)
    grads, metrics = jax.grad(loss_fn, has_aux=True)(state.params, state, batch, rng)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    ema = state.ema_params
    if ema is not None:
      ema = state_lib.ema_update(ema, ema_subtree(params), state.step, ema_momentum)
    metrics = {**metrics, "grad_norm": optax.tree.norm(grads), "lr": schedule(state.step)}
    new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state,
                              ema_params=ema)
    return new_state, metrics

  return jax.jit(step_fn, in_shardings=(state_shardings, sharding.batch_sharding(mesh)),
                 out_shardings=(state_shardings, sharding.replicated(mesh)), donate_argnums=(0,))


def default_workdir(config):
  name = config.get("name", "run")
  return os.path.join("runs", f"{name}-{time.strftime('%Y%m%d-%H%M%S')}")


class NonFiniteLossError(FloatingPointError):
  """The loss or gradient norm became NaN/inf; the last checkpoint is kept untouched."""


def _check_finite(metrics, step, last_checked):
  for key in ("loss", "grad_norm"):
    if not np.isfinite(metrics[key]):
      raise NonFiniteLossError(
          f"{key} is {metrics[key]} at step {step} (first non-finite between steps "
          f"{last_checked + 1} and {step}); no checkpoint was written after step {last_checked}.")


def train_and_evaluate(config, workdir):
  """Train `config.total_steps` steps (resuming from the workdir), evaluate, return metrics."""
  sharding.maybe_initialize_distributed(config)
  workdir = workdir or default_workdir(config)
  os.makedirs(workdir, exist_ok=True)
  if jax.process_index() == 0:
    with open(os.path.join(workdir, "config.json"), "w") as f:
      f.write(config.to_json_best_effort(indent=1))
  run = state_lib.setup(config, workdir)
  method, mesh, state, ckpt = run.method, run.mesh, run.state, run.checkpointer
  steps = {}  # stage -> jitted step (compiled when the stage is first met)

  def train_step(state, batch, step):
    stage = method.stage_at(step - 1)
    if stage not in steps:
      steps[stage] = make_train_step(method.loss_fn(stage), run.tx, run.schedule, mesh,
                                     run.shardings, ema_momentum=config.get("ema_momentum"),
                                     ema_subtree=method.ema_subtree)
    return steps[stage](state, batch)

  predictor = evaluate.Predictor(method, mesh)
  total = int(config.total_steps)
  start = int(jax.device_get(state.step))
  log = metrics_log.MetricsLog(workdir, total_steps=total)
  batches = method.train_batches(config.data, seed=config.seed, start_step=start,
                                 process_index=jax.process_index(),
                                 process_count=jax.process_count())
  last_checked, last_metrics, eval_metrics = start, None, None
  try:
    with jax.set_mesh(mesh):
      for step in range(start + 1, total + 1):
        state, metrics = train_step(state, sharding.global_batch(next(batches), mesh), step)
        is_log = step % config.log_every == 0 or step == total
        is_ckpt = ((config.checkpoint_every and step % config.checkpoint_every == 0)
                   or step == total)
        is_eval = ((config.get("eval_every") and step % config.eval_every == 0)
                   or (step == total and config.get("eval_at_end", True)))
        if is_log or is_ckpt or is_eval:
          last_metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
          _check_finite(last_metrics, step, last_checked)
          last_checked = step
          if is_log:
            log.write(step, last_metrics, images_per_step=method.images_per_step)
          if is_ckpt:
            ckpt.maybe_save(step, state, {"step": step, "config": config.get("name", "")},
                            force=True)
        if is_eval:
          eval_metrics = evaluate.run_evaluation(
              predictor, state.params, state.model_state, step, workdir, run.data_info,
              evaluate.eval_batches(config), box_loss_share=evaluate.box_loss_share(last_metrics),
              title=f"{config.get('name', '')} step {step}")
  finally:
    # Also on errors (a NaN loss): let pending async saves of good steps complete.
    ckpt.close()
    log.close()
  if jax.process_index() == 0 and eval_metrics is not None:
    print(f"\nEvaluation ({run.data_info['val_gt_json']}):\n"
          f"{evaluate.format_metrics_table(eval_metrics)}\n\nFiles in {os.path.abspath(workdir)}: "
          "metrics.jsonl, eval_metrics.json, detections_<step>.json, per_size_<step>.png, "
          "checkpoints/")
  return eval_metrics
