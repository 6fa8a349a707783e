"""Process settings for running XLA on the host CPU: the scheduler flag and glibc's malloc.

`configure()` is called first thing by the CLI and by the benchmarks' JAX processes, before
the XLA backend starts (what each setting changes for an R50 step: docs/benchmarks.md):

* `--xla_cpu_enable_concurrency_optimized_scheduler=false` (XLA_FLAGS): XLA orders the step for
  memory instead of concurrency (lower peak memory, same speed and loss).
* malloc keeps freed memory: XLA's CPU runtime allocates each step's temporaries (one large
  block) with malloc, which glibc serves with a fresh mmap and unmaps on free, so every step
  page-faults and zeroes it again. With `mallopt(M_MMAP_MAX, 0)` (large blocks come from the
  heap) and `mallopt(M_TRIM_THRESHOLD, -1)` (the heap is never given back) the block is
  reused. The process keeps its high-water mark, so `release_free_memory()` trims the heap
  once after each compilation (the trainer and the benchmarks call it), before the step's own
  memory.

A setting the user made wins: an XLA flag already in XLA_FLAGS, or any MALLOC_MMAP_MAX_ /
MALLOC_TRIM_THRESHOLD_ / MALLOC_MMAP_THRESHOLD_ / MALLOC_TOP_PAD_ environment variable (glibc's
own tunables) leaves that part alone. SIZED_DETR_HOST_RUNTIME=0 turns all of it off (the
trim too).
"""
import ctypes
import ctypes.util
import os
from typing import Dict, MutableMapping

XLA_CPU_FLAGS = ("--xla_cpu_enable_concurrency_optimized_scheduler=false",)
SWITCH = "SIZED_DETR_HOST_RUNTIME"
_MALLOC_ENV = ("MALLOC_MMAP_MAX_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_",
               "MALLOC_TOP_PAD_")
# glibc malloc.h
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4


def add_xla_flags(environ: MutableMapping[str, str], flags=XLA_CPU_FLAGS):
  """Appends each `--name=value` of `flags` to environ['XLA_FLAGS'] unless `--name` is there."""
  current = environ.get("XLA_FLAGS", "")
  for flag in flags:
    if flag.split("=", 1)[0] not in current:
      current = f"{current} {flag}".strip()
  if current:
    environ["XLA_FLAGS"] = current


def keep_freed_memory(environ: MutableMapping[str, str] = os.environ) -> bool:
  """glibc: serve large blocks from the heap and never trim it. True if applied."""
  if any(name in environ for name in _MALLOC_ENV):
    return False
  libc = _glibc()
  if libc is None:
    return False  # not glibc (musl, macOS): other allocators, other options
  mallopt = libc.mallopt
  mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
  return bool(mallopt(_M_MMAP_MAX, 0)) and bool(mallopt(_M_TRIM_THRESHOLD, -1))


def _glibc():
  """The C library if it is glibc, else None."""
  try:
    libc = ctypes.CDLL(ctypes.util.find_library("c"))
    return libc if hasattr(libc, "gnu_get_libc_version") else None
  except (OSError, TypeError):
    return None


def release_free_memory() -> bool:
  """glibc `malloc_trim(0)`: returns the heap's free pages to the OS. True if any were.

  Call after compiling, before running: XLA's compiler leaves a heap of freed, fragmented
  blocks that the step's one large temporary block cannot reuse, and with trimming off (above)
  they would stay resident beside it.
  """
  if os.environ.get(SWITCH, "1") == "0":
    return False
  libc = _glibc()
  return bool(libc.malloc_trim(0)) if libc is not None else False


def configure(environ: MutableMapping[str, str] = os.environ) -> Dict[str, object]:
  """Applies the settings above (call before the XLA backend starts); returns what it did."""
  if environ.get(SWITCH, "1") == "0":
    return {"xla_flags": environ.get("XLA_FLAGS", ""), "malloc_keeps_memory": False}
  add_xla_flags(environ)
  return {"xla_flags": environ.get("XLA_FLAGS", ""),
          "malloc_keeps_memory": keep_freed_memory(environ)}
