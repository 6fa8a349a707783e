"""Trainer side of the fault matrix (issue 14): SIGTERM saves the current step, a finished run
without its final evaluation evaluates on resume, resume/restart markers in metrics.jsonl, eval
says which checkpoint it used and why, a changed model is an error (or a fresh start on
request), eval on a missing workdir creates nothing, predict names collide never.

One chain of tiny runs of experiments/synthetic.py:smoke in one workdir (each train call
compiles once: the chain keeps the count at three).
"""
import json
import os
import signal

import chex
import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from sized_detr_jax import checkpointing
from sized_detr_jax import config_lib
from sized_detr_jax import evaluate
from sized_detr_jax import metrics_log
from sized_detr_jax import predict
from sized_detr_jax import train
from sized_detr_jax import workdir_lock

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(ROOT, "experiments", "synthetic.py")


def _config(data_root, model=None, **overrides):
  """The smoke config with `overrides` (top-level fields) and `model` (model fields), finalised
  as the CLI does."""
  config = config_lib.load_config(CONFIG, "smoke")
  config.data.root = data_root
  config.update(dict(total_steps=2, log_every=1, checkpoint_every=0, eval_at_end=False,
                     num_devices=1))
  config.update(overrides)
  config.model.update(model or {})
  return config_lib.finalize(config)


def _params(workdir, step):
  with ocp.StandardCheckpointer() as ckptr:
    return ckptr.restore(os.path.join(workdir, "checkpoints", str(step), "state"))["params"]


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
  """SIGTERM after step 1, then resume to the end (step 2), then evaluate-on-resume."""
  base = tmp_path_factory.mktemp("faults")
  data_root, workdir = str(base / "data"), str(base / "run")
  real_write = metrics_log.MetricsLog.write

  def write_then_sigterm(self, step, *args, **kwargs):
    record = real_write(self, step, *args, **kwargs)
    if step == 1:
      os.kill(os.getpid(), signal.SIGTERM)  # as a preemption notice between steps
    return record

  metrics_log.MetricsLog.write = write_then_sigterm
  try:
    with pytest.raises(train.Preempted, match="after step 1; checkpoint 1 saved"):
      train.train_and_evaluate(_config(data_root), workdir)
  finally:
    metrics_log.MetricsLog.write = real_write
  after_sigterm = sorted(os.listdir(os.path.join(workdir, "checkpoints")))
  step1 = _params(workdir, 1)
  train.train_and_evaluate(_config(data_root), workdir)  # resumes at 1, trains 2, no eval
  assert not os.path.exists(os.path.join(workdir, "eval_metrics.json"))
  metrics = train.train_and_evaluate(_config(data_root, eval_at_end=True), workdir)
  return dict(data_root=data_root, workdir=workdir, after_sigterm=after_sigterm, step1=step1,
              final_eval=metrics)


@pytest.mark.slow
def test_sigterm_saves_the_current_step_and_resume_continues(chain):
  assert chain["after_sigterm"] == ["1"]
  assert all(np.all(np.isfinite(np.asarray(x))) for x in jax.tree.leaves(chain["step1"]))
  assert sorted(os.listdir(os.path.join(chain["workdir"], "checkpoints"))) == ["1", "2"]


@pytest.mark.slow
def test_split_step_sigterm_and_resume_give_the_callback_steps_params(chain, tmp_path):
  """`split_step=True` (the matching between two executables): SIGTERM after step 1 saves it,
  the resumed run trains step 2, and both checkpoints hold the chain's (one-executable step's)
  params."""
  workdir = str(tmp_path / "split")
  real_write = metrics_log.MetricsLog.write

  def write_then_sigterm(self, step, *args, **kwargs):
    record = real_write(self, step, *args, **kwargs)
    if step == 1:
      os.kill(os.getpid(), signal.SIGTERM)
    return record

  metrics_log.MetricsLog.write = write_then_sigterm
  try:
    with pytest.raises(train.Preempted, match="after step 1; checkpoint 1 saved"):
      train.train_and_evaluate(_config(chain["data_root"], split_step=True), workdir)
  finally:
    metrics_log.MetricsLog.write = real_write
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["1"]
  train.train_and_evaluate(_config(chain["data_root"], split_step=True), workdir)
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["1", "2"]
  # AdamW moves a weight by ~lr (1e-3) whatever its gradient's size, so float rounding that
  # differs between the two compiled forms (~1e-7 relative in the gradients) can move a weight
  # whose gradient is near 0 by ~1e-6: 1e-5 is 1% of one step.
  for step, reference in ((1, chain["step1"]), (2, _params(chain["workdir"], 2))):
    chex.assert_trees_all_close(_params(workdir, step), reference, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_finished_run_without_final_evaluation_evaluates_on_resume(chain):
  record = json.load(open(os.path.join(chain["workdir"], "eval_metrics.json")))
  assert record["step"] == 2 and chain["final_eval"]["AP"] == record["AP"]
  assert os.path.exists(os.path.join(chain["workdir"], "detections_2.json"))


@pytest.mark.slow
def test_tensorboard_holds_the_evaluation_and_the_learning_rates(chain):
  import tb_events  # pylint: disable=g-import-not-at-top
  scalars, hparams = tb_events.read_events(os.path.join(chain["workdir"], "tensorboard"))
  for key in ("AP", "AP50", "APm"):
    value = chain["final_eval"][key]
    if value >= 0:
      assert scalars[f"eval/{key}"] == [(2, pytest.approx(value))], key
  assert [s for s, _ in scalars["train/loss"]] == [1, 2]
  assert [s for s, _ in scalars["lr/default"]] == [1, 2]
  assert hparams["total_steps"] == 2 and hparams["eval_at_end"] is True


@pytest.mark.slow
def test_metrics_jsonl_marks_resumes_and_read_metrics_drops_superseded_rows(chain):
  path = os.path.join(chain["workdir"], "metrics.jsonl")
  raw = [json.loads(line) for line in open(path)]
  events = [r for r in raw if "event" in r]
  assert [(e["event"], e["from_step"]) for e in events] == [("resume", 1), ("resume", 2)]
  assert [r["step"] for r in metrics_log.read_metrics(path)] == [1, 2]


def test_read_metrics_applies_events(tmp_path):
  path = tmp_path / "m.jsonl"
  rows = [{"step": 1, "loss": 5}, {"step": 2, "loss": 4}, {"step": 3, "loss": 3},
          {"event": "resume", "from_step": 2}, {"step": 3, "loss": 2.5}, {"step": 4, "loss": 2},
          {"event": "restart", "from_step": 0}, {"step": 1, "loss": 9}]
  path.write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 2, "lo')  # cut line
  assert metrics_log.read_metrics(str(path)) == [{"step": 1, "loss": 9}]
  path.write_text("".join(json.dumps(r) + "\n" for r in rows[:6]))
  assert [(r["step"], r["loss"]) for r in metrics_log.read_metrics(str(path))] == [
      (1, 5), (2, 4), (3, 2.5), (4, 2)]


@pytest.mark.slow
def test_eval_says_which_step_and_why_after_corruption(chain, capsys):
  # Damage the newest step: eval falls back to step 1, moves step 2 aside, and says so.
  step2 = os.path.join(chain["workdir"], "checkpoints", "2", "state")
  data = [os.path.join(d, f) for d, _, fs in os.walk(step2) for f in fs if "/d/" in d + "/"]
  with open(max(data, key=os.path.getsize), "r+b") as f:
    f.truncate(0)
  # --mode=eval takes no lock: it runs beside a training job that holds the workdir.
  lock = os.path.join(chain["workdir"], workdir_lock.LOCK_NAME)
  with open(lock, "w") as f:
    json.dump({"host": "another-host", "pid": 1, "started": "now"}, f)
  try:
    evaluate.evaluate_only(_config(chain["data_root"]), chain["workdir"])
    assert json.load(open(lock))["host"] == "another-host"
  finally:
    os.remove(lock)
  out = capsys.readouterr().out
  assert "using checkpoint step 1 because step 2 was unreadable" in out
  record = json.load(open(os.path.join(chain["workdir"], "eval_metrics.json")))
  assert record["step"] == 1
  names = os.listdir(os.path.join(chain["workdir"], "checkpoints"))
  assert "1" in names and any(n.startswith("2.corrupt-") for n in names)


@pytest.mark.slow
def test_changed_model_is_an_error_then_a_fresh_start_on_request(chain):
  workdir = chain["workdir"]
  changed = _config(chain["data_root"], seed=1, model={"hidden_dim": 32})
  before = sorted(os.listdir(os.path.join(workdir, "checkpoints")))
  with pytest.raises(checkpointing.CheckpointMismatchError,
                     match=r"does not fit this config: .*shape.*model.hidden_dim: 64 -> 32"):
    train.train_and_evaluate(changed, workdir)
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == before  # nothing moved
  with pytest.raises(checkpointing.CheckpointMismatchError):  # eval: the same error
    evaluate.evaluate_only(changed, workdir)
  train.train_and_evaluate(_config(chain["data_root"], seed=1, total_steps=1), workdir,
                           on_mismatch="error")  # the original model still restores
  train.train_and_evaluate(_config(chain["data_root"], seed=1, total_steps=1,
                                   model={"hidden_dim": 32}), workdir, on_mismatch="fresh")
  names = os.listdir(os.path.join(workdir, "checkpoints"))
  assert "1" in names and any(".superseded-" in n for n in names)
  raw = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
  assert raw[-2]["event"] == "restart" and raw[-1]["step"] == 1


def test_eval_on_a_missing_workdir_creates_nothing(tmp_path):
  missing = tmp_path / "nope"
  with pytest.raises(FileNotFoundError, match="does not exist"):
    evaluate.evaluate_only(_config(str(tmp_path / "data")), str(missing))
  assert not missing.exists()


def test_predict_output_names_are_unique():
  names = predict.output_names(["a/x.png", "b/x.png", "c/y.jpg", "x.png", "a/x.jpg"])
  assert len(set(names)) == len(names)
  assert names[2] == "y.png" and names[0].startswith("a_x")
  chex.assert_equal(predict.output_names(["p/q.png"]), ["q.png"])
