"""Orbax checkpoints of the train state and the data position, with fallback on a bad latest one.

Layout: `WORKDIR/checkpoints/<step>/{state, meta}`; `state` is the train-state pytree (params,
optimiser state, step, rng, EMA params...), `meta` a small JSON dict (data iterator position,
config name...). Orbax writes each step into a temporary folder and renames it when complete, so
a run killed mid-save leaves the previous steps intact. If the newest checkpoint still cannot be
read (truncated or corrupted files), `restore_latest` warns and falls back to the one before.
"""
import os

from absl import logging
import jax
import orbax.checkpoint as ocp


class Checkpointer:
  """Saves every `every` steps (and when forced), keeps `keep`, restores the newest readable one."""

  def __init__(self, workdir, *, every, keep=3, async_save=True):
    self.directory = os.path.join(os.path.abspath(workdir), "checkpoints")
    self.every = int(every)
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, create=True, enable_async_checkpointing=async_save,
        cleanup_tmp_directories=True)
    self._manager = ocp.CheckpointManager(self.directory, options=options,
                                          item_names=("state", "meta"))

  def all_steps(self):
    return sorted(self._manager.all_steps())

  def maybe_save(self, step, state, meta, *, force=False):
    """Save at multiples of `every` (or if forced). Returns True if a save started."""
    if not force and (self.every <= 0 or step % self.every):
      return False
    if step in self._manager.all_steps():
      return False
    self._manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)), force=True)
    return True

  def restore_latest(self, abstract_state):
    """Newest readable checkpoint -> (step, state, meta), or None when there is none.

    Args:
      abstract_state: pytree of `jax.ShapeDtypeStruct` (with shardings) describing the state, as
        from `jax.eval_shape`; restored arrays get these shardings.
    """
    self._manager.wait_until_finished()
    for step in reversed(self.all_steps()):
      try:
        restored = self._manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()))
        return step, restored["state"], restored["meta"]
      except Exception as e:  # pylint: disable=broad-except
        logging.warning("Checkpoint at step %d in %s is unreadable (%s: %s); falling back to the "
                        "previous one.", step, self.directory, type(e).__name__, str(e)[:200])
    return None

  def wait(self):
    self._manager.wait_until_finished()

  def close(self):
    self._manager.wait_until_finished()
    self._manager.close()


def abstract_like(tree):
  """ShapeDtypeStructs (keeping shardings) describing a concrete pytree of arrays."""
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)
