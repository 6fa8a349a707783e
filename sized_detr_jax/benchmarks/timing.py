"""Wall-clock timing of jitted functions (compile excluded, device work waited for)."""
import time

import jax
import numpy as np


def time_interleaved(calls, *, reps=50, warmup=3):
  """Median seconds of each zero-argument callable, timed in alternation.

  Alternating the candidates inside every round (instead of timing one after another) keeps
  drifting machine load from favouring whichever ran first, so ratios from one run are fair.

  Args:
    calls: dict name -> callable returning jax arrays (already jitted, arguments bound).
    reps: timed rounds.
    warmup: untimed rounds first (the first one compiles).

  Returns:
    dict name -> median seconds.
  """
  for _ in range(warmup):
    for fn in calls.values():
      jax.block_until_ready(fn())
  times = {name: [] for name in calls}
  for _ in range(reps):
    for name, fn in calls.items():
      start = time.perf_counter()
      jax.block_until_ready(fn())
      times[name].append(time.perf_counter() - start)
  return {name: float(np.median(t)) for name, t in times.items()}
