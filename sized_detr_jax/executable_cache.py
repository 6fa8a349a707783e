"""Compiled executables kept on disk under a key computed without tracing.

JAX's persistent compilation cache keys an executable by its lowered module, so a warm start
still traces and lowers the function to find the key. The split train step (`split_step.py`) and
the state's init (`state.init_state`) keep their executables here as well, keyed by what
determines them and is known before any tracing: the caller's description of the step (the
trainer's: the finalised config, the data info and the stage), the arguments' shapes, dtypes,
shardings and tree structure, this package's source, the versions of jax, jaxlib and the
libraries the step is built from, the backend and its devices, `XLA_FLAGS` and JAX's
configuration. A warm start then skips tracing, splitting and lowering and only loads the
executables.

The entries live in a folder beside JAX's cache (`jax_compilation_cache_dir`), so the cache is
on where, and only where, JAX's is (one process only; with several, JAX's cache alone). Entries
are never evicted: deleting the folder at any time only costs the next start a compile. An entry
that cannot be read, is corrupt (its checksum is stored with it) or does not fit the arguments
is never used: the caller compiles as if there were none, with one line in the log. Like JAX's
own cache, an entry is a pickle: the folder must be as trusted as the code.

Only freshly compiled executables are kept: one that JAX loaded from its own persistent cache
is not, because XLA:CPU (jaxlib 0.10) serializes a deserialized executable without some of its
kernels (loading that entry fails at run time: "Function ... not found"). Where JAX's cache
served the compile (the code changed but not the program), the start is as fast as before
this cache, and stays so until a fresh compile fills it.
"""
import concurrent.futures
import contextlib
import functools
import hashlib
import io
import os
import pickle
import platform
import sys
import tempfile
from typing import Any, Callable, Optional

from absl import logging
import jax
from jax.experimental import serialize_executable

# The folder under jax_compilation_cache_dir.
FOLDER = "sized_detr_jax_executables"
# Entry file layout: MAGIC, sha256 of the payload (32 bytes), payload (a pickle).
_MAGIC = b"sized_detr_jax executable v1\n"
# Libraries whose code the traced step is built from (their version is in the key).
_LIBRARIES = ("jax", "jaxlib", "flax", "optax", "numpy", "ml_dtypes", "ml_collections")
_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))


@functools.lru_cache(maxsize=None)
def package_source_hash() -> str:
  """sha256 over this package's .py files (relative path and content)."""
  digest = hashlib.sha256()
  for root, dirs, files in os.walk(_PACKAGE_DIR):
    dirs[:] = sorted(d for d in dirs if d != "__pycache__")
    for name in sorted(files):
      if name.endswith(".py"):
        path = os.path.join(root, name)
        digest.update(os.path.relpath(path, _PACKAGE_DIR).encode() + b"\0")
        with open(path, "rb") as f:
          digest.update(f.read() + b"\0")
  return digest.hexdigest()


def _library_versions():
  from importlib import metadata  # pylint: disable=import-outside-toplevel
  versions = {}
  for name in _LIBRARIES:
    try:
      versions[name] = metadata.version(name)
    except metadata.PackageNotFoundError:
      versions[name] = None
  return versions


def environment() -> dict:
  """What, besides the step itself, changes an executable: code, versions, backend, flags."""
  devices = jax.devices()
  client = devices[0].client
  return dict(
      package=package_source_hash(), libraries=_library_versions(),
      python=sys.version, machine=platform.machine(),
      backend=(client.platform, client.platform_version),
      devices=[(d.id, d.process_index, d.device_kind) for d in devices],
      processes=(jax.process_index(), jax.process_count()),
      xla_flags=os.environ.get("XLA_FLAGS", ""), libtpu=os.environ.get("LIBTPU_INIT_ARGS", ""),
      jax_config=sorted((k, repr(v)) for k, v in jax.config.values.items()
                        if k != "jax_compilation_cache_dir"))


def arguments_layout(args) -> tuple:
  """The tree structure and each leaf's shape, dtype and sharding of `args`."""
  leaves, tree = jax.tree.flatten(args)
  return str(tree), [(tuple(x.shape), str(x.dtype), repr(getattr(x, "sharding", None)))
                     for x in leaves]


def folder() -> Optional[str]:
  """This cache's folder, or None when JAX's persistent cache is off or there are several
  processes (where JAX's own cache still works)."""
  base = jax.config.jax_compilation_cache_dir
  if not base or jax.process_count() > 1:
    return None
  return os.path.join(base, FOLDER)


def key(*parts: Any) -> str:
  """sha256 of `parts` (reprs) and `environment()`."""
  return hashlib.sha256(repr((parts, environment())).encode()).hexdigest()


class _Pickler(pickle.Pickler):
  """Pickles `jax.stages.Compiled` as its serialized executable."""

  def persistent_id(self, obj):
    if isinstance(obj, jax.stages.Compiled):
      # The devices it runs on, in its order (deserialize_and_load's default: all devices).
      devices = obj._executable._unloaded_executable.device_list  # pylint: disable=protected-access
      return ("compiled", serialize_executable.serialize(obj), [d.id for d in devices])
    return None


class _Deferred:
  """An executable's place in an unpickled payload until it is deserialized."""

  def __init__(self, index):
    self.index = index


class _Unpickler(pickle.Unpickler):
  """Leaves each executable as a `_Deferred` and collects what deserializes it (`pending`)."""

  def __init__(self, file):
    super().__init__(file)
    self.pending = []

  def persistent_load(self, pid):
    if pid[0] == "compiled":
      self.pending.append(pid[1:])
      return _Deferred(len(self.pending) - 1)
    raise pickle.UnpicklingError(f"unknown persistent id {pid[0]!r}")


def _deserialize(serialized, device_ids):
  by_id = {d.id: d for d in jax.devices()}
  return serialize_executable.deserialize_and_load(
      *serialized, execution_devices=[by_id[i] for i in device_ids])


def path_for(name: str, entry_key: str) -> Optional[str]:
  base = folder()
  return os.path.join(base, f"{name}-{entry_key}.bin") if base else None


def save(path: str, payload: Any) -> None:
  """Writes `payload` (a picklable tree; `Compiled` executables serialized) to `path`,
  atomically."""
  with io.BytesIO() as buffer:
    _Pickler(buffer, protocol=pickle.HIGHEST_PROTOCOL).dump(payload)
    data = buffer.getvalue()
  os.makedirs(os.path.dirname(path), exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".tmp-")
  try:
    with os.fdopen(fd, "wb") as f:
      f.write(_MAGIC + hashlib.sha256(data).digest() + data)
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise


def load(path: str) -> Any:
  """The payload saved at `path`, or None when there is none.

  Raises:
    ValueError: the file is not a whole entry (truncated, corrupt, another format).
  """
  try:
    with open(path, "rb") as f:
      data = f.read()
  except FileNotFoundError:
    return None
  head = len(_MAGIC) + 32
  if len(data) < head or not data.startswith(_MAGIC):
    raise ValueError("not an entry of this format")
  if hashlib.sha256(data[head:]).digest() != data[len(_MAGIC):head]:
    raise ValueError("checksum mismatch (corrupt or truncated)")
  unpickler = _Unpickler(io.BytesIO(data[head:]))
  payload = unpickler.load()
  # XLA's deserialization releases the GIL: the executables load side by side (a DINO-R50
  # split step's two: 8.9-9.9 s instead of 14.7-16.0 s one after the other, 2-core CPU,
  # docs/benchmarks_split_step.md).
  with concurrent.futures.ThreadPoolExecutor(max(1, len(unpickler.pending))) as pool:
    executables = list(pool.map(lambda args: _deserialize(*args), unpickler.pending))
  return jax.tree.map(lambda x: executables[x.index] if isinstance(x, _Deferred) else x,
                      payload, is_leaf=lambda x: isinstance(x, _Deferred))


def discard(path: str) -> None:
  try:
    os.remove(path)
  except OSError:
    pass
  logging.debug("executable_cache: removed %s", path)


@contextlib.contextmanager
def jax_cache_hits():
  """Yields a list that gets one entry per JAX persistent-cache hit while the block runs."""
  hits = []

  def listener(event, **kwargs):
    del kwargs
    if event == "/jax/compilation_cache/cache_hits":
      hits.append(event)

  jax.monitoring.register_event_listener(listener)
  try:
    yield hits
  finally:
    jax.monitoring.unregister_event_listener(listener)


def keep_if_fresh(path: str, payload: Any, hits: list, name: str) -> bool:
  """Saves `payload` unless JAX's cache served part of it (`hits`, see the module doc); a
  failure to save is one warning. Returns whether it was saved."""
  if hits:
    logging.info("executable_cache: %s not kept (loaded from JAX's compilation cache, which "
                 "XLA:CPU cannot re-serialize whole).", name)
    return False
  try:
    save(path, payload)
    return True
  except Exception as e:  # pylint: disable=broad-except
    logging.warning("executable_cache: %s not kept in the cache (%s: %s).", name,
                    type(e).__name__, e)
    return False


def load_usable(path: str, name: str, check: Callable[[Any], Any] = lambda payload: payload
                ) -> Any:
  """`check(load(path))`, or None where there is no entry or it cannot be used (unreadable,
  corrupt, or `check` raises): then one warning naming `name` and the file, and the entry is
  removed so that the caller's fresh compile replaces it."""
  try:
    payload = load(path)
    return None if payload is None else check(payload)
  except Exception as e:  # pylint: disable=broad-except
    logging.warning("executable_cache: cached %s in %s not used (%s: %s); compiling.", name,
                    path, type(e).__name__, e)
    discard(path)
    return None


def compiled(name: str, key_parts: Any, jitted, *args) -> Any:
  """`jitted.lower(*args).compile()`, kept in this cache under `key_parts` + the arguments'
  layout (+ `environment()`); loaded without tracing when there. The cache off (no JAX cache
  folder) or `key_parts` None: compiled as usual. `key_parts` must determine `jitted`."""
  path = None
  if key_parts is not None and folder() is not None:
    path = path_for(name, key(name, key_parts, arguments_layout(args)))
    loaded = load_usable(path, name)
    if loaded is not None:
      return loaded
  with jax_cache_hits() as hits:
    result = jitted.lower(*args).compile()
  if path is not None:
    keep_if_fresh(path, result, hits, name)
  return result
