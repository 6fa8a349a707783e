"""Faults of a 2-process job (jax.distributed on localhost, 2 CPU devices per process), as on a
preemptible multi-host cluster:

* SIGTERM to one process: both stop at the same step (the coordination service's preemption
  sync point), save it and exit 143; rerunning the job ends with params identical to an
  uninterrupted 2-process run.
* kill -9 of one process: the other exits within the set lost-process timeout with one line
  naming it (peer_watch); rerunning resumes from the newest complete checkpoint (taking over the
  stale workdir lock) and ends with the same params.

Five 2-process trainings of the smoke config (each compiles its train step): slow.
"""
import os
import re
import signal
import time

import chex
import orbax.checkpoint as ocp
import pytest
import procs

from sized_detr_jax import peer_watch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOTAL = 6
LOST_TIMEOUT_S = 10

pytestmark = pytest.mark.slow


def _start(tmp_path, workdir, *extra, name):
  folder = tmp_path / name
  folder.mkdir()
  return procs.start_workers(ROOT, str(folder), [
      "--config=synthetic:smoke", f"--workdir={workdir}",
      f"--config.data.root={tmp_path / 'data'}", f"--config.total_steps={TOTAL}",
      "--config.log_every=1", "--config.eval_at_end=False", "--compilation_cache=", *extra],
      distributed_args=[f"--config.distributed.lost_process_timeout_seconds={LOST_TIMEOUT_S}"])


def _finish(workers, timeout=1500):
  outs = [p.communicate(timeout=timeout)[0] for p in workers]
  return [p.returncode for p in workers], outs


def _steps(workdir):
  return sorted(int(n) for n in os.listdir(os.path.join(workdir, "checkpoints")) if n.isdigit())


def _params(workdir, step):
  """The params of a checkpoint the 2-process job saved, restored onto this process's device."""
  import jax  # pylint: disable=g-import-not-at-top
  path = os.path.join(workdir, "checkpoints", str(step), "state")
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  with ocp.StandardCheckpointer() as ckptr:
    saved = ckptr.metadata(path).item_metadata
    target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device),
                          saved)
    return ckptr.restore(path, target)["params"]


def _wait_for(predicate, workers, timeout=1200):
  deadline = time.time() + timeout
  while not predicate():
    assert all(p.poll() is None for p in workers), "a process ended early"
    assert time.time() < deadline, "timed out"
    time.sleep(0.05)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  """An uninterrupted 2-process run: its final params."""
  tmp_path = tmp_path_factory.mktemp("multihost")
  workdir = str(tmp_path / "straight")
  codes, outs = _finish(_start(tmp_path, workdir, "--config.checkpoint_every=0", name="ref"))
  assert codes == [0, 0], outs[0][-3000:] + outs[1][-3000:]
  return dict(tmp_path=tmp_path, params=_params(workdir, TOTAL))


def test_sigterm_to_one_process_saves_one_step_everywhere_and_resumes_identically(reference):
  tmp_path = reference["tmp_path"]
  workdir = str(tmp_path / "preempted")
  metrics = os.path.join(workdir, "metrics.jsonl")
  workers = _start(tmp_path, workdir, "--config.checkpoint_every=0", name="sigterm")
  _wait_for(lambda: os.path.exists(metrics) and open(metrics).read().count("\n") >= 1, workers)
  os.kill(workers[1].pid, signal.SIGTERM)  # the preemption notice reaches one host only
  codes, outs = _finish(workers)
  assert codes == [143, 143], outs[0][-3000:] + outs[1][-3000:]
  stopped = [int(re.search(r"stopped by SIGTERM after step (\d+)", out).group(1)) for out in outs]
  assert stopped[0] == stopped[1] < TOTAL and _steps(workdir) == [stopped[0]]
  codes, outs = _finish(_start(tmp_path, workdir, "--config.checkpoint_every=0", name="resume"))
  assert codes == [0, 0], outs[0][-3000:]
  assert f"at step {stopped[0]}" in outs[0]  # "Resumed from ... at step S"
  chex.assert_trees_all_equal(_params(workdir, TOTAL), reference["params"])


def test_kill9_of_one_process_stops_the_other_in_one_line_and_resumes(reference):
  tmp_path = reference["tmp_path"]
  workdir = str(tmp_path / "killed")
  workers = _start(tmp_path, workdir, "--config.checkpoint_every=2", name="kill9")
  _wait_for(lambda: os.path.isdir(os.path.join(workdir, "checkpoints", "2")), workers)
  os.kill(workers[1].pid, signal.SIGKILL)
  killed_at = time.time()
  out0 = workers[0].communicate(timeout=600)[0]
  detected_s = time.time() - killed_at
  workers[1].wait()
  assert workers[0].returncode == peer_watch.EXIT_LOST, out0[-3000:]
  lines = [line for line in out0.splitlines() if line.startswith("run.py: ")]
  assert len(lines) == 1 and "lost process 1 of 2: no heartbeat for" in lines[0], out0[-3000:]
  # Bounded (jax.distributed's own heartbeat would take 100 s): the timeout, two polls and
  # slack for a loaded 2-core machine.
  assert detected_s < LOST_TIMEOUT_S + 2 * min(5, LOST_TIMEOUT_S / 4) + 40, detected_s
  newest = _steps(workdir)[-1]
  codes, outs = _finish(_start(tmp_path, workdir, "--config.checkpoint_every=2", name="again"))
  assert codes == [0, 0], outs[0][-3000:]
  assert f"at step {newest}" in outs[0] and "stale lock" in outs[0]
  chex.assert_trees_all_equal(_params(workdir, TOTAL), reference["params"])
  print(f"kill -9 detected after {detected_s:.1f} s (timeout {LOST_TIMEOUT_S} s)")
