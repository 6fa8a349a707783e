"""The train state and how a run gets one: built from the config, restored from the workdir.

Shared by the training loop (`train.py`) and inference (`evaluate.py`), so neither imports the
other. `TrainState` is one pytree (checkpointed whole): params, frozen model variables,
optimiser state, step, a raw PRNG key, and optional EMA ("teacher") params.
"""
from typing import Any, NamedTuple, Optional

from absl import logging
import flax
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from sized_detr_jax import checkpointing
from sized_detr_jax import config_lib
from sized_detr_jax import convert_torch
from sized_detr_jax import executable_cache
from sized_detr_jax import fs
from sized_detr_jax import method as method_lib
from sized_detr_jax import methods
from sized_detr_jax import optim
from sized_detr_jax import sharding
from sized_detr_jax.data import pipeline


@flax.struct.dataclass
class TrainState:
  """Everything a step reads and writes; a pytree (checkpointed whole)."""
  step: jax.Array                 # [] int32
  params: Any                     # trainable params
  model_state: Any                # other model variables (e.g. frozen BN statistics), constant
  opt_state: Any
  rng: jax.Array                  # [2] uint32 raw key; per-step keys are fold_in(rng, step)
  ema_params: Optional[Any] = None  # EMA ("teacher") params (Method.ema_subtree), or None


def ema_update(ema_params, params, step, momentum):
  """Semi-DETR's EMA: m = min(momentum, step / (step + 1)); ema = m * ema + (1 - m) * params.

  At step 0 m is 0, so the teacher starts as a copy of the student.
  """
  step = jnp.asarray(step, jnp.float32)
  m = jnp.minimum(momentum, step / (step + 1.0))
  return jax.tree.map(lambda e, p: m * e + (1.0 - m) * p, ema_params, params)


def _optimizer(method, config, params):
  """(tx, schedule) of the run, from the params' structure (tracers or shapes are fine)."""
  return optim.make_optimizer(params, method.param_labels(params), config.optimizer)


def _make_init_fn(method, config, example_batch, built):
  """rng -> TrainState at step 0. The optimiser `(tx, schedule)` is built from the params on the
  first trace and appended to `built`."""

  def init_fn(rng):
    init_rng, state_rng = jax.random.split(rng)
    variables = method.model.init({"params": init_rng, "dropout": init_rng, "dn": init_rng},
                                  example_batch["image"], example_batch["pixel_mask"],
                                  train=False)
    variables = flax.core.unfreeze(variables)
    params = variables.pop("params")
    ema = method.ema_subtree(params) if config.get("ema_momentum") else None
    if not built:
      built.append(_optimizer(method, config, params))
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, model_state=variables,
                      opt_state=built[0][0].init(params), rng=state_rng, ema_params=ema)

  return init_fn


def init_state(method, config, example_batch, mesh, cache_key=None):
  """The TrainState at step 0, initialised directly with replicated shardings (never on one
  device first), and the run's optimiser.

  Args:
    method: the built method (`methods.build(config)`).
    config: the finalised config (seed, ema_momentum, optimizer).
    example_batch: {"image": [1, H, W, 3] float32, "pixel_mask": [1, H, W] bool}; the params
      do not depend on its size.
    mesh: the device mesh.
    cache_key: None, or what determines the init besides the example's layout (the trainer
      gives the finalised config and the mesh): the compiled init is then kept in
      `executable_cache` and a warm start loads it without tracing the model.

  Returns:
    (state, state shardings pytree, tx, schedule).
  """
  built = []
  init_fn = _make_init_fn(method, config, example_batch, built)
  rng = jax.random.PRNGKey(config.seed)
  replicated = sharding.replicated(mesh)
  # One sharding for every output: traced once.
  init = executable_cache.compiled("init_state", cache_key,
                                   jax.jit(init_fn, out_shardings=replicated), rng)
  state = init(rng)
  tx, schedule = built[0] if built else _optimizer(method, config, state.params)
  return state, jax.tree.map(lambda _: replicated, state), tx, schedule


def abstract_state(method, config, example_batch, mesh):
  """`init_state` in shapes only: nothing is computed or compiled.

  Returns:
    (state with `jax.ShapeDtypeStruct` leaves carrying their replicated sharding, shardings,
    tx, schedule).
  """
  replicated = sharding.replicated(mesh)
  built = []
  shapes = jax.eval_shape(_make_init_fn(method, config, example_batch, built),
                          jax.random.PRNGKey(config.seed))
  state = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=replicated),
                       shapes)
  return state, jax.tree.map(lambda _: replicated, state), *built[0]


def _teacher_copy(state, params, ema_subtree):
  """The EMA teacher restarted from `params` as buffers of its own (the train step donates the
  state: a buffer shared by params and ema_params would be donated twice), or None."""
  if state.ema_params is None:
    return None
  return jax.tree.map(jnp.copy, ema_subtree(params))


def state_with_pretrained(state, shardings, model_config, ema_subtree):
  """Fresh run: converted weights (convert_torch .npz) into the detector's params (and the EMA
  copy). Methods that wrap a DINO keep it under params["dino"]."""
  params = jax.device_get(state.params)
  if "dino" in params:
    params = {**params, "dino": convert_torch.merge_pretrained_params(params["dino"], model_config)}
  else:
    params = convert_torch.merge_pretrained_params(params, model_config)
  params = jax.device_put(params, shardings.params)
  logging.info("Loaded pretrained weights: backbone=%r full=%r",
               model_config.get("pretrained_backbone"), model_config.get("pretrained"))
  return state.replace(params=params, ema_params=_teacher_copy(state, params, ema_subtree))


def _detector(params):
  """The DINO inside a params tree: params["dino"] for methods that wrap one, else params."""
  return params["dino"] if isinstance(params, dict) and "dino" in params else params


def newest_step_dir(path):
  """`path` (a workdir, its checkpoints/ folder, or one checkpoints/<step>/) -> the newest
  complete step folder; FileNotFoundError naming `path` when there is none."""
  path = fs.path(path)
  if (path / "state").is_dir():
    return str(path)
  folder = path / "checkpoints" if (path / "checkpoints").is_dir() else path
  steps = sorted(int(p.name) for p in (folder.iterdir() if folder.is_dir() else ())
                 if p.name.isdigit() and (p / "state").is_dir())
  if not steps:
    raise FileNotFoundError(f"init_from={path}: no checkpoint step folder found")
  return str(folder / str(steps[-1]))


def load_init_from(state, shardings, path, ema_subtree):
  """Fresh run initialised from another run's trained detector (e.g. a supervised burn-in
  before Semi-DETR): the newest checkpoint under `path` gives the DINO params (its
  params["dino"] when it wraps one), copied into this state's DINO params and the EMA teacher.
  The optimiser state and step stay fresh.

  Raises:
    ValueError: the two detectors differ (first differing param path and shapes).
  """
  step_dir = newest_step_dir(path)
  with ocp.StandardCheckpointer() as ckptr:
    source = _detector(ckptr.restore(fs.path(step_dir) / "state")["params"])
  params = jax.device_get(state.params)
  target = _detector(params)
  mismatch = checkpointing.tree_mismatch(checkpointing.leaf_shapes(source),
                                         checkpointing.leaf_shapes(target))
  if mismatch is not None:
    raise ValueError(f"init_from={step_dir}: its detector does not fit this config's: "
                     + mismatch.replace("checkpoint", "init_from checkpoint"))
  loaded = jax.tree.map(lambda t, v: np.asarray(v, t.dtype), target, source)
  params = {**params, "dino": loaded} if isinstance(params, dict) and "dino" in params else loaded
  params = jax.device_put(params, shardings.params)
  logging.info("Initialised the detector from %s.", step_dir)
  return state.replace(params=params, ema_params=_teacher_copy(state, params, ema_subtree))


class RunSetup(NamedTuple):
  """What a run (training or inference) works with."""
  mesh: Any                       # jax.sharding.Mesh, axis DATA_AXIS
  data_info: dict                 # pipeline.dataset_info
  method: method_lib.Method
  tx: Any                         # optax.GradientTransformation
  schedule: Any                   # step -> lr
  state: TrainState               # restored from the workdir, or freshly initialised
  shardings: Any                  # TrainState of NamedShardings
  checkpointer: checkpointing.Checkpointer
  restored: checkpointing.RestoreResult  # which step was restored and why (describe())
  config: Any                     # the finalised config (config_lib.finalize) the run uses


def setup(config, workdir, *, on_mismatch="error") -> RunSetup:
  """Mesh, data info, method, optimiser and state (restored when the workdir has a checkpoint).

  Args:
    config: the experiment config, finalised (`config_lib.finalize`; `RunSetup.config`).
    workdir: the run's folder (its checkpoints/ is created if missing).
    on_mismatch: "error": checkpoints that do not fit this config raise
      `checkpointing.CheckpointMismatchError` naming the first differing param and the changed
      config fields; "fresh": they are moved aside and the run starts from step 0.
  """
  config_lib.require_finalized(config, "state.setup")
  mesh = sharding.make_mesh(config.get("num_devices"))
  data_info = pipeline.dataset_info(config.data)
  if config.model.num_classes != data_info["num_classes"]:
    raise ValueError(f"config.model.num_classes={config.model.num_classes} but the data has "
                     f"{data_info['num_classes']} categories ({data_info['category_names'][:5]}...)")
  method = methods.build(config)
  height, width = data_info["buckets"][0]
  example = {"image": jnp.zeros((1, height, width, 3), jnp.float32),
             "pixel_mask": jnp.ones((1, height, width), bool)}
  # The compiled init is kept in the executable cache under the config (the method, model and
  # optimiser are built from it alone): a warm start loads it without tracing the model, and
  # builds the optimiser from the initialised params.
  init_key = (config.to_json_best_effort(sort_keys=True), repr(mesh), mesh.device_ids.tolist(),
              executable_cache.arguments_layout(example))
  state, shardings, tx, schedule = init_state(method, config, example, mesh, cache_key=init_key)
  ckpt = checkpointing.Checkpointer(workdir, every=config.checkpoint_every,
                                    keep=config.get("keep_checkpoints", 3))
  restored = ckpt.restore(checkpointing.abstract_like(state), on_mismatch=on_mismatch,
                          config=config)
  if restored.skipped or restored.superseded:
    logging.warning("Restored %s", restored.describe())
  if restored.step is not None:
    state = restored.state
    logging.info("Resumed from %s at step %d.", ckpt.directory, restored.step)
  elif config.get("init_from"):
    state = load_init_from(state, shardings, config.init_from, method.ema_subtree)
  elif config.model.get("pretrained") or config.model.get("pretrained_backbone"):
    state = state_with_pretrained(state, shardings, config.model, method.ema_subtree)
  return RunSetup(mesh, data_info, method, tx, schedule, state, shardings, ckpt, restored,
                  config)
