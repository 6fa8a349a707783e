"""The device mesh, its batch axis, and global batches (no trainer or model knowledge).

Training is data-parallel: a 1-D `("data",)` mesh over every device of every process, the batch
sharded on `data`, parameters replicated. The trainer enters the mesh once with
`jax.set_mesh(mesh)`; code that needs it while tracing (the host Hungarian matching, which runs
one callback per device shard under `jax.shard_map`) reads it with `context_mesh()` instead of
taking a mesh argument.
"""
import jax
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

DATA_AXIS = "data"


def make_mesh(num_devices=None):
  """1-D ("data",) mesh over every device of every process (or the first `num_devices`).

  Axis type Auto: the compiler propagates shardings (jax >= 0.7 defaults make_mesh to
  Explicit, which would demand sharding-typed code in the model).
  """
  n = num_devices or jax.device_count()
  return jax.make_mesh((n,), (DATA_AXIS,), axis_types=(jax.sharding.AxisType.Auto,),
                       devices=jax.devices()[:n])


def batch_sharding(mesh):
  """Leading (batch) axis split over `data`."""
  return NamedSharding(mesh, P(DATA_AXIS))


def replicated(mesh):
  return NamedSharding(mesh, P())


def global_batch(local_batch, mesh):
  """Process-local numpy batch (a dict, possibly nested) -> global jax arrays sharded on the
  batch axis."""
  sharding = batch_sharding(mesh)
  return jax.tree.map(lambda v: jax.make_array_from_process_local_data(sharding, np.asarray(v)),
                      local_batch)


def context_mesh(data_axis=DATA_AXIS):
  """The mesh entered with `jax.set_mesh` if it has `data_axis`, else None.

  Read at trace time (inside `jax.jit`), so a function traced under `with jax.set_mesh(mesh)`
  shards by it and the same function traced outside runs unsharded.
  """
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or data_axis not in mesh.axis_names:
    return None
  return mesh


def maybe_initialize_distributed(config):
  """`jax.distributed.initialize` from `config.distributed` (multi-host); no-op if absent."""
  dist = config.get("distributed")
  if dist and dist.get("enabled", False):
    kwargs = {k: dist[k] for k in ("coordinator_address", "num_processes", "process_id",
                                   "heartbeat_timeout_seconds") if dist.get(k) is not None}
    jax.distributed.initialize(**kwargs)
