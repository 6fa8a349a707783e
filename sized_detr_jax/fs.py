"""A run's files through etils.epath: local paths and gs:// (or other fsspec) URIs alike.

Workdirs, checkpoints, metrics, TensorBoard events, detections and dataset json files go
through `fs.path` (an `epath.Path`), so `--workdir=gs://bucket/runs/x` works wherever the
backend's package is installed (gs://: `gcsfs`, as for epath itself; orbax writes the
checkpoint arrays there with tensorstore's own GCS driver).

Object stores have no append and no rename-over; `append_text` and `write_text_atomic` use them
on local disks and rewrite the whole object elsewhere (an object write is atomic by itself).
"""
from __future__ import annotations

import os
from typing import Union

from etils import epath

PathLike = Union[str, os.PathLike, epath.Path]


def is_local(p: PathLike) -> bool:
  """Whether `p` is a local path (no `scheme://` prefix)."""
  return "://" not in os.fspath(p)


def path(p: PathLike) -> epath.Path:
  """`p` as an epath.Path; a local one made absolute (the working directory may change)."""
  if is_local(p):
    return epath.Path(os.path.abspath(os.fspath(p)))
  return epath.Path(os.fspath(p))


def write_text_atomic(target: PathLike, text: str) -> None:
  """Write `text` so readers see the old file or the new one, never half of it."""
  target = path(target)
  if not is_local(target):
    target.write_text(text)  # one object write
    return
  tmp = target.parent / f".{target.name}.{os.getpid()}.tmp"
  tmp.write_text(text)
  tmp.replace(target)  # atomic on one filesystem (os.replace)


def append_text(target: PathLike, text: str) -> None:
  """Append `text` (local: an append; an object store: the whole object rewritten)."""
  target = path(target)
  if is_local(target):
    with target.open("a") as f:
      f.write(text)
    return
  old = target.read_text() if target.exists() else ""
  target.write_text(old + text)
