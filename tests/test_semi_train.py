"""Semi-DETR training end to end on experiments/semi_detr.py:smoke: the stage switch, the EMA
teacher against a numpy reference, kill -9 + resume of student and teacher, 1 device = 4
devices, and no gradient reaching the teacher.

Compile time dominates (two stages, each a teacher + two student passes), so one straight
4-device run in a subprocess provides the reference for every test.
"""
import json
import os
import subprocess
import sys

import chex
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
import procs

from sized_detr_jax import config_lib
from sized_detr_jax import metrics_log
from sized_detr_jax import sharding
from sized_detr_jax import state as state_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(ROOT, "experiments", "semi_detr.py")
STEPS, SWITCH = 6, 3


def _metrics(workdir):
  """The run's records (resume events applied: superseded rows dropped)."""
  return metrics_log.read_metrics(os.path.join(workdir, "metrics.jsonl"))


def _run_py(workdir, data_root, extra=()):
  cmd = [sys.executable, "run.py", f"--config={CONFIG}:smoke", f"--workdir={workdir}",
         f"--config.data.root={data_root}", f"--config.total_steps={STEPS}",
         f"--config.semi.switch_step={SWITCH}", "--config.log_every=1",
         "--config.checkpoint_every=1", f"--config.keep_checkpoints={STEPS}", *extra]
  return subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True)


def _state(workdir, step):
  with ocp.StandardCheckpointer() as ckptr:
    return ckptr.restore(os.path.join(workdir, "checkpoints", str(step), "state"))


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
  base = tmp_path_factory.mktemp("semi")
  data_root, workdir = str(base / "data"), str(base / "straight")
  proc = _run_py(workdir, data_root)
  out, _ = proc.communicate(timeout=1800)
  assert proc.returncode == 0, out[-3000:]
  return dict(data_root=data_root, workdir=workdir, out=out, metrics=_metrics(workdir))


@pytest.mark.slow
def test_stage_switch_at_configured_step_and_eval(straight):
  records = straight["metrics"]
  assert [r["step"] for r in records] == list(range(1, STEPS + 1))
  for r in records:
    stage1 = r["step"] <= SWITCH  # steps 1..SWITCH run with state.step < SWITCH
    # Stage 1: consistency + mining, one-to-many (no Hungarian dn terms on pseudo-labels).
    assert ("loss_consistency" in r) == stage1, r["step"]
    assert ("metric_gmm_threshold" in r) == stage1, r["step"]
    assert np.isfinite(r["loss"]) and r["loss_sup"] > 0
  assert "AP50" in straight["out"]
  metrics = json.load(open(os.path.join(straight["workdir"], "eval_metrics.json")))
  assert metrics["step"] == STEPS and 0.0 <= metrics["AP"] <= 1.0


@pytest.mark.slow
def test_teacher_is_the_ema_of_the_student(straight):
  """ema_t = m ema_{t-1} + (1 - m) params_t with m = min(0.999, s / (s + 1)), s = t - 1."""
  for step in (1, STEPS):
    now = _state(straight["workdir"], step)
    assert set(now["ema_params"]) == {"dino"}  # the projector is not EMA'd (Semi-DETR)
    if step == 1:  # m = 0: the teacher starts as a copy of the updated student
      chex.assert_trees_all_equal(now["ema_params"]["dino"], now["params"]["dino"])
      continue
    prev = _state(straight["workdir"], step - 1)
    m = min(0.999, (step - 1) / step)
    expected = jax.tree.map(
        lambda e, p: m * np.asarray(e, np.float64) + (1 - m) * np.asarray(p, np.float64),
        prev["ema_params"]["dino"], now["params"]["dino"])
    chex.assert_trees_all_close(now["ema_params"]["dino"], expected, rtol=1e-6, atol=1e-7)
    diff = jax.tree.leaves(jax.tree.map(lambda a, b: np.abs(a - b).max(),
                                        now["ema_params"]["dino"], now["params"]["dino"]))
    assert max(diff) > 0  # teacher and student differ after a few steps


@pytest.mark.slow
def test_kill9_resume_restores_student_and_teacher(straight, tmp_path):
  killed = str(tmp_path / "killed")
  extra = ("--config.eval_at_end=False",)
  proc = _run_py(killed, straight["data_root"], extra)
  # Killed once the switch-step checkpoint exists, the resumed run compiles stage 2 only.
  done = os.path.join(killed, "checkpoints", str(SWITCH))
  procs.kill9_when_exists(proc, done)
  proc = _run_py(killed, straight["data_root"], extra)
  out, _ = proc.communicate(timeout=1800)
  assert proc.returncode == 0, out[-3000:]
  reference = {r["step"]: r for r in straight["metrics"]}
  records = _metrics(killed)
  assert records[-1]["step"] == STEPS
  for r in records:
    assert r["loss"] == reference[r["step"]]["loss"], r["step"]
    assert r["loss_unsup"] == reference[r["step"]]["loss_unsup"], r["step"]
  a, b = _state(straight["workdir"], STEPS), _state(killed, STEPS)
  chex.assert_trees_all_equal(a["params"], b["params"])
  chex.assert_trees_all_equal(a["ema_params"], b["ema_params"])


@pytest.mark.slow
def test_one_device_loss_equals_four_and_teacher_gets_no_gradient(straight, tmp_path):
  """Step 1 on a 1-device mesh reproduces the 4-device run's loss; d loss / d teacher = 0."""
  config = config_lib.load_config(CONFIG, "smoke")
  config.data.root = straight["data_root"]
  config.num_devices = 1
  config.semi.switch_step = SWITCH
  config = config_lib.finalize(config)
  run = state_lib.setup(config, str(tmp_path / "one"))
  run.checkpointer.close()
  state = run.state
  batch = sharding.global_batch(next(run.method.train_batches(
      config.data, seed=config.seed, start_step=0)), run.mesh)
  loss_fn = run.method.loss_fn(1)

  def loss_of(params, ema):
    return loss_fn(params, state.replace(ema_params=ema), batch,
                   jax.random.fold_in(state.rng, state.step))

  with jax.set_mesh(run.mesh):
    (loss, metrics), (g_params, g_ema) = jax.jit(
        jax.value_and_grad(loss_of, argnums=(0, 1), has_aux=True))(state.params,
                                                                    state.ema_params)
  step1 = straight["metrics"][0]
  np.testing.assert_allclose(float(loss), step1["loss"], rtol=1e-5)
  np.testing.assert_allclose(float(metrics["loss_consistency"]), step1["loss_consistency"],
                             rtol=1e-4, atol=1e-7)
  assert set(state.ema_params) == {"dino"}  # the teacher tracks the detector only
  assert all(not np.any(np.asarray(g)) for g in jax.tree.leaves(g_ema))
  assert all(np.all(np.isfinite(np.asarray(g))) for g in jax.tree.leaves(g_params))
  assert np.any(np.asarray(g_params["projector"]["fc2"]["kernel"]))
  assert float(jnp.sum(metrics["metric_pseudo_initial"])) >= 0
