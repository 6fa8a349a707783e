r"""Step time of a multi-process job on one machine: N `run.py` processes of one jax.distributed
job on localhost (2 CPU devices each, gloo collectives), as a multi-host job runs.

  python -m sized_detr_jax.benchmarks.multihost_step --steps=25 --log_every=5
  python -m sized_detr_jax.benchmarks.multihost_step --root=/path/to/other/checkout  # compare

Trains the synthetic smoke config for `--steps` steps (no checkpoints, no evaluation) and
prints the seconds per step over each logging interval after the first (the first holds the
compilation), read from metrics.jsonl's img/s. `--root` runs another checkout's run.py (e.g. the
code before a change) with the same settings; `--repeat` alternates the roots so drifting load
hits both alike.

`start_local_job` is the launcher the multi-process tests use too.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# One process of the job: 2 CPU devices, gloo collectives, then run.py's command line.
_WORKER = """
import os, sys
os.environ.pop("XLA_FLAGS", None)
os.environ["JAX_NUM_CPU_DEVICES"] = "2"
import jax
jax.config.update("jax_cpu_collectives_implementation", "gloo")
sys.argv = ["run.py"] + sys.argv[1:]
sys.path.insert(0, {root!r})
import runpy
runpy.run_path({run_py!r}, run_name="__main__")
"""


def free_port():
  """A TCP port free on localhost now (for the jax.distributed coordinator)."""
  import socket  # pylint: disable=g-import-not-at-top,import-outside-toplevel
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def start_local_job(root, folder, args, num_processes=2, env=None, distributed_args=()):
  """Start `num_processes` run.py processes of one jax.distributed job on localhost.

  Args:
    root: the checkout whose run.py (and package) the processes run.
    folder: where the worker script is written.
    args: run.py flags shared by every process (config, workdir, overrides).
    num_processes: processes in the job (process 0 hosts the coordinator).
    env: extra environment variables.
    distributed_args: extra `--config.distributed.*` flags (e.g. the heartbeat timeout).

  Returns:
    the subprocess.Popen of each process, process 0 first (stdout and stderr merged, text).
  """
  worker = os.path.join(folder, "worker.py")
  with open(worker, "w") as f:
    f.write(_WORKER.format(root=root, run_py=os.path.join(root, "run.py")))
  common = ["--config.distributed.enabled=True",
            f"--config.distributed.coordinator_address=localhost:{free_port()}",
            f"--config.distributed.num_processes={num_processes}", *distributed_args]
  return [subprocess.Popen([sys.executable, worker, *args, *common,
                            f"--config.distributed.process_id={i}"], cwd=root,
                           env=dict(os.environ, **(env or {})), stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True)
          for i in range(num_processes)]


def step_seconds(workdir, images_per_step):
  """Seconds per step of each logged interval after the first (metrics.jsonl's img/s)."""
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    records = [json.loads(line) for line in f]
  return [images_per_step / r["img_per_s"] for r in records if "img_per_s" in r]


def run_once(root, folder, steps, log_every, num_processes):
  """Train once with `root`'s code; returns the seconds per step of each logged interval."""
  workdir = os.path.join(folder, "run")
  data_root = os.path.join(tempfile.gettempdir(), "sized_detr_multihost_step_data")
  procs = start_local_job(root, folder, [
      "--config=experiments/synthetic.py:smoke", f"--workdir={workdir}",
      f"--config.data.root={data_root}", f"--config.total_steps={steps}",
      f"--config.log_every={log_every}", "--config.checkpoint_every=0",
      "--config.eval_at_end=False", "--compilation_cache="], num_processes)
  outs = [p.communicate()[0] for p in procs]
  for p, out in zip(procs, outs):
    if p.returncode:
      raise RuntimeError(f"{root}: a process failed:\n{out[-3000:]}")
  return step_seconds(workdir, images_per_step=4)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--root", action="append", default=[],
                      help="checkout(s) to time (default: this one); give several to compare")
  parser.add_argument("--steps", type=int, default=25)
  parser.add_argument("--log_every", type=int, default=5)
  parser.add_argument("--processes", type=int, default=2)
  parser.add_argument("--repeat", type=int, default=1, help="alternating rounds over the roots")
  args = parser.parse_args(argv)
  roots = args.root or [ROOT]
  times = {root: [] for root in roots}
  for rnd in range(args.repeat):
    for root in roots:
      with tempfile.TemporaryDirectory() as folder:
        seconds = run_once(root, folder, args.steps, args.log_every, args.processes)
      times[root] += seconds
      print(f"round {rnd + 1} {root}: s/step per interval "
            + " ".join(f"{s:.3f}" for s in seconds), flush=True)
  for root, seconds in times.items():
    print(f"{root}: median {np.median(seconds):.3f} s/step, mean {np.mean(seconds):.3f} "
          f"over {len(seconds)} intervals of {args.log_every} steps")


if __name__ == "__main__":
  main()
