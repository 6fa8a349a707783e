"""host_runtime: XLA flags (user values win) and glibc malloc keeping freed memory."""
import os
import platform
import subprocess
import sys

import pytest

from sized_detr_jax import host_runtime

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The subprocesses apply the settings themselves, whatever this shell's switch says.
_ENV = {k: v for k, v in os.environ.items() if k != host_runtime.SWITCH}
_FLAG = host_runtime.XLA_CPU_FLAGS[0]


def test_add_xla_flags_appends_once_and_keeps_user_values():
  env = {}
  host_runtime.add_xla_flags(env)
  assert env["XLA_FLAGS"] == _FLAG
  host_runtime.add_xla_flags(env)
  assert env["XLA_FLAGS"] == _FLAG
  name = _FLAG.split("=")[0]
  env = {"XLA_FLAGS": f"--xla_force_host_platform_device_count=4 {name}=true"}
  host_runtime.add_xla_flags(env)
  assert env["XLA_FLAGS"] == f"--xla_force_host_platform_device_count=4 {name}=true"
  env = {"XLA_FLAGS": "--xla_force_host_platform_device_count=4"}
  host_runtime.add_xla_flags(env)
  assert env["XLA_FLAGS"] == f"--xla_force_host_platform_device_count=4 {_FLAG}"


def test_switch_off_and_user_malloc_settings_win():
  env = {host_runtime.SWITCH: "0"}
  assert host_runtime.configure(env) == {"xla_flags": "", "malloc_keeps_memory": False}
  assert "XLA_FLAGS" not in env
  assert host_runtime.keep_freed_memory({"MALLOC_MMAP_MAX_": "65536"}) is False


_LIBC = r"""
import ctypes, ctypes.util, os, resource, sys
from sized_detr_jax import host_runtime
libc = ctypes.CDLL(ctypes.util.find_library("c"))
libc.malloc.restype = ctypes.c_void_p
libc.malloc.argtypes = (ctypes.c_size_t,)
libc.free.argtypes = (ctypes.c_void_p,)
"""


_FAULTS = _LIBC + r"""
applied = host_runtime.keep_freed_memory({}) if sys.argv[1] == "1" else False
size = 2**28  # 256 MiB, far above glibc's mmap threshold (as XLA's per-step temporaries)
faults = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_minflt
block = libc.malloc(size)
ctypes.memset(block, 1, size)
libc.free(block)
before = faults()
block = libc.malloc(size)
ctypes.memset(block, 1, size)
print(applied, faults() - before)
"""


def _second_allocation_faults(apply):
  out = subprocess.run([sys.executable, "-c", _FAULTS, "1" if apply else "0"], cwd=_ROOT, env=_ENV,
                       capture_output=True, text=True, check=True).stdout.split()
  return out[0] == "True", int(out[1])


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
                    reason="glibc's mallopt")
def test_freed_block_is_reused_without_page_faults():
  applied, faults = _second_allocation_faults(True)
  assert applied
  _, faults_default = _second_allocation_faults(False)
  pages = 2**28 // 4096
  # Default glibc: the 256 MiB block is a fresh mmap, every page faults in again. Kept: the
  # freed heap block is reused, already resident.
  assert faults_default > 0.9 * pages
  assert faults < 0.1 * pages


_TRIM = _LIBC + r"""
assert host_runtime.keep_freed_memory({})
rss = lambda: int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
blocks = [libc.malloc(2**20) for _ in range(256)]  # 256 MiB in 1 MiB blocks (compiler-like)
for b in blocks:
  ctypes.memset(b, 1, 2**20)
for b in blocks:
  libc.free(b)
kept = rss()
released = host_runtime.release_free_memory()
print(released, kept - rss())
"""


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
                    reason="glibc's malloc_trim")
def test_release_free_memory_returns_the_kept_heap():
  out = subprocess.run([sys.executable, "-c", _TRIM], cwd=_ROOT, env=_ENV, capture_output=True,
                       text=True, check=True).stdout.split()
  # Freed blocks stay resident while trimming is off; malloc_trim gives them back.
  assert out[0] == "True"
  assert int(out[1]) > 200 * 2**20
