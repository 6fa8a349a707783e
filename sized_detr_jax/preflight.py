"""Memory preflight: does the compiled train step fit the device, before the first step runs?

A config too large for the machine otherwise fails inside the allocator minutes later, with a
raw `RESOURCE_EXHAUSTED: Out of memory allocating N bytes`. After compiling, XLA knows the
step's footprint per device (`compiled.memory_analysis()`): its arguments + outputs +
temporaries, less the outputs written into donated arguments (the train state is donated).
`check_train_step` compares that with what the device has:

* GPU / TPU: the allocator's limit, `device.memory_stats()["bytes_limit"]` (the smallest over
  this process's devices), per device.
* CPU: every CPU device of the process shares the host RAM, so the need is summed over them and
  compared with the RAM available now (the smaller of /proc/meminfo MemAvailable and the cgroup
  v2 limit's headroom) plus the step's arguments, which are already resident.

Over the capacity: `DoesNotFitError`, one line naming both figures and the knobs that shrink the
step (images per step, image size, remat, coco_custom's `cpu` token). Within 10% of it: a
warning. SIZED_DETR_PREFLIGHT=0 skips the check (e.g. on a machine that swaps on purpose).
"""
from __future__ import annotations

import dataclasses
import os
from typing import Optional

from absl import logging
import jax

SWITCH = "SIZED_DETR_PREFLIGHT"
WARN_FRACTION = 0.9  # a need above this share of the capacity is a tight fit (warned)


def format_bytes(n: float) -> str:
  """'1.50 GiB', '12.00 MiB', '512 B': binary units, two decimals."""
  for unit, size in (("GiB", 1024 ** 3), ("MiB", 1024 ** 2), ("KiB", 1024)):
    if abs(n) >= size:
      return f"{n / size:.2f} {unit}"
  return f"{int(n)} B"


class DoesNotFitError(ValueError):
  """The compiled train step needs more memory than the device has (both figures named)."""


def _proc_meminfo_available() -> Optional[int]:
  """MemAvailable of /proc/meminfo in bytes, or None where there is none."""
  try:
    with open("/proc/meminfo", encoding="ascii") as f:  # /proc: always a local file
      for line in f:
        if line.startswith("MemAvailable:"):
          return int(line.split()[1]) * 1024
  except (OSError, ValueError, IndexError):
    pass
  return None


def _cgroup_headroom() -> Optional[int]:
  """cgroup v2 memory.max - memory.current in bytes (a container's limit), or None."""
  try:
    with open("/sys/fs/cgroup/memory.max", encoding="ascii") as f:
      limit = f.read().strip()
    with open("/sys/fs/cgroup/memory.current", encoding="ascii") as f:
      current = int(f.read().strip())
  except (OSError, ValueError):
    return None
  return None if limit == "max" else max(int(limit) - current, 0)


def available_host_bytes() -> Optional[int]:
  """RAM a new allocation can get now (bytes): MemAvailable, capped by a cgroup v2 limit."""
  figures = [v for v in (_proc_meminfo_available(), _cgroup_headroom()) if v is not None]
  return min(figures) if figures else None


def _local_devices_of(compiled):
  """This process's devices among those a compiled function's inputs are placed on."""
  shardings = jax.tree.leaves(compiled.input_shardings)
  if not shardings:
    return jax.local_devices()
  devices = sorted(shardings[0].device_set, key=lambda d: d.id)
  return [d for d in devices if d.process_index == jax.process_index()]


@dataclasses.dataclass(frozen=True)
class Fit:
  """The step's footprint against the capacity (bytes).

  Attributes:
    need: bytes the step needs on the memory compared (per device on GPU/TPU; summed over the
      process's devices on CPU).
    capacity: bytes available to it (the same scope), or None when unknown (check skipped).
    need_text / capacity_text: how each figure was made up, for messages.
  """
  need: int
  capacity: Optional[int]
  need_text: str
  capacity_text: str

  @property
  def fraction(self) -> float:
    return self.need / self.capacity if self.capacity else 0.0


def step_fit(compiled, devices=None) -> Fit:
  """`compiled.memory_analysis()` of a compiled step against the memory of `devices` (default:
  this process's devices among those the step runs on)."""
  devices = list(devices or _local_devices_of(compiled))
  stats = compiled.memory_analysis()
  args, outs = stats.argument_size_in_bytes, stats.output_size_in_bytes
  alias, temp = stats.alias_size_in_bytes, stats.temp_size_in_bytes
  per_device = args + outs - alias + temp
  b = format_bytes
  parts = f"arguments {b(args)} + outputs {b(outs)} - donated {b(alias)} + temporaries {b(temp)}"
  if devices[0].platform == "cpu":
    n = len(devices)
    available = available_host_bytes()
    need_text = (f"{b(per_device * n)} of RAM ({parts} per device"
                 + (f", x {n} CPU devices sharing the RAM)" if n > 1 else ")"))
    if available is None:
      return Fit(per_device * n, None, need_text, "unknown available RAM")
    resident = args * n  # the state and the batch are in the RAM already
    return Fit(per_device * n, available + resident, need_text,
               f"{b(available + resident)} (available RAM {b(available)} + the step's arguments "
               f"already in it {b(resident)})")
  limits = [(d.memory_stats() or {}).get("bytes_limit") for d in devices]
  limits = [v for v in limits if v]
  need_text = f"{b(per_device)} per device ({parts})"
  if not limits:
    return Fit(per_device, None, need_text, "unknown device memory")
  return Fit(per_device, min(limits), need_text,
             f"{b(min(limits))} per {devices[0].device_kind} (its allocator limit)")


def _knobs(config) -> str:
  """The config fields that shrink the step, with their current values."""
  data, model = config.get("data", {}), config.get("model", {})
  knobs = [f"data.batch_size={data.get('batch_size')} (images per step)"]
  if data.get("size") is not None:
    knobs.append(f"data.size={data.get('size')} (shorter image side)")
  if "remat" in model:
    knobs.append(f"model.remat={model.get('remat')} (True recomputes the transformer layers "
                 "in the backward pass)")
  knobs.append("the `cpu` token of coco_custom (--config=coco_custom:cpu, a CPU-sized run)")
  return "lower " + ", ".join(knobs)


def check_train_step(compiled, config, devices=None) -> Fit:
  """Raise DoesNotFitError when the compiled train step cannot fit; warn when it barely does.

  Args:
    compiled: the compiled step (`jax.jit(...).lower(...).compile()`).
    config: the run's config (names the knobs and their values in the message).
    devices: the devices it runs on (default: this process's among those of its inputs).

  Returns:
    the Fit (capacity None: unknown, nothing checked).
  """
  if os.environ.get(SWITCH, "1") == "0":
    return Fit(0, None, "", "check off")
  fit = step_fit(compiled, devices)
  if fit.capacity is None:
    logging.info("Memory preflight skipped (%s); the train step needs %s.", fit.capacity_text,
                 fit.need_text)
    return fit
  if fit.need > fit.capacity:
    raise DoesNotFitError(
        f"the train step needs {fit.need_text} but there is {fit.capacity_text}: it cannot "
        f"run. To make it fit, {_knobs(config)} ({SWITCH}=0 skips this check)")
  if fit.fraction > WARN_FRACTION:
    logging.warning("Tight memory: the train step needs %s, %.0f%% of %s; an allocation "
                    "failure is likely (to shrink it, %s).", fit.need_text,
                    100 * fit.fraction, fit.capacity_text, _knobs(config))
  else:
    logging.info("Memory preflight: the train step needs %s of %s.", fit.need_text,
                 fit.capacity_text)
  return fit
