"""Memory preflight (sized_detr_jax/preflight.py): the compiled step's footprint against the
device, checked before the first step; over it one line with both figures and the knobs, a
tight fit warns. The machine's RAM is patched to a small figure rather than exhausted."""
import types

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from sized_detr_jax import config_lib
from sized_detr_jax import preflight
from sized_detr_jax import sharding
from sized_detr_jax import state as state_lib
from sized_detr_jax import train


@pytest.fixture(scope="module")
def toy():
  """A _StepCache over a 1-device mesh, its first state and batch, and the compiled step."""
  mesh = sharding.make_mesh(1)
  params = {"w": jnp.ones((128, 128))}
  loss_fn = lambda p, state, batch, rng: (jnp.mean(batch["image"] @ p["w"]),
                                          {"loss": jnp.mean(batch["image"] @ p["w"])})
  method = types.SimpleNamespace(stage_at=lambda step: 1, loss_fn=lambda stage: loss_fn,
                                 ema_subtree=lambda p: p)
  tx = optax.sgd(0.1)
  shardings = None
  state = state_lib.TrainState(step=jnp.zeros((), jnp.int32), params=params, model_state={},
                               opt_state=tx.init(params), rng=jax.random.PRNGKey(0))
  shardings = jax.tree.map(lambda _: sharding.replicated(mesh), state)
  run = types.SimpleNamespace(method=method, tx=tx, schedule=lambda s: 0.1, mesh=mesh,
                              shardings=shardings)
  config = config_lib.load_config("synthetic", "smoke")
  batch = {"image": jnp.ones((2, 64, 128))}
  step = train.make_train_step(loss_fn, tx, lambda s: 0.1, mesh, shardings)
  compiled = step.lower(state, batch).compile()
  return dict(run=run, config=config, state=state, batch=batch, compiled=compiled)


def _fresh_state(toy):
  return jax.tree.map(jnp.copy, toy["state"])  # the step donates its state


def test_need_is_the_compiled_footprint(toy):
  """Arguments are the state and the batch, byte for byte; donated outputs are not counted
  twice."""
  stats = toy["compiled"].memory_analysis()
  arg_bytes = sum(np.asarray(x).nbytes for x in jax.tree.leaves((toy["state"], toy["batch"])))
  assert stats.argument_size_in_bytes == arg_bytes
  fit = preflight.step_fit(toy["compiled"], jax.local_devices()[:1])
  assert fit.need == (stats.argument_size_in_bytes + stats.output_size_in_bytes
                      - stats.alias_size_in_bytes + stats.temp_size_in_bytes)
  assert stats.alias_size_in_bytes >= 128 * 128 * 4  # the donated params are written in place
  # Four CPU devices share the RAM: four times the need.
  four = preflight.step_fit(toy["compiled"], jax.local_devices()[:4])
  assert four.need == 4 * fit.need and "x 4 CPU devices" in four.need_text


def test_over_the_machine_fails_in_one_line_before_the_step(toy, monkeypatch):
  monkeypatch.setattr(preflight, "available_host_bytes", lambda: 1000)
  cache = train._StepCache(toy["run"], toy["config"])  # pylint: disable=protected-access
  with pytest.raises(preflight.DoesNotFitError) as e:
    cache(_fresh_state(toy), toy["batch"], 1)
  message = str(e.value)
  fit = preflight.step_fit(toy["compiled"], jax.local_devices()[:1])
  resident = toy["compiled"].memory_analysis().argument_size_in_bytes
  assert "\n" not in message
  assert f"needs {preflight.format_bytes(fit.need)} of RAM" in message
  assert f"there is {preflight.format_bytes(1000 + resident)} (available RAM 1000 B" in message
  for knob in ("data.batch_size=4", "data.size=192", "model.remat=False", "coco_custom:cpu"):
    assert knob in message, knob


def test_tight_fit_warns_and_an_ample_one_does_not(toy, monkeypatch, caplog):
  fit = preflight.step_fit(toy["compiled"], jax.local_devices()[:1])
  resident = toy["compiled"].memory_analysis().argument_size_in_bytes
  for available, warned in ((int(fit.need / 0.95) - resident, True), (100 * fit.need, False)):
    monkeypatch.setattr(preflight, "available_host_bytes", lambda a=available: a)
    caplog.clear()
    with caplog.at_level("INFO"):
      result = preflight.check_train_step(toy["compiled"], toy["config"],
                                          jax.local_devices()[:1])
    tight = [r for r in caplog.records if "Tight memory" in r.getMessage()]
    assert bool(tight) == warned, (available, result)
  # And the cache runs the step when it fits.
  cache = train._StepCache(toy["run"], toy["config"])  # pylint: disable=protected-access
  state, metrics = cache(_fresh_state(toy), toy["batch"], 1)
  assert np.isfinite(float(metrics["loss"])) and int(state.step) == 1


def test_accelerator_memory_is_the_allocator_limit_per_device(toy):
  fit = preflight.step_fit(toy["compiled"], jax.local_devices()[:1])
  gpus = [types.SimpleNamespace(platform="gpu", device_kind="H100",
                                memory_stats=lambda v=v: {"bytes_limit": v})
          for v in (fit.need + 10, fit.need - 1)]
  per_device = preflight.step_fit(toy["compiled"], gpus)
  assert per_device.need == fit.need and per_device.capacity == fit.need - 1  # the smallest
  with pytest.raises(preflight.DoesNotFitError, match=r"per device .* per H100"):
    preflight.check_train_step(toy["compiled"], toy["config"], gpus)
  preflight.check_train_step(toy["compiled"], toy["config"], gpus[:1])  # fits: no error


def test_switch_and_unknown_capacity_skip(toy, monkeypatch):
  monkeypatch.setattr(preflight, "available_host_bytes", lambda: 1000)
  monkeypatch.setenv(preflight.SWITCH, "0")
  assert preflight.check_train_step(toy["compiled"], toy["config"]).capacity is None
  monkeypatch.delenv(preflight.SWITCH)
  monkeypatch.setattr(preflight, "available_host_bytes", lambda: None)
  assert preflight.check_train_step(toy["compiled"], toy["config"]).capacity is None


def test_meminfo_reader_matches_proc():
  value = preflight._proc_meminfo_available()  # pylint: disable=protected-access
  if value is None:
    pytest.skip("no /proc/meminfo")
  with open("/proc/meminfo") as f:
    kib = next(int(line.split()[1]) for line in f if line.startswith("MemAvailable:"))
  assert abs(value - kib * 1024) < 512 * 1024 ** 2  # read a moment apart
  assert 0 < preflight.available_host_bytes() <= value + 512 * 1024 ** 2


@pytest.mark.slow
def test_trainer_stops_before_the_first_step_and_frees_the_workdir(tmp_path, monkeypatch):
  """The smoke config on a 'machine' with 1 MiB of RAM: DoesNotFitError before step 1, nothing
  trained or saved, and the workdir's lock released (a later run may use the workdir)."""
  import os
  from sized_detr_jax import workdir_lock
  monkeypatch.setattr(preflight, "available_host_bytes", lambda: 1024 ** 2)
  config = config_lib.load_config("synthetic", "smoke")
  config.data.root = str(tmp_path / "data")
  config.update(dict(total_steps=1, num_devices=1, eval_at_end=False))
  workdir = str(tmp_path / "run")
  with pytest.raises(preflight.DoesNotFitError, match=r"cannot run\. To make it fit, lower "
                     r"data\.batch_size=4"):
    train.train_and_evaluate(config_lib.finalize(config), workdir)
  assert not os.path.exists(os.path.join(workdir, "checkpoints", "1"))
  metrics = os.path.join(workdir, "metrics.jsonl")
  assert not os.path.exists(metrics) or os.path.getsize(metrics) == 0
  workdir_lock.WorkdirLock(workdir).acquire().release()  # not held any more
