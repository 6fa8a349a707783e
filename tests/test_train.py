"""The trainer end to end on the smoke config: sharding equivalence, kill -9 resume, eval files.

Compile time dominates on CPU, so the subprocess runs share a persistent compilation cache and
the in-process runs are few and tiny (the `smoke` variant of experiments/synthetic.py).
"""
import json
import os
import subprocess
import sys

import chex
import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
import procs

from sized_detr_jax import config_lib
from sized_detr_jax import metrics_log
from sized_detr_jax import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(ROOT, "experiments", "synthetic.py")


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
  return str(tmp_path_factory.mktemp("data") / "synthetic_smoke")


def _config(data_root, **overrides):
  """The smoke config with `overrides`, finalised as the CLI does."""
  config = config_lib.load_config(CONFIG, "smoke")
  config.data.root = data_root
  config.update(overrides)
  return config_lib.finalize(config)


def _metrics(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


@pytest.mark.slow
def test_four_devices_give_the_single_device_loss(data_root, tmp_path):
  assert jax.device_count() == 4
  runs = {}
  for n in (1, 4):
    workdir = str(tmp_path / f"dev{n}")
    train.train_and_evaluate(_config(data_root, total_steps=2, log_every=1, checkpoint_every=0,
                                     eval_at_end=False, num_devices=n, log_grad_split=True),
                             workdir)
    runs[n] = _metrics(workdir)
  assert [r["step"] for r in runs[1]] == [1, 2]
  for one, four in zip(runs[1], runs[4]):
    for key in ("loss", "loss_bbox", "grad_norm", "grad_norm_ce", "grad_norm_bbox",
                "grad_norm_giou"):
      np.testing.assert_allclose(four[key], one[key], rtol=1e-4, err_msg=key)
    # The kinds' gradients add up to the gradient: its norm is at most the sum of theirs.
    parts = [one[f"grad_norm_{k}"] for k in ("ce", "bbox", "giou")]
    assert all(p > 0 for p in parts) and one["grad_norm"] <= sum(parts) * (1 + 1e-5)
    assert one["clip_fraction"] == float(one["grad_norm"] > 0.1)  # one step per log line


def test_gradient_split_equals_analytic_gradients():
  """`make_train_step(grad_split_every=2)` on a loss with known per-kind gradients."""
  import jax.numpy as jnp
  import optax
  from sized_detr_jax import sharding
  from sized_detr_jax import state as state_lib
  mesh = sharding.make_mesh(1)
  params = {"w": jnp.array([1.0, -2.0, 3.0])}

  def loss_fn(p, state, batch, rng):
    del state, rng
    ce = 0.5 * jnp.sum(p["w"] ** 2)               # gradient w
    bbox = 3.0 * jnp.sum(p["w"] * batch["x"])     # gradient 3 x
    metrics = {"metric_weighted_ce": ce, "metric_weighted_bbox": bbox}
    return ce + bbox, {"loss": ce + bbox, **metrics}

  tx = optax.sgd(0.0)
  state = state_lib.TrainState(step=jnp.zeros((), jnp.int32), params=params, model_state={},
                               opt_state=tx.init(params), rng=jax.random.PRNGKey(0))
  shardings = jax.tree.map(lambda _: sharding.replicated(mesh), state)
  step = train.make_train_step(loss_fn, tx, lambda s: 0.0, mesh, shardings, grad_split_every=2)
  x = jnp.array([[0.5, 0.0, -1.0]])
  state, m1 = step(state, {"x": x})
  state, m2 = step(state, {"x": x})
  w, xv = np.array([1.0, -2.0, 3.0]), np.array([0.5, 0.0, -1.0])
  assert np.isnan(float(m1["grad_norm_ce"]))  # step 1 does not log
  np.testing.assert_allclose(float(m2["grad_norm_ce"]), np.linalg.norm(w), rtol=1e-6)
  np.testing.assert_allclose(float(m2["grad_norm_bbox"]), np.linalg.norm(3 * xv), rtol=1e-6)
  np.testing.assert_allclose(float(m2["grad_norm"]), np.linalg.norm(w + 3 * xv), rtol=1e-6)
  assert "grad_norm_giou" not in m2  # a kind the loss does not report


def _run_py(workdir, data_root, cache_dir, extra=()):
  env = dict(os.environ, JAX_COMPILATION_CACHE_DIR=cache_dir,
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
  cmd = [sys.executable, "run.py", f"--config={CONFIG}:smoke", f"--workdir={workdir}",
         f"--config.data.root={data_root}", "--config.checkpoint_every=3", *extra]
  return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)


def _final_params(workdir, step):
  with ocp.StandardCheckpointer() as ckptr:
    state = ckptr.restore(os.path.join(workdir, "checkpoints", str(step), "state"))
  return state["params"]


@pytest.mark.slow
def test_kill9_resume_is_bit_identical_and_eval_files_written(data_root, tmp_path):
  cache = str(tmp_path / "jax_cache")
  straight, killed = str(tmp_path / "straight"), str(tmp_path / "killed")
  proc = _run_py(straight, data_root, cache)
  out, _ = proc.communicate(timeout=1200)
  assert proc.returncode == 0, out[-3000:]
  assert "AP50" in out and "Files in" in out
  for name in ("eval_metrics.json", "detections_6.json", "per_size_6.png", "config.json"):
    assert os.path.exists(os.path.join(straight, name)), name
  metrics = json.load(open(os.path.join(straight, "eval_metrics.json")))
  assert metrics["step"] == 6 and 0.0 <= metrics["AP"] <= 1.0
  # The run evaluated the EMA params (the default run's eval_ema), as --mode=eval does with
  # the checkpoint: the same detections, which the trained params do not give.
  detections = os.path.join(straight, "detections_6.json")
  with open(detections) as f:
    at_training = json.load(f)
  for extra, same in ((("--mode=eval",), True), (("--mode=eval", "--config.eval_ema=False"),
                                                  False)):
    proc = _run_py(straight, data_root, cache, extra=extra)
    out, _ = proc.communicate(timeout=1200)
    assert proc.returncode == 0, out[-3000:]
    with open(detections) as f:
      assert (json.load(f) == at_training) == same, extra

  # Kill -9 as soon as the step-3 checkpoint is complete, then restart in the same workdir.
  proc = _run_py(killed, data_root, cache, extra=("--config.eval_at_end=False",))
  done = os.path.join(killed, "checkpoints", "3")
  procs.kill9_when_exists(proc, done)
  before = _metrics(killed)
  proc = _run_py(killed, data_root, cache, extra=("--config.eval_at_end=False",))
  out, _ = proc.communicate(timeout=1200)
  assert proc.returncode == 0, out[-3000:]
  raw = _metrics(killed)
  assert raw[:len(before)] == before  # appended, never truncated
  resume = raw[len(before)]
  assert resume["event"] == "resume" and resume["from_step"] == 3  # rows after 3 superseded
  after = metrics_log.read_metrics(os.path.join(killed, "metrics.jsonl"))
  assert [r["step"] for r in after] == [2, 4, 6]
  reference = {r["step"]: r for r in _metrics(straight)}
  for record in after:
    for key in ("loss", "loss_bbox", "loss_ce", "loss_giou", "grad_norm"):
      assert record[key] == reference[record["step"]][key], (record["step"], key)
  a, b = _final_params(straight, 6), _final_params(killed, 6)
  chex.assert_trees_all_equal(a, b)


@pytest.mark.slow
def test_nan_loss_stops_with_step_and_keeps_last_good_checkpoint(data_root, tmp_path, monkeypatch):
  from sized_detr_jax.data import pipeline
  real = pipeline.build_train_iterator

  def poisoned(*args, **kwargs):  # the batch of step 2 (the second batch) has a NaN pixel
    for step, batch in enumerate(real(*args, **kwargs), start=kwargs.get("start_step", 0) + 1):
      if step == 2:
        batch = dict(batch, image=np.where(np.arange(batch["image"].size).reshape(
            batch["image"].shape) == 0, np.nan, batch["image"]).astype(batch["image"].dtype))
      yield batch

  monkeypatch.setattr(pipeline, "build_train_iterator", poisoned)
  workdir = str(tmp_path / "nan")
  with pytest.raises(train.NonFiniteLossError, match="at step 2"):
    train.train_and_evaluate(_config(data_root, total_steps=4, log_every=1, checkpoint_every=1,
                                     eval_at_end=False, num_devices=1), workdir)
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["1"]
  assert [r["step"] for r in _metrics(workdir)] == [1]


@pytest.mark.slow
def test_two_processes_train_like_one(data_root, tmp_path):
  """2 processes x 2 CPU devices (jax.distributed on localhost) = 1 process x 4 devices."""
  workdir = str(tmp_path / "multi")
  workers = procs.start_workers(ROOT, str(tmp_path), [
      f"--config={CONFIG}:smoke", f"--config.data.root={data_root}", "--config.total_steps=2",
      "--config.log_every=1", "--config.checkpoint_every=0", "--config.eval_at_end=False",
      f"--workdir={workdir}"])
  outs = [p.communicate(timeout=900)[0] for p in workers]
  for p, out in zip(workers, outs):
    assert p.returncode == 0, out[-3000:]
  single = str(tmp_path / "single")
  train.train_and_evaluate(_config(data_root, total_steps=2, log_every=1, checkpoint_every=0,
                                   eval_at_end=False), single)
  for multi, one in zip(_metrics(workdir), _metrics(single)):
    assert multi["step"] == one["step"]
    np.testing.assert_allclose(multi["loss"], one["loss"], rtol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("experiment", ["dino_r50", "co_dino"])
def test_smoke_config_runs_end_to_end(experiment, data_root, tmp_path):
  """Every experiments config has a smoke variant; synthetic.py:smoke runs in the kill -9 test,
  semi_detr.py:smoke in tests/test_semi_train.py."""
  workdir = str(tmp_path / experiment)
  out = subprocess.run([sys.executable, "run.py", f"--config=experiments/{experiment}.py:smoke",
                        f"--workdir={workdir}", f"--config.data.root={data_root}"], cwd=ROOT,
                       capture_output=True, text=True, timeout=1800)
  assert out.returncode == 0, out.stderr[-3000:]
  config = config_lib.load_config(os.path.join(ROOT, "experiments", f"{experiment}.py"), "smoke")
  metrics = json.load(open(os.path.join(workdir, "eval_metrics.json")))
  assert metrics["step"] == config.total_steps and set(metrics) >= {"AP", "APs", "APm", "APl"}
  logged = [r["step"] for r in _metrics(workdir)]
  assert logged[-1] == config.total_steps and all(np.isfinite(r["loss"])
                                                  for r in _metrics(workdir))


def test_step_cache_compiles_one_step_per_batch_layout():
  """Image buckets give batches of several shapes: each layout gets its own compiled step (a
  compiled executable rejects other shapes)."""
  import types
  import jax.numpy as jnp
  import optax
  from sized_detr_jax import sharding
  from sized_detr_jax import state as state_lib
  mesh = sharding.make_mesh(1)
  params = {"w": jnp.ones(())}
  loss_fn = lambda p, state, batch, rng: (p["w"] * jnp.mean(batch["image"]),
                                          {"loss": p["w"] * jnp.mean(batch["image"])})
  method = types.SimpleNamespace(stage_at=lambda step: 1, loss_fn=lambda stage: loss_fn,
                                 ema_subtree=lambda p: p)
  tx = optax.sgd(0.5)
  state = state_lib.TrainState(step=jnp.zeros((), jnp.int32), params=params, model_state={},
                               opt_state=tx.init(params), rng=jax.random.PRNGKey(0))
  shardings = jax.tree.map(lambda _: sharding.replicated(mesh), state)
  run = types.SimpleNamespace(method=method, tx=tx, schedule=lambda s: 0.5, mesh=mesh,
                              shardings=shardings)
  cache = train._StepCache(run, config_lib.load_config(CONFIG, "smoke"))  # pylint: disable=protected-access
  for step, side in enumerate((4, 6, 4), start=1):
    batch = {"image": jnp.full((1, side, side, 3), 2.0)}
    state, metrics = cache(state, batch, step)
  assert len(cache._compiled) == 2  # pylint: disable=protected-access
  np.testing.assert_allclose(float(state.params["w"]), 1.0 - 3 * 0.5 * 2.0)
