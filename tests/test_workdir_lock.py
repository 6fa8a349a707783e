"""One job per workdir (sized_detr_jax/workdir_lock.py): a held lock refuses a second job in one
line naming the holder, a stale lock of a dead process on this host is taken over (logged), a
lock of another host is never taken over, and two concurrent `run.py` trainings into one
workdir: the second stops at once, the first finishes untouched."""
import json
import os
import socket
import subprocess
import sys
import time

import pytest

from sized_detr_jax import workdir_lock

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _plant(workdir, **holder):
  os.makedirs(workdir, exist_ok=True)
  path = os.path.join(workdir, workdir_lock.LOCK_NAME)
  with open(path, "w") as f:
    json.dump(holder, f)
  return path


def _dead_pid():
  """The pid of a process that has exited (and been reaped)."""
  proc = subprocess.Popen([sys.executable, "-c", "pass"])
  proc.wait()
  return proc.pid


def test_lock_records_the_holder_and_release_removes_it(tmp_path):
  with workdir_lock.WorkdirLock(str(tmp_path)) as lock:
    holder = json.loads(open(lock.path).read())
    assert holder["host"] == socket.gethostname() and holder["pid"] == os.getpid()
    assert holder["started"][:4].isdigit()
    # A second lock in the same process is refused too (as another job's would be).
    with pytest.raises(workdir_lock.WorkdirLockedError, match=f"pid {os.getpid()}"):
      workdir_lock.WorkdirLock(str(tmp_path)).acquire()
  assert not os.path.exists(os.path.join(tmp_path, workdir_lock.LOCK_NAME))


def test_live_holder_on_this_host_is_named_in_one_line(tmp_path):
  sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
  try:
    path = _plant(str(tmp_path), host=socket.gethostname(), pid=sleeper.pid,
                  pid_started=workdir_lock._pid_started(sleeper.pid),  # pylint: disable=protected-access
                  started="2030-01-02T03:04:05+00:00")
    with pytest.raises(workdir_lock.WorkdirLockedError) as e:
      workdir_lock.WorkdirLock(str(tmp_path)).acquire()
    message = str(e.value)
    assert "\n" not in message
    for part in (f"pid {sleeper.pid}", socket.gethostname(), "2030-01-02T03:04:05", path):
      assert part in message, part
    assert json.load(open(path))["pid"] == sleeper.pid  # untouched
  finally:
    sleeper.kill()
    sleeper.wait()


def test_stale_lock_of_a_dead_process_is_taken_over(tmp_path, caplog):
  dead = _dead_pid()
  _plant(str(tmp_path), host=socket.gethostname(), pid=dead, started="earlier")
  with caplog.at_level("WARNING"):
    lock = workdir_lock.WorkdirLock(str(tmp_path)).acquire()
  try:
    assert json.load(open(lock.path))["pid"] == os.getpid()
    assert any("stale lock" in r.getMessage() and f"pid {dead}" in r.getMessage()
               for r in caplog.records)
  finally:
    lock.release()


def test_reused_pid_is_not_mistaken_for_the_holder(tmp_path):
  """A live pid whose start time differs from the recorded one is another process: stale."""
  started = workdir_lock._pid_started(os.getppid())  # pylint: disable=protected-access
  if started is None:
    pytest.skip("no /proc on this system")
  _plant(str(tmp_path), host=socket.gethostname(), pid=os.getppid(), pid_started=started + 1)
  with workdir_lock.WorkdirLock(str(tmp_path)) as lock:
    assert json.load(open(lock.path))["pid"] == os.getpid()


def test_lock_of_another_host_is_never_taken_over(tmp_path):
  path = _plant(str(tmp_path), host="other-host-xyz", pid=_dead_pid(), started="earlier")
  with pytest.raises(workdir_lock.WorkdirLockedError,
                     match="host other-host-xyz.*if that job is gone, delete the file"):
    workdir_lock.WorkdirLock(str(tmp_path)).acquire()
  assert json.load(open(path))["host"] == "other-host-xyz"


@pytest.mark.slow
def test_two_concurrent_trainings_into_one_workdir(tmp_path):
  """The second run.py into a workdir being trained fails at once with one line; the first
  finishes with its own records only."""
  workdir, data_root = str(tmp_path / "run"), str(tmp_path / "data")
  cmd = [sys.executable, "run.py", "--config=synthetic:smoke", f"--workdir={workdir}",
         f"--config.data.root={data_root}", "--config.total_steps=2", "--config.log_every=1",
         "--config.eval_at_end=False", "--compilation_cache="]
  first = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                           text=True)
  lock = os.path.join(workdir, workdir_lock.LOCK_NAME)
  deadline = time.time() + 300
  while not os.path.exists(lock) and first.poll() is None and time.time() < deadline:
    time.sleep(0.1)
  assert os.path.exists(lock), first.communicate()[0][-3000:]
  start = time.perf_counter()
  second = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
  took = time.perf_counter() - start
  out, _ = first.communicate(timeout=900)
  assert first.returncode == 0, out[-3000:]
  assert second.returncode == 1
  line = second.stderr.strip().splitlines()[-1]
  assert "is in use by another training job" in line and f"pid {first.pid}" in line, line
  assert took < 60, took  # before building the data, the model or compiling anything
  records = [json.loads(r) for r in open(os.path.join(workdir, "metrics.jsonl"))]
  assert [r.get("step") for r in records] == [1, 2]  # no second run's rows, no event marker
  assert not os.path.exists(lock)  # released at the end
