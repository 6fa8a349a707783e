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
import collections
import json
import signal
import threading
import time

from absl import logging
import jax
from jax.experimental import multihost_utils
import jax.numpy as jnp
import numpy as np
import optax

from sized_detr_jax import config_lib
from sized_detr_jax import evaluate
from sized_detr_jax import executable_cache
from sized_detr_jax import fs
from sized_detr_jax import host_runtime
from sized_detr_jax import inference_spec
from sized_detr_jax import metrics_log
from sized_detr_jax import optim
from sized_detr_jax import peer_watch
from sized_detr_jax import preflight
from sized_detr_jax import sharding
from sized_detr_jax import split_step
from sized_detr_jax import state as state_lib
from sized_detr_jax import workdir_lock


# Loss kinds whose gradient norms `grad_split_every` reports (the criterion's
# `metric_weighted_{kind}`: their weighted share of the loss).
GRAD_SPLIT_KINDS = ("ce", "bbox", "giou")


def _grads_with_split(loss_fn, params, state, batch, rng, every):
  """Gradients of the loss and, every `every` steps, the norms of each kind's gradient.

  One forward pass and `jax.vjp`; the extra backward passes run only on the steps that log
  (`lax.cond`). Kinds the loss does not report (`metric_weighted_{kind}`) are skipped.
  """
  def vector_loss(p):
    loss, metrics = loss_fn(p, state, batch, rng)
    kinds = [k for k in GRAD_SPLIT_KINDS if f"metric_weighted_{k}" in metrics]
    return jnp.stack([loss] + [metrics[f"metric_weighted_{k}"] for k in kinds]), (metrics,
                                                                                   kinds)

  values, vjp_fn, (metrics, kinds) = jax.vjp(vector_loss, params, has_aux=True)
  unit = lambda i: jnp.zeros_like(values).at[i].set(1.0)
  grads = vjp_fn(unit(0))[0]
  if kinds:
    norms = jax.lax.cond(
        (state.step + 1) % every == 0,
        lambda: jnp.stack([optax.tree.norm(vjp_fn(unit(i + 1))[0]) for i in range(len(kinds))]),
        lambda: jnp.full((len(kinds),), jnp.nan, values.dtype))
    metrics = {**metrics, **{f"grad_norm_{k}": norms[i] for i, k in enumerate(kinds)}}
  return grads, metrics


def make_train_step(loss_fn, tx, schedule, mesh, state_shardings, **step_options):
  """Jitted `(state, batch) -> (state, metrics)`; batch sharded on `data`, state donated.

  Args:
    loss_fn, tx, schedule, step_options: as `train_step_fn`.
    mesh, state_shardings: the mesh and the TrainState's shardings.
  """
  return jax.jit(train_step_fn(loss_fn, tx, schedule, **step_options),
                 in_shardings=(state_shardings, sharding.batch_sharding(mesh)),
                 out_shardings=(state_shardings, sharding.replicated(mesh)), donate_argnums=(0,))


def train_step_fn(loss_fn, tx, schedule, *, ema_momentum=None, ema_subtree=lambda params: params,
                  grad_split_every=0):
  """The pure train step `(state, batch) -> (state, metrics)` (not jitted).

  Args:
    loss_fn: `(params, state, batch, rng) -> (loss, metrics)` (a `Method.loss_fn(stage)`).
    tx: the optax optimiser; schedule: step -> lr (logged).
    ema_momentum: when set, `state.ema_params` (the teacher) follows `ema_subtree(params)` by
      `state.ema_update` after the optimiser step, inside the same jitted function.
    ema_subtree: the params the teacher tracks (`Method.ema_subtree`).
    grad_split_every: > 0: every that many steps also report `grad_norm_{ce,bbox,giou}`, the
      global norm (before clipping) of each kind's weighted gradient (NaN on other steps).
  """

  def step_fn(state, batch):
    rng = jax.random.fold_in(state.rng, state.step)
    if grad_split_every:
      grads, metrics = _grads_with_split(loss_fn, state.params, state, batch, rng,
                                         grad_split_every)
    else:
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

  return step_fn


def _describe_images(batch):
  """'4 x 192x192' for every image array of a (possibly nested) batch, with its path."""
  parts = []
  for path, leaf in jax.tree_util.tree_leaves_with_path(batch):
    keys = [getattr(k, "key", str(k)) for k in path]
    if keys[-1] == "image":
      where = "/".join(keys[:-1])
      parts.append(f"{leaf.shape[0]} x {leaf.shape[1]}x{leaf.shape[2]}"
                   + (f" ({where})" if where else ""))
  return "images " + ", ".join(parts)


def default_workdir(config):
  name = config.get("name", "run")
  return f"runs/{name}-{time.strftime('%Y%m%d-%H%M%S')}"


class NonFiniteLossError(FloatingPointError):
  """The loss or gradient norm became NaN/inf; the last checkpoint is kept untouched."""


class Preempted(Exception):
  """SIGTERM (preemption) stopped training after saving a checkpoint of the current step."""


class _StopSignal:
  """Whether to stop for a preemption notice (SIGTERM) after a step; every process stops at
  the same step.

  One process (no `jax.distributed`): a Python SIGTERM handler records the signal (the previous
  handler is restored on exit). Several processes: `jax.distributed.initialize` started the
  coordination service's preemption sync manager, whose own SIGTERM handler reports a notice on
  any process to every process; each step asks it, locally, whether this step is the agreed
  stop step (`multihost_utils.reached_preemption_sync_point`): no cross-host collective per
  step. (With the preemption service switched off, `jax_enable_preemption_service=False`, the
  processes compare their flags with a collective every step instead.)
  """

  def __init__(self):
    self.signum = None
    self._previous = None

  @staticmethod
  def _sync_manager():
    try:  # jax keeps it in a private module
      from jax._src import distributed  # pylint: disable=g-import-not-at-top,import-outside-toplevel
      state = distributed.global_state
      return state.preemption_sync_manager if state.client is not None else None
    except (ImportError, AttributeError):
      return None

  def __enter__(self):
    # Leave SIGTERM to the sync manager when there is one: a Python handler would replace it.
    if (self._sync_manager() is None
        and threading.current_thread() is threading.main_thread()):
      self._previous = signal.signal(signal.SIGTERM, self._handle)
    return self

  def _handle(self, signum, frame):
    del frame
    self.signum = signum

  def requested(self, step):
    """Whether to stop after `step` (all processes must call it at every step)."""
    if self._sync_manager() is not None:
      return multihost_utils.reached_preemption_sync_point(step)
    flag = self.signum is not None
    if jax.process_count() > 1:
      flag = bool(np.max(multihost_utils.process_allgather(np.int32(flag))))
    return flag

  def __exit__(self, *exc):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)


def _use_split_step(config) -> bool:
  """`config.split_step`, where None means: split where the executable cache keeps the step
  (one process, persistent compilation cache on), since the split compiles ~1.4x longer cold
  and only a warm start gains (docs/benchmarks_split_step.md)."""
  split = config.get("split_step")
  return executable_cache.folder() is not None if split is None else bool(split)


class _StepCache:
  """The jitted train step per stage, compiled per batch layout (stage, image bucket, ...) when
  first met, with its compile time logged."""

  def __init__(self, run, config):
    self._run, self._config = run, config
    self._jitted, self._compiled = {}, {}

  def __call__(self, state, batch, step):
    method, stage = self._run.method, self._run.method.stage_at(step - 1)
    if stage not in self._jitted:
      config = self._config
      options = dict(ema_momentum=config.get("ema_momentum"), ema_subtree=method.ema_subtree,
                     grad_split_every=config.log_every if config.get("log_grad_split") else 0)
      run, loss_fn = self._run, method.loss_fn(stage)
      one_executable = lambda: make_train_step(loss_fn, run.tx, run.schedule, run.mesh,
                                               run.shardings, **options)
      if _use_split_step(config):  # matching outside jit: two executables, no host callback
        # The executables are also kept under a key computed without tracing (what the
        # traced step depends on besides the arguments' layout and the code): a warm start
        # loads them without tracing and lowering the step. Only for a `state.setup` run,
        # whose method, optimiser and schedule are built from the config alone.
        cache_key = None
        if isinstance(run, state_lib.RunSetup):
          cache_key = (config.to_json_best_effort(sort_keys=True), repr(run.data_info), stage,
                       {k: repr(v) for k, v in options.items() if k != "ema_subtree"})
        self._jitted[stage] = split_step.SplitStep(
            loss_fn, lambda loss: train_step_fn(loss, run.tx, run.schedule, **options),
            run.mesh, run.shardings, fallback=one_executable, cache_key=cache_key)
      else:
        self._jitted[stage] = one_executable()
    layout = (stage, tuple((x.shape, x.dtype) for x in jax.tree.leaves(batch)),
              jax.tree.structure(batch))
    if layout not in self._compiled:
      logging.info("Compiling the train step%s for %s (the first step waits for it) ...",
                   f" of stage {stage}" if stage != 1 else "", _describe_images(batch))
      start = time.perf_counter()
      self._compiled[layout] = self._jitted[stage].lower(state, batch).compile()
      logging.info("Compiled in %.1f s.", time.perf_counter() - start)
      preflight.check_train_step(self._compiled[layout], self._config)  # before it allocates
      host_runtime.release_free_memory()  # the compiler's garbage, before the step's memory
    return self._compiled[layout](state, batch)


def _evaluated_at(workdir, step):
  """Whether WORKDIR/eval_metrics.json holds the evaluation of `step`."""
  try:
    return json.loads((fs.path(workdir) / "eval_metrics.json").read_text()).get("step") == step
  except (OSError, ValueError):
    return False


def _check_finite(metrics, step, last_checked):
  for key in ("loss", "grad_norm"):
    if not np.isfinite(metrics[key]):
      raise NonFiniteLossError(
          f"{key} is {metrics[key]} at step {step} (first non-finite between steps "
          f"{last_checked + 1} and {step}); no checkpoint was written after step {last_checked}.")


def train_and_evaluate(config, workdir, *, on_mismatch="error"):
  """Train `config.total_steps` steps (resuming from the workdir), evaluate, return metrics.

  `on_mismatch`: what to do with checkpoints that do not fit the config ("error" or "fresh",
  see `state.setup`). SIGTERM saves a checkpoint of the current step and raises `Preempted`.
  `config` is finalised (`config_lib.finalize`: derived classes, sizes, schedule and name);
  config.json records it.

  One job per workdir: process 0 holds WORKDIR/run.lock meanwhile (`workdir_lock`; a second job
  raises `workdir_lock.WorkdirLockedError`). Before the first step the compiled step's memory is
  checked against the device (`preflight`; `preflight.DoesNotFitError`). With several processes
  a SIGTERM on any of them stops all at the same step (the preemption sync point), and a lost
  or failed process stops the others in one line (`peer_watch`).
  """
  config_lib.require_finalized(config, "train.train_and_evaluate")
  sharding.maybe_initialize_distributed(config)
  workdir = workdir or default_workdir(config)
  fs.path(workdir).mkdir(parents=True, exist_ok=True)
  # Several processes: a lost or failed process stops the others (peer_watch); one job per
  # workdir (process 0 holds the lock).
  with (peer_watch.PeerWatch.from_config(config, expected=(Preempted,)),
        workdir_lock.WorkdirLock(workdir)):
    return _train_locked(config, workdir, on_mismatch)


def _train_locked(config, workdir, on_mismatch):
  """`train_and_evaluate`'s body, run while this job holds the workdir's lock."""
  run = state_lib.setup(config, workdir, on_mismatch=on_mismatch)
  if jax.process_index() == 0:  # after the restore: a mismatch error can name changed fields
    (fs.path(workdir) / "config.json").write_text(config.to_json_best_effort(indent=1))
    # What Detector.load / export need (classes, eval preprocessing, postprocess, params).
    inference_spec.write(workdir, inference_spec.from_run(config, run.data_info,
                                                          run.state.params,
                                                          run.state.ema_params))
  method, mesh, state, ckpt = run.method, run.mesh, run.state, run.checkpointer
  train_step = _StepCache(run, config)
  predictor = evaluate.Predictor(method, mesh)

  def evaluate_at(step, loss_share=None, share_title=""):
    return evaluate.run_evaluation(
        predictor, evaluate.eval_params(config, state), state.model_state, step, workdir,
        run.data_info, evaluate.eval_batches(config), loss_share=loss_share,
        share_title=share_title,
        title=f"{config.get('name', '')} step {step}")

  total = int(config.total_steps)
  start = int(jax.device_get(state.step))
  groups = optim.group_lr_multipliers(config.optimizer)
  log = metrics_log.MetricsLog(workdir, total_steps=total, start_step=start,
                               hparams=metrics_log.flat_hparams(config),
                               lr_multipliers={g: m for g, m in groups.items() if m})
  batches = method.train_batches(config.data, seed=config.seed, start_step=start,
                                 process_index=jax.process_index(),
                                 process_count=jax.process_count())
  last_checked, last_metrics, eval_metrics = start, None, None
  start_time = time.perf_counter()
  recent = collections.deque(maxlen=10)  # metrics of the last logged steps (eval plot's loss share)
  # With config.log_grad_split, also the share of steps whose gradient was clipped (fetches
  # the gradient norm every step: a diagnostic mode).
  clip_norm = float(config.optimizer.get("clip_norm") or 0.0)
  clipped = [] if config.get("log_grad_split") and clip_norm > 0 else None
  meta = {"config": config.get("name", "")}
  try:
    with jax.set_mesh(mesh), _StopSignal() as stop:
      for step in range(start + 1, total + 1):
        state, metrics = train_step(state, sharding.global_batch(next(batches), mesh), step)
        if clipped is not None:
          clipped.append(float(metrics["grad_norm"]) > clip_norm)
        is_log = step % config.log_every == 0 or step == total
        is_ckpt = ((config.checkpoint_every and step % config.checkpoint_every == 0)
                   or step == total)
        is_eval = ((config.get("eval_every") and step % config.eval_every == 0)
                   or (step == total and config.get("eval_at_end", True)))
        if is_log or is_ckpt or is_eval:
          last_metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
          _check_finite(last_metrics, step, last_checked)
          last_checked = step
          recent.append(last_metrics)
          if is_log:
            if clipped:
              last_metrics["clip_fraction"] = float(np.mean(clipped))
              clipped.clear()
            log.write(step, last_metrics, images_per_step=method.images_per_step)
          if is_ckpt:
            ckpt.maybe_save(step, state, {**meta, "step": step}, force=True)
        if is_eval:
          share = evaluate.box_loss_share(recent)
          eval_metrics = evaluate_at(step, share, f"last {len(recent)} logged steps")
          log.write_eval(step, eval_metrics, loss_share=share)
        if step < total and stop.requested(step):
          _check_finite({k: float(v) for k, v in jax.device_get(metrics).items()}, step,
                        last_checked)
          ckpt.maybe_save(step, state, {**meta, "step": step}, force=True)
          ckpt.wait()
          raise Preempted(f"stopped by SIGTERM after step {step}; checkpoint {step} saved in "
                          f"{ckpt.directory}: rerun the same command to continue")
      if (eval_metrics is None and start == total and total > 0
          and config.get("eval_at_end", True) and not _evaluated_at(workdir, total)):
        # A finished run whose final evaluation did not complete (killed during it).
        logging.info("Step %d is trained but not evaluated: evaluating it now.", total)
        eval_metrics = evaluate_at(total)
        log.write_eval(total, eval_metrics)
  finally:
    # Also on errors (a NaN loss): let pending async saves of good steps complete.
    ckpt.close()
    log.close()
  elapsed = time.perf_counter() - start_time
  logging.info("Trained steps %d-%d in %.1f min (compile and evaluation included).", start + 1,
               total, elapsed / 60)
  if jax.process_index() == 0 and eval_metrics is not None:
    print(f"\nEvaluation ({run.data_info['val_gt_json']}):\n"
          f"{evaluate.format_metrics_table(eval_metrics)}\n\nFiles in {fs.path(workdir)}: "
          "metrics.jsonl, eval_metrics.json, detections_<step>.json, per_size_<step>.png, "
          "checkpoints/")
  return eval_metrics
