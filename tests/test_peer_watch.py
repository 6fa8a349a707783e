"""A lost or failed process stops a multi-process job in one line (sized_detr_jax/peer_watch.py):
two small jax.distributed processes on localhost (no model), process 1 killed -9 or failing,
process 0 exits with EXIT_LOST and one line naming process 1 within the timeout; two healthy
ones finish normally."""
import os
import subprocess
import sys
import time

import pytest
import procs

from sized_detr_jax import peer_watch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMEOUT_S = 4

_SCRIPT = """
import os, signal, sys, time
sys.path.insert(0, {root!r})
import jax
me, port, mode = int(sys.argv[1]), sys.argv[2], sys.argv[3]
jax.distributed.initialize(f"localhost:{{port}}", 2, me)
from sized_detr_jax import peer_watch
with peer_watch.PeerWatch(timeout_s={timeout}):
  print("up", flush=True)
  if me == 1 and mode == "kill":
    time.sleep(2)
    print("killed at", time.time(), flush=True)
    os.kill(os.getpid(), signal.SIGKILL)
  if me == 1 and mode == "fail":
    time.sleep(2)
    raise FileNotFoundError("images/x.jpg is missing on this host")
  time.sleep(5 if mode == "ok" else 60)
print("done", flush=True)
"""


def _job(tmp_path, mode):
  script = tmp_path / "job.py"
  script.write_text(_SCRIPT.format(root=ROOT, timeout=TIMEOUT_S))
  port = str(procs.free_port())
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  env.pop("XLA_FLAGS", None)
  jobs = [subprocess.Popen([sys.executable, str(script), str(i), port, mode], env=env,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
          for i in range(2)]
  outs = [p.communicate(timeout=120) for p in jobs]
  return jobs, outs, time.time()


def _last_line(stderr):
  return [line for line in stderr.splitlines() if line.startswith("job.py: ")][-1]


@pytest.mark.slow
def test_killed_process_is_named_within_the_timeout(tmp_path):
  jobs, outs, _ = _job(tmp_path, "kill")
  assert jobs[1].returncode == -9
  assert jobs[0].returncode == peer_watch.EXIT_LOST, outs[0][1][-2000:]
  line = _last_line(outs[0][1])
  assert "lost process 1 of 2: no heartbeat for" in line and "newest complete checkpoint" in line
  waited = float(line.split("no heartbeat for ")[1].split(" s")[0])
  assert TIMEOUT_S <= waited <= TIMEOUT_S + 2 * min(5, TIMEOUT_S / 4) + 1, waited


@pytest.mark.slow
def test_failed_process_stops_the_others_with_its_reason(tmp_path):
  jobs, outs, _ = _job(tmp_path, "fail")
  assert jobs[0].returncode == peer_watch.EXIT_LOST, outs[0][1][-2000:]
  assert _last_line(outs[0][1]) == ("job.py: process 1 of 2 failed: FileNotFoundError: "
                                    "images/x.jpg is missing on this host")
  assert jobs[1].returncode != 0 and "images/x.jpg is missing" in outs[1][1]


@pytest.mark.slow
def test_healthy_processes_finish(tmp_path):
  jobs, outs, _ = _job(tmp_path, "ok")
  for p, (out, err) in zip(jobs, outs):
    assert p.returncode == 0 and out.strip().endswith("done"), err[-2000:]


def test_single_process_is_a_no_op():
  with peer_watch.PeerWatch(timeout_s=1) as watch:
    assert watch._thread is None  # pylint: disable=protected-access
