"""Subprocess helpers shared by the end-to-end tests."""
import os
import signal
import time


def kill9_when_exists(proc, path, timeout=1200):
  """SIGKILL `proc` as soon as `path` exists (e.g. a finished checkpoint folder).

  Fails the test if the process ends first or `timeout` seconds pass.
  """
  deadline = time.time() + timeout
  while not os.path.isdir(path) and proc.poll() is None and time.time() < deadline:
    time.sleep(0.05)
  assert proc.poll() is None, "run finished before it could be killed"
  assert os.path.isdir(path), f"{path} did not appear within {timeout} s"
  os.kill(proc.pid, signal.SIGKILL)
  proc.wait()



def free_port():
  """A TCP port free on localhost now."""
  from sized_detr_jax.benchmarks import multihost_step  # pylint: disable=g-import-not-at-top,import-outside-toplevel
  return multihost_step.free_port()


def start_workers(root, folder, args, num_processes=2, env=None, distributed_args=()):
  """`benchmarks.multihost_step.start_local_job`: one jax.distributed job of `num_processes`
  run.py processes on localhost (2 CPU devices each); their Popens, process 0 first."""
  from sized_detr_jax.benchmarks import multihost_step  # pylint: disable=g-import-not-at-top,import-outside-toplevel
  return multihost_step.start_local_job(root, folder, args, num_processes, env,
                                        distributed_args)
