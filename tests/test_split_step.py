"""The split train step (`config.split_step=True`, split_step.py) against the one-executable
step with the host callback: same losses, metrics and updated state after a few steps, for
DINO, Co-DINO and Semi-DETR (both stages) on their smoke configs, and neither executable calls
back to the host.
"""
import json
import os
import re
import types

import jax
import jax.numpy as jnp
from absl.testing import absltest
import ml_collections
import numpy as np
import optax
import pytest
from scipy import optimize

from sized_detr_jax import config_lib
from sized_detr_jax import executable_cache
from sized_detr_jax import matching
from sized_detr_jax import sharding
from sized_detr_jax import split_step
from sized_detr_jax import state as state_lib
from sized_detr_jax import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 2


def _setup(tmp_path_factory, config_spec, **overrides):
  name, arg = config_spec.split(":")
  config = config_lib.load_config(os.path.join(ROOT, "experiments", f"{name}.py"), arg)
  base = tmp_path_factory.mktemp(name)
  config.data.root = str(base / "data")
  config.update(dict(num_devices=1, **overrides))
  return state_lib.setup(config_lib.finalize(config), str(base / "run"))


def _run_both(run, stage=None, steps=STEPS):
  """`steps` steps of each step kind from the same state and batches.

  Returns (one-executable (metrics list, state), split (metrics list, state), compiled split).
  """
  method = run.method
  stage = method.stage_at(0) if stage is None else stage
  config = run.config
  options = dict(ema_momentum=config.get("ema_momentum"), ema_subtree=method.ema_subtree)
  loss_fn = method.loss_fn(stage)
  batches = method.train_batches(config.data, seed=config.seed, start_step=0, process_index=0,
                                 process_count=1)
  batches = [sharding.global_batch(next(batches), run.mesh) for _ in range(steps)]
  results = []
  with jax.set_mesh(run.mesh):
    fused = train.make_train_step(loss_fn, run.tx, run.schedule, run.mesh, run.shardings,
                                  **options)
    split = split_step.SplitStep(
        loss_fn, lambda loss: train.train_step_fn(loss, run.tx, run.schedule, **options),
        run.mesh, run.shardings)
    compiled = None
    for step_fn in (fused, split):
      state = jax.tree.map(jnp.copy, run.state)
      compiled = step_fn.lower(state, batches[0]).compile()
      metrics = []
      for batch in batches:
        state, m = compiled(state, batch)
        metrics.append(jax.device_get(m))
      results.append((metrics, jax.device_get(state)))
  return results[0], results[1], compiled


def _assert_same(fused, split):
  (fused_metrics, fused_state), (split_metrics, split_state) = fused, split
  for step, (a, b) in enumerate(zip(fused_metrics, split_metrics)):
    assert set(a) == set(b)
    for key in a:
      np.testing.assert_allclose(b[key], a[key], rtol=1e-6, atol=1e-6,
                                 err_msg=f"step {step + 1}: {key}")
  flat_a = jax.tree_util.tree_leaves_with_path(fused_state)
  flat_b = jax.tree.leaves(split_state)
  assert len(flat_a) == len(flat_b)
  for (path, a), b in zip(flat_a, flat_b):
    name = jax.tree_util.keystr(path)
    # The optimiser's moments are running sums of the gradients (and their squares): 1e-6. The
    # params take AdamW steps of ~lr (1e-3) whatever the gradient's size, so a weight whose
    # gradient is ~0 can move by ~1e-6 on float rounding that differs between the two compiled
    # forms: 1e-5 (1% of one step) there and in their EMA.
    tol = 1e-5 if name.startswith((".params", ".ema_params")) else 1e-6
    np.testing.assert_allclose(np.asarray(b, np.float64), np.asarray(a, np.float64), rtol=tol,
                               atol=tol, err_msg=name)


# A host callback in HLO text: a custom call to JAX's Python callback handler (the word alone
# also appears in source-location metadata, e.g. a test's name).
_CALLBACK_CALL = re.compile(r'custom_call_target="[^"]*callback')


def _assert_no_callback(compiled):
  for executable in (compiled.forward, compiled.update):
    assert not _CALLBACK_CALL.search(executable.as_text())


# ------------------------------------------------------------------------------ a toy loss
# Q free 2-d "boxes" matched to each image's ground truth on the L1 cost; loss: mean squared
# distance of the matched pairs. Reference: scipy's assignment and the analytic gradient.
_Q, _LR = 7, 0.1


def _toy_loss(prune):
  def loss_fn(params, state, batch, rng):
    del state, rng
    pred = jnp.broadcast_to(params["boxes"], (batch["gt"].shape[0],) + params["boxes"].shape)
    cost = jnp.sum(jnp.abs(pred[:, :, None] - batch["gt"][:, None]), -1)  # [B, Q, G]
    match = matching.hungarian_matching(cost, batch["valid"], prune=prune)  # [B, G]
    picked = jnp.take_along_axis(pred, jnp.maximum(match, 0)[..., None], axis=1)
    ok = batch["valid"] & (match >= 0)
    loss = jnp.sum(jnp.where(ok[..., None], (picked - batch["gt"])**2, 0.0)) / jnp.sum(ok)
    return loss, {"loss": loss}
  return loss_fn


def _toy_reference(boxes, gt, valid):
  """float64 numpy: (loss, gradient) of `_toy_loss` with scipy's assignment."""
  grad, total, count = np.zeros_like(boxes), 0.0, 0
  for g, v in zip(gt, valid):
    cost = np.abs(boxes[:, None] - g[None, v]).sum(-1)
    rows, cols = optimize.linear_sum_assignment(cost)
    diff = boxes[rows] - g[v][cols]
    total, count = total + np.sum(diff**2), count + len(rows)
    np.add.at(grad, rows, 2 * diff)
  return total / count, grad / count


def _toy_state(tx, boxes):
  params = {"boxes": jnp.asarray(boxes, jnp.float32)}
  return state_lib.TrainState(step=jnp.zeros((), jnp.int32), params=params, model_state={},
                              opt_state=tx.init(params), rng=jax.random.PRNGKey(0))


@pytest.mark.parametrize("prune", [False, True])
def test_trainer_split_step_matches_scipy_and_the_analytic_gradient(prune):
  """Through the trainer's step cache with `split_step=True`: three SGD steps of the toy loss
  give scipy's matching loss and the analytic update (prune: the candidate problems)."""
  rng = np.random.default_rng(0)
  gt = rng.uniform(0, 1, (4, 3, 2))
  valid = np.array([[1, 1, 1], [1, 0, 1], [0, 0, 0], [1, 1, 0]], bool)
  boxes = rng.uniform(0, 1, (_Q, 2))
  mesh = sharding.make_mesh(2)
  tx = optax.sgd(_LR)
  state = _toy_state(tx, boxes)
  method = types.SimpleNamespace(stage_at=lambda step: 1, loss_fn=lambda stage: _toy_loss(prune),
                                 ema_subtree=lambda p: p)
  run = types.SimpleNamespace(method=method, tx=tx, schedule=lambda s: _LR, mesh=mesh,
                              shardings=jax.tree.map(lambda _: sharding.replicated(mesh), state))
  config = ml_collections.ConfigDict(dict(split_step=True, log_every=1))
  cache = train._StepCache(run, config)  # pylint: disable=protected-access
  batch = sharding.global_batch({"gt": gt.astype(np.float32), "valid": valid}, mesh)
  with jax.set_mesh(mesh):
    for step in (1, 2, 3):
      state, metrics = cache(state, batch, step)
      loss, grad = _toy_reference(boxes, gt, valid)
      boxes = boxes - _LR * grad
      np.testing.assert_allclose(float(metrics["loss"]), loss, rtol=1e-5)
      np.testing.assert_allclose(np.asarray(state.params["boxes"]), boxes, rtol=1e-5, atol=1e-6)
  compiled, = cache._compiled.values()  # pylint: disable=protected-access
  assert isinstance(compiled, split_step.CompiledSplitStep)
  _assert_no_callback(compiled)
  # The memory preflight (run by the cache) reads both executables' footprint.
  forward, update = compiled.forward.memory_analysis(), compiled.update.memory_analysis()
  need = compiled.memory_analysis()
  assert need.argument_size_in_bytes == forward.argument_size_in_bytes
  assert need.output_size_in_bytes == forward.output_size_in_bytes
  assert need.temp_size_in_bytes == max(
      forward.temp_size_in_bytes, update.output_size_in_bytes - update.alias_size_in_bytes
      + update.temp_size_in_bytes)


def test_dependent_matchings_fall_back_to_the_callback_step_or_are_one_clear_error():
  """A cost computed from another matching's result cannot be solved between the executables:
  with a fallback (the trainer's) the one-executable step runs, the reason logged; without,
  one error."""
  def loss_fn(params, state, batch, rng):
    del state, rng
    cost = params["c"] * batch["x"]  # [B, Q, G]
    first = matching.hungarian_matching(cost, batch["valid"])
    second = matching.hungarian_matching(cost + first[:, None, :], batch["valid"])
    return jnp.sum(second * params["c"].sum()), {"loss": jnp.sum(params["c"])}

  mesh = sharding.make_mesh(1)
  tx = optax.sgd(0.1)
  params = {"c": jnp.ones((1, 3, 2))}
  state = state_lib.TrainState(step=jnp.zeros((), jnp.int32), params=params, model_state={},
                               opt_state=tx.init(params), rng=jax.random.PRNGKey(0))
  shardings = jax.tree.map(lambda _: sharding.replicated(mesh), state)
  make_step = lambda loss: train.train_step_fn(loss, tx, lambda s: 0.1)
  batch = {"x": jnp.ones((2, 3, 2)), "valid": jnp.ones((2, 2), bool)}
  with pytest.raises(ValueError, match="depends on another matching's result"):
    split_step.SplitStep(loss_fn, make_step, mesh, shardings).lower(state, batch)
  fused = lambda: train.make_train_step(loss_fn, tx, lambda s: 0.1, mesh, shardings)
  with absltest.mock.patch.object(split_step.logging, "warning") as warning:
    compiled = split_step.SplitStep(loss_fn, make_step, mesh, shardings,
                                    fallback=fused).lower(state, batch).compile()
  assert "depends on another matching's result" in warning.call_args[0][1]
  assert _CALLBACK_CALL.search(compiled.as_text())
  new_state, metrics = compiled(state, batch)
  np.testing.assert_allclose(float(metrics["loss"]), 6.0)  # its metric: sum(c), 3 x 2 ones
  assert int(new_state.step) == 1


def test_a_loss_without_matching_runs_as_one_executable_with_a_fallback_else_split():
  loss_fn = lambda p, state, batch, rng: (jnp.sum((p["w"] - batch["x"])**2),
                                          {"loss": jnp.sum((p["w"] - batch["x"])**2)})
  mesh = sharding.make_mesh(1)
  tx = optax.sgd(0.25)
  params = {"w": jnp.zeros((2,))}
  state = state_lib.TrainState(step=jnp.zeros((), jnp.int32), params=params, model_state={},
                               opt_state=tx.init(params), rng=jax.random.PRNGKey(0))
  shardings = jax.tree.map(lambda _: sharding.replicated(mesh), state)
  make_step = lambda loss: train.train_step_fn(loss, tx, lambda s: 0.25)
  fused = lambda: train.make_train_step(loss_fn, tx, lambda s: 0.25, mesh, shardings)
  batch = {"x": jnp.array([[1.0, 2.0]])}
  for fallback, kind in ((fused, jax.stages.Compiled), (None, split_step.CompiledSplitStep)):
    compiled = split_step.SplitStep(loss_fn, make_step, mesh, shardings,
                                    fallback=fallback).lower(state, batch).compile()
    assert isinstance(compiled, kind)
    new_state, metrics = compiled(jax.tree.map(jnp.copy, state), batch)
    # w <- w - 0.25 * 2 (w - x) = x / 2 from w = 0; loss |x|^2 = 5.
    np.testing.assert_allclose(np.asarray(new_state.params["w"]), [0.5, 1.0])
    np.testing.assert_allclose(float(metrics["loss"]), 5.0)


# ------------------------------------------------------------------- the methods' smoke configs
@pytest.fixture(scope="module")
def dino(tmp_path_factory):
  return _run_both(_setup(tmp_path_factory, "synthetic:smoke"))


@pytest.mark.slow
def test_dino_split_step_equals_the_callback_step(dino):
  fused, split, compiled = dino
  assert fused[0][0]["loss"] > 0 and np.isfinite(fused[0][0]["loss"])
  _assert_same(fused, split)
  _assert_no_callback(compiled)


def test_the_callback_matching_does_call_back():
  """The check of `_assert_no_callback` can fail: the callback matching's text has one."""
  compiled = jax.jit(matching.hungarian_matching).lower(
      jnp.zeros((2, 5, 3)), jnp.ones((2, 3), bool)).compile()
  assert _CALLBACK_CALL.search(compiled.as_text())


@pytest.mark.slow
def test_co_dino_split_step_equals_the_callback_step(tmp_path_factory):
  """The main head's Hungarian matching goes to the host; the auxiliary heads' on-device
  assigners stay inside the executables."""
  fused, split, compiled = _run_both(_setup(tmp_path_factory, "co_dino:smoke"))
  assert any(k.startswith("loss_atss") for k in fused[0][0])
  _assert_same(fused, split)
  _assert_no_callback(compiled)


@pytest.fixture(scope="module")
def semi_run(tmp_path_factory):
  return _setup(tmp_path_factory, "semi_detr:smoke")


@pytest.mark.slow
def test_semi_detr_stage1_split_step_equals_the_callback_step(semi_run):
  """One-to-many stage: the GMM mining's Hungarian matching (pseudo boxes vs the student's
  strong-view decode) is the step's one problem; the consistency queries it chooses are
  decoded in the update executable."""
  method = semi_run.method
  stage = method.stage_at(0)
  fused, split, compiled = _run_both(semi_run, stage)
  assert "loss_consistency" in fused[0][0] and "metric_pseudo_mined" in fused[0][0]
  _assert_same(fused, split)
  _assert_no_callback(compiled)


@pytest.mark.slow
def test_semi_detr_stage2_split_step_equals_the_callback_step(semi_run):
  """One-to-one stage: the supervised and the unsupervised branch's matchings (decoder layers
  and the class-agnostic encoder proposals) are solved between the executables."""
  method = semi_run.method
  stage = method.stage_at(semi_run.config.semi.switch_step)
  fused, split, compiled = _run_both(semi_run, stage)
  _assert_same(fused, split)
  _assert_no_callback(compiled)


# ------------------------------------------------------------------ the executable cache
@pytest.fixture
def compilation_cache(tmp_path):
  """JAX's persistent cache (and so the executable cache beside it) on in a fresh folder."""
  previous = jax.config.jax_compilation_cache_dir
  jax.config.update("jax_compilation_cache_dir", str(tmp_path / "xla"))
  yield tmp_path / "xla" / executable_cache.FOLDER
  jax.config.update("jax_compilation_cache_dir", previous)


def _toy_split(prune, cache_key, mesh, tx, state):
  shardings = jax.tree.map(lambda _: sharding.replicated(mesh), state)
  return split_step.SplitStep(_toy_loss(prune),
                              lambda loss: train.train_step_fn(loss, tx, lambda s: _LR),
                              mesh, shardings, cache_key=cache_key)


def _toy_steps(compiled, state, batch, steps=2):
  losses = []
  for _ in range(steps):
    state, metrics = compiled(state, batch)
    losses.append(float(metrics["loss"]))
  return losses, np.asarray(state.params["boxes"])


def test_the_executable_cache_loads_a_warm_step_without_tracing_and_misses_a_changed_key(
    compilation_cache):
  """A second build with the same key loads both executables from the cache (the loss is never
  traced) and gives scipy's losses and updates; another key (as a changed config gives) or
  another batch layout compiles anew; a corrupt entry is skipped with one warning."""
  rng = np.random.default_rng(1)
  gt = rng.uniform(0, 1, (4, 3, 2)).astype(np.float32)
  valid = np.array([[1, 1, 1], [1, 0, 1], [1, 1, 0], [1, 1, 0]], bool)
  boxes = rng.uniform(0, 1, (_Q, 2))
  mesh, tx = sharding.make_mesh(1), optax.sgd(_LR)
  batch = {"gt": jnp.asarray(gt), "valid": jnp.asarray(valid)}
  # Reference: scipy's matching and the analytic gradient, two SGD steps.
  ref_losses, ref_boxes = [], boxes
  for _ in range(2):
    loss, grad = _toy_reference(ref_boxes, gt, valid)
    ref_losses.append(loss)
    ref_boxes = ref_boxes - _LR * grad

  def build(key, prune=False, b=batch):
    state = _toy_state(tx, boxes)
    return _toy_split(prune, key, mesh, tx, state).lower(state, b), state

  lowered, state = build("config A")
  assert isinstance(lowered, split_step.LoweredSplitStep)  # cold: traced
  cold = _toy_steps(lowered.compile(), state, batch)
  entries = sorted(compilation_cache.iterdir())
  assert len(entries) == 1
  np.testing.assert_allclose(cold[0], ref_losses, rtol=1e-5)
  np.testing.assert_allclose(cold[1], ref_boxes, rtol=1e-5, atol=1e-6)

  # Warm: loaded, the loss never traced (a tracing loss would raise).
  with absltest.mock.patch.object(split_step, "_problem_shapes",
                                  side_effect=AssertionError("traced")):
    lowered, state = build("config A")
    assert isinstance(lowered, split_step._Loaded)  # pylint: disable=protected-access
    warm_compiled = lowered.compile()
    warm = _toy_steps(warm_compiled, state, batch)
  assert warm[0] == cold[0]
  np.testing.assert_array_equal(warm[1], cold[1])
  _assert_no_callback(warm_compiled)

  # A changed key (here: the pruned matching, as another config) misses and compiles.
  lowered, state = build("config B", prune=True)
  assert isinstance(lowered, split_step.LoweredSplitStep)
  pruned = _toy_steps(lowered.compile(), state, batch)
  np.testing.assert_allclose(pruned[0], ref_losses, rtol=1e-5)
  # Another batch layout misses too.
  half = {k: v[:2] for k, v in batch.items()}
  lowered, state = build("config A", b=half)
  assert isinstance(lowered, split_step.LoweredSplitStep)
  lowered.compile()
  assert len(list(compilation_cache.iterdir())) == 3

  # A corrupt entry: one warning, compiled again (and the entry rewritten), same results.
  entries[0].write_bytes(entries[0].read_bytes()[:-100] + b"x" * 100)
  with absltest.mock.patch.object(split_step.logging, "warning") as warning:
    lowered, state = build("config A")
  assert warning.call_count == 1 and "not used" in warning.call_args[0][0]
  assert isinstance(lowered, split_step.LoweredSplitStep)
  again = _toy_steps(lowered.compile(), state, batch)
  assert again[0] == cold[0]
  lowered, state = build("config A")
  assert isinstance(lowered, split_step._Loaded)  # pylint: disable=protected-access


@pytest.mark.slow
def test_an_executable_that_jax_loaded_from_its_own_cache_is_not_kept(compilation_cache):
  """XLA:CPU re-serializes a deserialized executable without some kernels: only a fresh
  compile is kept; the kept one loads and computes numpy's result."""
  previous = jax.config.jax_persistent_cache_min_compile_time_secs
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
  try:
    f = lambda x, y: jnp.sum(jnp.broadcast_to(y[:, None], x.shape) * x + jnp.tanh(x), 0)
    x = np.linspace(-1, 1, 128 * 96, dtype=np.float32).reshape(128, 96)
    y = np.arange(128, dtype=np.float32)
    reference = np.sum(y[:, None] * x + np.tanh(x), 0)
    fresh = executable_cache.compiled("f", "key 1", jax.jit(f), x, y)
    assert len(list(compilation_cache.glob("f-*"))) == 1
    jax.clear_caches()
    from_jax_cache = executable_cache.compiled("f", "key 2", jax.jit(f), x, y)
    assert len(list(compilation_cache.glob("f-*"))) == 1  # not kept
    loaded = executable_cache.compiled("f", "key 1", jax.jit(lambda x, y: 1 / 0), x, y)
    for c in (fresh, from_jax_cache, loaded):
      np.testing.assert_allclose(np.asarray(c(x, y)), reference, rtol=1e-5, atol=1e-4)
  finally:
    jax.config.update("jax_persistent_cache_min_compile_time_secs", previous)


def test_the_executable_cache_key_covers_code_versions_and_arguments(compilation_cache):
  """The key changes with the package source, a library version, XLA_FLAGS, the arguments'
  shapes, dtypes and shardings; it does not need tracing."""
  del compilation_cache
  args = {"a": jnp.zeros((2, 3)), "b": jnp.zeros((4,), jnp.int32)}
  base = executable_cache.key("x", executable_cache.arguments_layout(args))
  assert base == executable_cache.key("x", executable_cache.arguments_layout(args))
  assert base != executable_cache.key("y", executable_cache.arguments_layout(args))
  for changed in ({"a": jnp.zeros((2, 4)), "b": args["b"]},
                  {"a": args["a"], "b": jnp.zeros((4,), jnp.int16)},
                  {"a": args["a"]}):
    assert base != executable_cache.key("x", executable_cache.arguments_layout(changed))
  with absltest.mock.patch.object(executable_cache, "package_source_hash", lambda: "other"):
    assert base != executable_cache.key("x", executable_cache.arguments_layout(args))
  with absltest.mock.patch.object(executable_cache, "_library_versions",
                                  lambda: {"jaxlib": "0.0"}):
    assert base != executable_cache.key("x", executable_cache.arguments_layout(args))
  with absltest.mock.patch.dict(os.environ, {"XLA_FLAGS": "--xla_cpu_foo=1"}):
    assert base != executable_cache.key("x", executable_cache.arguments_layout(args))


def _trained_losses(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [r["loss"] for r in map(json.loads, f) if "loss" in r]


@pytest.mark.slow
def test_a_second_training_start_loads_the_split_step_and_a_changed_config_does_not(
    tmp_path, compilation_cache):
  """train_and_evaluate on the smoke config with the default split_step (None: split, as the
  cache is on), twice with the same config (fresh workdirs): the second start loads the step
  (never traces the loss) and logs the first start's losses; a changed criterion weight misses
  the cache, compiles, and trains to other losses."""
  def config(**criterion):
    c = config_lib.load_config(os.path.join(ROOT, "experiments", "synthetic.py"), "smoke")
    c.data.root = str(tmp_path / "data")
    c.update(dict(total_steps=2, log_every=1, checkpoint_every=0, eval_at_end=False,
                  num_devices=1))
    c.criterion.update(criterion)
    return config_lib.finalize(c)

  train.train_and_evaluate(config(), str(tmp_path / "cold"))
  assert len(list(compilation_cache.glob("split_step-*"))) == 1
  traced = absltest.mock.patch.object(split_step, "_problem_shapes",
                                      side_effect=AssertionError("the warm start traced"))
  with traced:
    train.train_and_evaluate(config(), str(tmp_path / "warm"))
  cold, warm = _trained_losses(str(tmp_path / "cold")), _trained_losses(str(tmp_path / "warm"))
  assert len(cold) == 2 and np.all(np.isfinite(cold))
  assert warm == cold
  changed = config(bbox_loss_coef=2 * config().criterion.bbox_loss_coef)
  with traced, pytest.raises(AssertionError, match="the warm start traced"):
    train.train_and_evaluate(changed, str(tmp_path / "changed_traced"))
  train.train_and_evaluate(changed, str(tmp_path / "changed"))
  changed_losses = _trained_losses(str(tmp_path / "changed"))
  assert changed_losses[0] != cold[0]
  # Its compile may be served by JAX's own cache (the forward is the same program), which is
  # then not kept (XLA:CPU cannot re-serialize it whole): a further start runs all the same.
  train.train_and_evaluate(changed, str(tmp_path / "changed_again"))
  assert _trained_losses(str(tmp_path / "changed_again")) == changed_losses


def test_split_step_default_follows_the_executable_cache(tmp_path):
  """split_step None splits exactly where the executable cache is on; True / False force it."""
  use = train._use_split_step  # pylint: disable=protected-access
  config = config_lib.load_config(os.path.join(ROOT, "experiments", "synthetic.py"), "smoke")
  assert config.split_step is None
  previous = jax.config.jax_compilation_cache_dir
  try:
    jax.config.update("jax_compilation_cache_dir", None)
    assert not use(config)
    jax.config.update("jax_compilation_cache_dir", str(tmp_path / "xla"))
    assert use(config)
    for forced in (True, False):
      config.split_step = forced
      assert use(config) is forced
  finally:
    jax.config.update("jax_compilation_cache_dir", previous)
