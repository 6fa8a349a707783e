"""One training job per workdir: a lock file, `WORKDIR/run.lock`, held by process 0.

Two jobs training into one workdir (a requeued job while the old one still runs, a second
terminal) overwrite each other's checkpoints and interleave their metrics, so `train` takes
this lock before it builds anything and a second job stops at once with `WorkdirLockedError`,
one line naming the holder (host, pid, start time) and the lock file.

The file is JSON: {"host", "pid", "pid_started" (the process's start time in clock ticks from
/proc, so a reused pid is not mistaken for the holder), "started" (ISO time), "argv"}. A lock
whose holder is on this host and no longer runs (killed -9, a crash) is stale: it is taken over
and the take-over is logged. A lock held from another host cannot be checked from here: the
error names that host; delete the file when that job is known to be gone. `--mode=eval` and
`--mode=predict` only read the workdir and take no lock.

On a local disk the file is created with O_CREAT | O_EXCL (atomic). Object stores (gs://...)
are reached through etils.epath, which has no exclusive create: there the lock is written and
read back, which catches a second job started seconds after the first but not two started
within the same instant.

Multi-process jobs: only process 0 takes the lock; every process learns whether it did (one
broadcast at start-up), so all of them stop with the same error.
"""
from __future__ import annotations

import datetime
import json
import os
import socket
import sys
import threading
from typing import Optional

from absl import logging
from etils import epath
import jax
import numpy as np

LOCK_NAME = "run.lock"

# Lock files this process holds (as strings), so a second `acquire` in the same process (a test,
# a notebook) is refused like another job's, and a lock left by this pid but not held is stale.
_HELD: set = set()
_HELD_GUARD = threading.Lock()


class WorkdirLockedError(OSError):
  """Another job holds the workdir's lock (the message names its host, pid and start time)."""


def _pid_started(pid: int) -> Optional[int]:
  """Start time of process `pid` in clock ticks since boot (/proc/PID/stat field 22), or None
  where /proc is absent or the process does not exist."""
  try:
    with open(f"/proc/{pid}/stat", encoding="ascii") as f:  # /proc: always a local file
      stat = f.read()
  except OSError:
    return None
  # The command name (field 2) may hold spaces and parentheses: split after its last ')'.
  fields = stat[stat.rindex(")") + 2:].split()
  return int(fields[19])


def _pid_alive(pid: int, started: Optional[int]) -> bool:
  """Whether `pid` runs and is the process that wrote the lock (same start time, when known)."""
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True  # exists, owned by another user
  now = _pid_started(pid)
  return started is None or now is None or now == started


def _describe(holder: dict) -> str:
  return (f"host {holder.get('host', '?')} pid {holder.get('pid', '?')}, started "
          f"{holder.get('started', '?')}")


def _read(path: epath.Path) -> Optional[dict]:
  """The lock's content; {} when unreadable (cut write); None when absent."""
  try:
    text = path.read_text()
  except FileNotFoundError:
    return None
  try:
    holder = json.loads(text)
  except ValueError:
    return {}
  return holder if isinstance(holder, dict) else {}


def _is_local(path: epath.Path) -> bool:
  return "://" not in str(path)


def _create(path: epath.Path, text: str) -> bool:
  """Create `path` holding `text` unless it exists; True if this call created it."""
  if _is_local(path):
    try:
      fd = os.open(str(path), os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
      return False
    with os.fdopen(fd, "w") as f:
      f.write(text)
    return True
  if path.exists():
    return False
  path.write_text(text)
  return path.read_text() == text  # another writer in the same instant: one of us wins


class WorkdirLock:
  """The lock of one workdir; `acquire()` / `release()`, or a `with` block.

  Args:
    workdir: the run's folder (a local path or an epath URI such as gs://bucket/run).
  """

  def __init__(self, workdir):
    self.path = epath.Path(workdir) / LOCK_NAME
    self._content: Optional[str] = None

  def _record(self) -> str:
    pid = os.getpid()
    return json.dumps({"host": socket.gethostname(), "pid": pid,
                       "pid_started": _pid_started(pid),
                       "started": datetime.datetime.now().astimezone().isoformat(
                           timespec="seconds"),
                       "argv": sys.argv})

  def _stale(self, holder: dict) -> bool:
    """A lock of a process of this host that no longer runs (or of this process, not held)."""
    if holder.get("host") != socket.gethostname() or not isinstance(holder.get("pid"), int):
      return False
    if holder["pid"] == os.getpid():
      with _HELD_GUARD:
        return str(self.path) not in _HELD
    return not _pid_alive(holder["pid"], holder.get("pid_started"))

  def _try_acquire(self) -> None:
    """Process 0's attempt. Raises WorkdirLockedError naming the holder."""
    self.path.parent.mkdir(parents=True, exist_ok=True)
    content = self._record()
    for _ in range(3):  # a stale lock removed, then created by us (or a racing job)
      if _create(self.path, content):
        self._content = content
        with _HELD_GUARD:
          _HELD.add(str(self.path))
        return
      holder = _read(self.path)
      if holder is None:
        continue  # released between our attempt and the read
      if holder and self._stale(holder):
        logging.warning("Taking over the stale lock %s of %s, which no longer runs.", self.path,
                        _describe(holder))
        self.path.unlink(missing_ok=True)
        continue
      where = ("this host" if holder.get("host") == socket.gethostname()
               else f"host {holder.get('host', '?')}: if that job is gone, delete the file")
      raise WorkdirLockedError(
          f"workdir {self.path.parent} is in use by another training job ({_describe(holder)}; "
          f"lock file {self.path}, on {where}); use another --workdir, or wait for it to end")
    raise WorkdirLockedError(f"could not take the lock {self.path} (it keeps reappearing)")

  def acquire(self) -> "WorkdirLock":
    """Take the lock (process 0); every process raises WorkdirLockedError if it is held."""
    error = None
    if jax.process_index() == 0:
      try:
        self._try_acquire()
      except WorkdirLockedError as e:
        error = e
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
      failed = int(multihost_utils.broadcast_one_to_all(np.int32(error is not None)))
      if failed and error is None:
        error = WorkdirLockedError(
            f"process 0 could not take the lock {self.path} (another job holds the workdir: "
            "its log names the holder)")
    if error is not None:
      raise error
    return self

  def release(self) -> None:
    """Delete the lock if this object holds it (and it still holds our record)."""
    if self._content is None:
      return
    try:
      if self.path.exists() and self.path.read_text() == self._content:
        self.path.unlink(missing_ok=True)
    except OSError as e:  # a lost mount: the next run on this host takes the stale lock over
      logging.warning("Could not remove the lock %s: %s", self.path, e)
    with _HELD_GUARD:
      _HELD.discard(str(self.path))
    self._content = None

  def __enter__(self) -> "WorkdirLock":
    return self.acquire()

  def __exit__(self, *exc) -> None:
    self.release()
