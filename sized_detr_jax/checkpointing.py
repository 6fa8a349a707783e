"""Orbax checkpoints of the train state and the data position: nothing lost on faults.

Layout: `WORKDIR/checkpoints/<step>/{state, meta}`; `state` is the train-state pytree (params,
optimiser state, step, rng, EMA params...), `meta` a small JSON dict (data iterator position,
config name...). Orbax writes each step into a temporary folder and renames it when complete, so
a run killed mid-save leaves the previous steps intact.

What each fault does:
  * A step that cannot be read (truncated / corrupt files) is moved aside to
    `checkpoints/<step>.corrupt-<time>` (logged, never deleted) and `Checkpointer.restore` falls
    back to the step before; `RestoreResult.describe()` says which step was restored and why.
    Moving it aside lets the retrained step be saved again under its number.
  * A readable step whose tree structure or shapes differ from the state the config builds is
    a `CheckpointMismatchError` naming the first differing path and both shapes (and the
    changed config fields, from `config.json`): never a silent restart. `on_mismatch="fresh"`
    moves every step aside to `<step>.superseded-<time>` and starts from scratch instead.
  * A save of a state with a NaN/inf in any float leaf (params, optimiser state, EMA params) is
    refused with `NonFiniteStateError` naming the step, the leaf and the newest checkpoint on
    disk, which stays untouched.
  * A save that fails while writing (disk full, permissions...) raises `CheckpointSaveError`
    naming the step and the newest complete checkpoint, which stays untouched; the partial
    temporary folder is removed.

Orbax itself does not tell the two restore failures apart: a truncated data file, a damaged
manifest and a shape mismatch all surface as `ValueError` (or a bare `Exception`, or a
`JSONDecodeError`). So the structure and shapes are compared first, from the checkpoint's
metadata, and only a step whose metadata matches but whose restore still fails counts as
corrupt. Multi-process: every process restores; only process 0 renames folders.
"""
from __future__ import annotations

import dataclasses
import json
import time
from typing import Any, Optional

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from sized_detr_jax import fs

ON_MISMATCH = ("error", "fresh")


class CheckpointMismatchError(ValueError):
  """A readable checkpoint whose tree structure or array shapes differ from the config's state."""


class NonFiniteStateError(FloatingPointError):
  """A save was refused because the state holds NaN/inf; the checkpoints on disk are kept."""


class CheckpointSaveError(OSError):
  """Writing a checkpoint failed (disk full, permissions...); older checkpoints are intact."""


@dataclasses.dataclass(frozen=True)
class SkippedStep:
  """A newer step that could not be restored.

  Attributes:
    step: its step number.
    reason: "ExceptionType: message" (shortened).
    moved_to: the folder it was renamed to, or None (not renamed: a process other than 0).
  """
  step: int
  reason: str
  moved_to: Optional[str]


@dataclasses.dataclass(frozen=True)
class RestoreResult:
  """What `Checkpointer.restore` found.

  Attributes:
    step: the restored step, or None when nothing was restored (no checkpoint, every one
      unreadable, or a fresh start after a mismatch).
    state: the restored state pytree (None when step is None).
    meta: the restored meta dict (None when step is None).
    skipped: newer steps that were unreadable, newest first (moved aside).
    superseded: folders moved aside by on_mismatch="fresh".
    mismatch: the mismatch description that on_mismatch="fresh" overrode, or None.
  """
  step: Optional[int]
  state: Any = None
  meta: Optional[dict] = None
  skipped: tuple = ()
  superseded: tuple = ()
  mismatch: Optional[str] = None

  def describe(self):
    """One line for logs and the eval printout, e.g. "step 3 (step 6 was unreadable: ...)"."""
    if self.step is None:
      text = "no checkpoint restored"
    else:
      text = f"step {self.step}"
    notes = [f"step {s.step} was unreadable ({s.reason}); "
             + (f"moved to {s.moved_to}" if s.moved_to else "left in place") for s in self.skipped]
    if self.superseded:
      notes.append(f"fresh start requested although the checkpoints do not fit the config "
                   f"({self.mismatch}); {len(self.superseded)} step folder(s) moved aside, "
                   f"first {self.superseded[0]}")
    return text + (" because " + "; ".join(notes) if notes else "")


def _key_name(key):
  for attr in ("key", "name", "idx"):
    if hasattr(key, attr):
      return str(getattr(key, attr))
  return str(key)


def _path_name(path):
  return "/".join(_key_name(k) for k in path)


def leaf_shapes(tree):
  """{"a/b/c": shape} of every leaf with a shape (arrays, ShapeDtypeStructs, orbax metadata)."""
  return {_path_name(path): tuple(getattr(leaf, "shape", ()))
          for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def tree_mismatch(saved, wanted):
  """First difference between two {path: shape} dicts, or None.

  Paths under "params/" are compared first (a changed model shows there, and the optimiser
  state repeats it), then the others in `wanted`'s order.

  Returns:
    e.g. "params/head/kernel has shape (64, 4) in the checkpoint but (32, 4) in the config",
    "params/x is in the config but not in the checkpoint", or the reverse.
  """
  order = sorted(wanted, key=lambda p: not p.startswith("params/"))  # stable: keeps the order
  for path in order:
    shape = wanted[path]
    if path not in saved:
      return f"{path} (shape {shape}) is in the config's state but not in the checkpoint"
    if tuple(saved[path]) != tuple(shape):
      return (f"{path} has shape {tuple(saved[path])} in the checkpoint but {tuple(shape)} in "
              "the config's state")
  for path in sorted(saved, key=lambda p: not p.startswith("params/")):
    shape = saved[path]
    if path not in wanted:
      return f"{path} (shape {shape}) is in the checkpoint but not in the config's state"
  return None


def _flat_config(tree, prefix=""):
  """{"a.b": value} of a nested dict (config.json)."""
  out = {}
  for k, v in tree.items():
    if isinstance(v, dict):
      out.update(_flat_config(v, f"{prefix}{k}."))
    else:
      out[f"{prefix}{k}"] = v
  return out


def config_changes(config_json, config):
  """Fields whose values differ between a saved config.json and `config`.

  Args:
    config_json: path of the json written by the trainer (missing / unreadable: no changes).
    config: the current ConfigDict (or dict).

  Returns:
    list of "field: old -> new" strings, in sorted field order.
  """
  try:
    old = _flat_config(json.loads(fs.path(config_json).read_text()))
  except (OSError, ValueError):
    return []
  new_dict = config.to_dict() if hasattr(config, "to_dict") else dict(config)
  new = _flat_config(json.loads(json.dumps(new_dict, default=str)))
  return [f"{k}: {old.get(k, '<absent>')!r} -> {new.get(k, '<absent>')!r}"
          for k in sorted(set(old) | set(new)) if old.get(k, "<absent>") != new.get(k, "<absent>")]


@jax.jit
def _non_finite_counts(leaves):
  return [jnp.sum(~jnp.isfinite(x)) for x in leaves]


def first_non_finite(tree):
  """(path, count, size) of the first float leaf holding NaN/inf, or None if all are finite.

  The counts are reduced on the device (one jitted call per tree structure) so only scalars
  travel to the host.
  """
  flat = [(path, leaf) for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]
          if jnp.issubdtype(jnp.result_type(leaf), jnp.inexact)]
  if not flat:
    return None
  counts = jax.device_get(_non_finite_counts([leaf for _, leaf in flat]))
  for (path, leaf), count in zip(flat, counts):
    if int(count):
      return _path_name(path), int(count), int(np.prod(np.shape(leaf)))
  return None


def _short(e, limit=320):
  """One line "Type: message"; a long message keeps its head and its tail (where tensorstore
  puts the OS error, e.g. "No space left on device")."""
  text = " ".join(str(e).split())
  if len(text) > limit:
    text = f"{text[:limit // 2]} ... {text[-limit // 2:]}"
  return f"{type(e).__name__}: {text}"


def _is_resource_error(e):
  """Out of memory while restoring says nothing about the files: never move a step for it."""
  return isinstance(e, MemoryError) or "RESOURCE_EXHAUSTED" in str(e)


class Checkpointer:
  """Saves every `every` steps (and when forced), keeps `keep`, restores the newest readable one."""

  def __init__(self, workdir, *, every, keep=3, async_save=True):
    self.workdir = fs.path(workdir)
    self.directory = self.workdir / "checkpoints"
    self.every = int(every)
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, create=True, enable_async_checkpointing=async_save,
        cleanup_tmp_directories=True)
    self._manager = ocp.CheckpointManager(
        self.directory, options=options,
        item_handlers={"state": ocp.StandardCheckpointHandler(),
                       "meta": ocp.JsonCheckpointHandler()})
    self._pending_step = None

  def all_steps(self):
    return sorted(self._manager.all_steps())

  def complete_steps(self):
    """Steps with a finished folder on disk (read from the directory, not orbax's cache)."""
    if not self.directory.exists():
      return []
    return sorted(int(p.name) for p in self.directory.iterdir()
                  if p.name.isdigit() and p.is_dir())

  def _newest_text(self, state):
    """"the newest checkpoint on disk, step N (DIR/N), is <state>" or "there is no checkpoint"."""
    steps = self.complete_steps()
    return (f"the newest checkpoint on disk, step {steps[-1]} ({self.directory}/{steps[-1]}), "
            f"is {state}" if steps else f"there is no checkpoint in {self.directory} yet")

  # ------------------------------------------------------------------------------ saving
  def maybe_save(self, step, state, meta, *, force=False):
    """Save at multiples of `every` (or if forced). Returns True if a save started.

    Raises:
      NonFiniteStateError: a float leaf of `state` holds NaN/inf (nothing is written).
      CheckpointSaveError: the write failed (this one, or a previous asynchronous one).
    """
    if not force and (self.every <= 0 or step % self.every):
      return False
    if step in self._manager.all_steps():
      logging.warning("Checkpoint step %d already exists in %s; not saving it again.", step,
                      self.directory)
      return False
    bad = first_non_finite(state)
    if bad is not None:
      path, count, size = bad
      self._finish_pending()
      raise NonFiniteStateError(
          f"refusing to save the checkpoint of step {step}: {path} holds {count} non-finite "
          f"value(s) of {size}; {self._newest_text('kept')}")
    self._finish_pending()
    self._pending_step = step
    try:
      self._manager.save(step, args=ocp.args.Composite(
          state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)), force=True)
    except Exception as e:  # pylint: disable=broad-except
      raise self._save_failed(e) from e
    return True

  def _save_failed(self, e):
    step, self._pending_step = self._pending_step, None
    if step is not None and jax.process_index() == 0:  # free the space of the partial write
      for partial in self.directory.glob(f"{step}.orbax-checkpoint-tmp*"):
        try:
          partial.rmtree()
        except OSError:
          pass
    what = f"step {step}" if step is not None else "an earlier asynchronous save"
    return CheckpointSaveError(f"saving the checkpoint of {what} to {self.directory} "
                               f"failed ({_short(e)}); {self._newest_text('intact')}")

  def _finish_pending(self):
    """Wait for an asynchronous save; its failure becomes a CheckpointSaveError."""
    try:
      self._manager.wait_until_finished()
    except Exception as e:  # pylint: disable=broad-except
      raise self._save_failed(e) from e
    self._pending_step = None

  # ------------------------------------------------------------------------------ restoring
  def _move_aside(self, step, kind):
    """Renames checkpoints/<step> to <step>.<kind>-<time>; returns the new path (or None)."""
    if jax.process_index() != 0:
      return None
    src = self.directory / str(step)
    # No "_" in the name: orbax would parse "<anything>_<digits>" as a step folder.
    base = f"{step}.{kind}-{time.strftime('%Y%m%dT%H%M%S')}"
    dst, n = self.directory / base, 1
    while dst.exists():
      dst, n = self.directory / f"{base}-{n}", n + 1
    try:
      src.rename(dst)
    except OSError as e:
      logging.error("Could not move checkpoint %s aside to %s: %s", src, dst, e)
      return None
    return str(dst)

  def _saved_shapes(self, step):
    return leaf_shapes(self._manager.item_metadata(step)["state"])

  def restore(self, abstract_state, *, on_mismatch="error", config=None):
    """Restores the newest readable checkpoint that fits `abstract_state`.

    Args:
      abstract_state: pytree of `jax.ShapeDtypeStruct` (with shardings) describing the state, as
        from `jax.eval_shape`; restored arrays get these shardings (dtypes are cast).
      on_mismatch: "error" (default): a checkpoint whose structure/shapes differ raises
        CheckpointMismatchError; "fresh": every step folder is moved aside to
        `<step>.superseded-<time>` and nothing is restored.
      config: the current config, to name the fields changed since WORKDIR/config.json in the
        mismatch error (optional; the trainer must write config.json after this call).

    Returns:
      RestoreResult (step None when nothing was restored). Unreadable newer steps were moved to
      `<step>.corrupt-<time>` and are listed in `skipped`.

    Raises:
      CheckpointMismatchError: the newest readable checkpoint does not fit (on_mismatch="error").
    """
    if on_mismatch not in ON_MISMATCH:
      raise ValueError(f"on_mismatch must be one of {ON_MISMATCH}, got {on_mismatch!r}")
    self._finish_pending()
    wanted = leaf_shapes(abstract_state)
    skipped = []
    for step in reversed(self.all_steps()):
      try:
        saved = self._saved_shapes(step)
      except Exception as e:  # pylint: disable=broad-except
        saved, metadata_error = None, e
      if saved is not None:
        mismatch = tree_mismatch(saved, wanted)
        if mismatch is not None:
          return self._on_mismatch(step, mismatch, on_mismatch, config, skipped)
      try:
        restored = self._manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()))
      except Exception as e:  # pylint: disable=broad-except
        if _is_resource_error(e):
          raise
        reason = _short(metadata_error if saved is None else e)
        moved = self._move_aside(step, "corrupt")
        logging.warning("Checkpoint step %d in %s is unreadable (%s); %s; falling back to the "
                        "previous one.", step, self.directory, reason,
                        f"moved to {moved}" if moved else "left in place")
        skipped.append(SkippedStep(step, reason, moved))
        continue
      result = RestoreResult(step, restored["state"], restored["meta"], tuple(skipped))
      break
    else:
      result = RestoreResult(None, skipped=tuple(skipped))
    if skipped:
      self._manager.reload()  # forget the renamed steps so they can be saved again
    return result

  def _on_mismatch(self, step, mismatch, on_mismatch, config, skipped):
    if on_mismatch == "error":
      changes = config_changes(self.workdir / "config.json", config) if config else []
      changed = (f"; config fields changed since {self.workdir}/config.json: "
                 + ", ".join(changes[:6]) + (" ..." if len(changes) > 6 else "")) if changes else ""
      raise CheckpointMismatchError(
          f"checkpoint step {step} in {self.directory} does not fit this config: {mismatch}"
          f"{changed}. Use another workdir, or start fresh with run.py --fresh_start (the old "
          "checkpoints are moved aside, not deleted)")
    moved = [m for m in (self._move_aside(s, "superseded") for s in reversed(self.all_steps()))
             if m]
    logging.warning("Checkpoints in %s do not fit this config (%s); fresh start requested: "
                    "moved %d step folder(s) aside.", self.directory, mismatch, len(moved))
    self._manager.reload()
    return RestoreResult(None, skipped=tuple(skipped), superseded=tuple(moved), mismatch=mismatch)

  def restore_latest(self, abstract_state, *, on_mismatch="error", config=None):
    """`restore` as (step, state, meta), or None when nothing was restored (logged)."""
    result = self.restore(abstract_state, on_mismatch=on_mismatch, config=config)
    if result.skipped or result.superseded:
      logging.warning("Restored %s", result.describe())
    if result.step is None:
      return None
    return result.step, result.state, result.meta

  def wait(self):
    self._finish_pending()

  def close(self):
    try:
      self._finish_pending()
    finally:
      self._manager.close()


def abstract_like(tree):
  """ShapeDtypeStructs (keeping shardings) describing a concrete pytree of arrays."""
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)
