"""A lost process stops the whole multi-process job, in one line naming it, within a set time.

When a host of a `jax.distributed` job dies (killed, a kernel panic, a preemption without notice),
the others wait in their next collective until the coordination service's heartbeat timeout
(100 s by default) and then abort with a C++ stack dump. `PeerWatch` runs a thread in every
process of a training job that keeps a counter in the coordination service's key-value store
and reads the others' every few seconds:

* a process whose counter has not moved for `timeout_s` (`config.distributed.
  lost_process_timeout_seconds`, default 60) is lost: every other process prints one line
  naming it and exits with status `EXIT_LOST`;
* a process that failed with an exception posts it (`fail`): the others print the same line
  naming it (e.g. an image missing on one host) and exit, instead of waiting in a collective;
* the coordinator (process 0) unreachable: the others say so and exit.

A process that finished (`finish`) is no longer watched. The lost-process timeout should stay
below jax.distributed's own heartbeat timeout (`distributed.heartbeat_timeout_seconds`), or its
abort comes first. Restarting the job resumes from the newest complete checkpoint.
"""
from __future__ import annotations

import os
import sys
import threading
import time
from typing import Callable, Dict, Optional

from absl import logging
import jax

EXIT_LOST = 75  # EX_TEMPFAIL: rerunning the job is the remedy
_PREFIX = "sized_detr/peer_watch"


def _client():
  """The coordination service client of `jax.distributed`, or None (single process)."""
  try:  # jax keeps it in a private module
    from jax._src import distributed  # pylint: disable=g-import-not-at-top,import-outside-toplevel
    return distributed.global_state.client
  except (ImportError, AttributeError):
    return None


def _die(message: str) -> None:
  prog = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else "sized-detr"
  sys.stderr.write(f"{prog}: {' '.join(message.split())}\n")
  sys.stderr.flush()
  os._exit(EXIT_LOST)  # pylint: disable=protected-access  # other threads may hold collectives


class PeerWatch:
  """Heartbeat and failure notices among the processes of one job (no-op with one process).

  Args:
    timeout_s: seconds without a heartbeat after which a process counts as lost.
    interval_s: seconds between beats / checks (default: min(5, timeout_s / 4)).
    on_lost: called with the one-line message (default: print it and exit EXIT_LOST).
    expected: exception types every process raises together (a preemption stop): leaving the
      `with` block by one of them counts as finishing, not failing.
  """

  def __init__(self, timeout_s: float = 60.0, interval_s: Optional[float] = None,
               on_lost: Optional[Callable[[str], None]] = None, expected: tuple = ()):
    self.timeout_s = float(timeout_s)
    self.interval_s = float(interval_s or min(5.0, self.timeout_s / 4))
    self._on_lost = on_lost or _die
    self._expected = tuple(expected)
    self._stop = threading.Event()
    self._thread: Optional[threading.Thread] = None
    self._client = None
    self.me = jax.process_index()
    self.count = jax.process_count()

  @classmethod
  def from_config(cls, config, **kwargs) -> "PeerWatch":
    """Timeout from `config.distributed.lost_process_timeout_seconds` (default 60)."""
    dist = config.get("distributed") or {}
    return cls(timeout_s=dist.get("lost_process_timeout_seconds") or 60.0, **kwargs)

  def _key(self, kind: str, process: int) -> str:
    return f"{_PREFIX}/{kind}/{process}"

  def _set(self, kind: str, value: str) -> None:
    self._client.key_value_set(self._key(kind, self.me), value, allow_overwrite=True)

  def _get(self, kind: str, process: int) -> Optional[str]:
    try:
      return self._client.key_value_try_get(self._key(kind, process))
    except Exception as e:  # pylint: disable=broad-except
      if "NOT_FOUND" in str(e) or "not found" in str(e).lower():
        return None
      raise

  def start(self) -> "PeerWatch":
    self._client = _client() if self.count > 1 else None
    if self._client is None:
      return self
    self._set("beat", "0")
    self._thread = threading.Thread(target=self._run, name="peer_watch", daemon=True)
    self._thread.start()
    return self

  def _run(self) -> None:
    beat = 0
    seen: Dict[int, tuple] = {}  # process -> (last value, local time it changed)
    while not self._stop.wait(self.interval_s):
      now = time.monotonic()
      try:
        beat += 1
        self._set("beat", str(beat))
        for p in range(self.count):
          if p == self.me or self._get("finished", p) is not None:
            continue
          failed = self._get("failed", p)
          if failed is not None:
            return self._report(f"process {p} of {self.count} failed: {failed}")
          value = self._get("beat", p)
          last = seen.get(p)
          if last is None or value != last[0]:
            seen[p] = (value, now)
          elif now - last[1] > self.timeout_s:
            return self._report(
                f"lost process {p} of {self.count}: no heartbeat for {now - last[1]:.0f} s "
                "(its host died, was preempted without notice, or hangs); stopping this "
                "process too. Rerun the job on every host: training resumes from the newest "
                "complete checkpoint")
      except Exception as e:  # pylint: disable=broad-except
        if self._stop.is_set():
          return None
        return self._report(
            f"lost the coordinator (process 0 of {self.count}): {type(e).__name__}: "
            f"{' '.join(str(e).split())[:300]}; stopping this process too. Rerun the job on "
            "every host: training resumes from the newest complete checkpoint")
    return None

  def _report(self, message: str) -> None:
    if not self._stop.is_set():
      logging.error("%s", message)
      self._on_lost(message)

  def _post(self, kind: str, value: str) -> None:
    self._stop.set()
    if self._thread is not None:
      self._thread.join(timeout=2 * self.interval_s + 5)
    if self._client is not None:
      try:
        self._set(kind, value)
      except Exception as e:  # pylint: disable=broad-except
        logging.warning("Could not post %s to the other processes: %s", kind, e)

  def finish(self) -> None:
    """This process ended its part normally: the others stop watching it."""
    self._post("finished", "1")

  def fail(self, error: BaseException) -> None:
    """This process failed: the others stop with the same one-line reason."""
    self._post("failed", f"{type(error).__name__}: {' '.join(str(error).split())[:500]}")

  def __enter__(self) -> "PeerWatch":
    return self.start()

  def __exit__(self, exc_type, exc, tb) -> None:
    if exc is None or isinstance(exc, self._expected):
      self.finish()
      return
    if _lost_peer_in_collective(exc) and self._thread is not None:
      # A collective broke because a peer went away (kill -9 mid-step): the heartbeat watcher
      # names the lost process and exits EXIT_LOST within the timeout; wait for it.
      self._thread.join(timeout=self.timeout_s + 2 * self.interval_s + 5)
    self.fail(exc)


def _lost_peer_in_collective(error: BaseException) -> bool:
  """Whether `error` is a cross-process collective failing because its peer disconnected."""
  text = str(error)
  return "Connection closed by peer" in text or "Connection reset by peer" in text
