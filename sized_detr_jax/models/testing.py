"""Cheap random parameters for tests and benchmarks.

Compiling a Flax `init` costs ~10-40 s on CPU (every initialiser draws through the PRNG), so
tests and benchmarks build the params *shapes* with `jax.eval_shape` and fill them from numpy.
Frozen BatchNorm variances are kept positive.
"""
import jax
import jax.numpy as jnp
import numpy as np


def random_params(shapes, seed=0, scale=1.0):
  """Fills a pytree of `jax.ShapeDtypeStruct` with fan-in-scaled normal values.

  Args:
    shapes: params pytree of ShapeDtypeStruct (e.g. `jax.eval_shape(model.init, ...)["params"]`).
    seed: numpy seed.
    scale: multiplier of the standard deviation 1/sqrt(fan_in).

  Returns:
    Pytree of float32 jax arrays with the same structure.
  """
  rng = np.random.default_rng(seed)

  def fill(path, leaf):
    name = getattr(path[-1], "key", "")
    if name == "var":
      return jnp.asarray(rng.uniform(0.5, 2.0, leaf.shape), leaf.dtype)
    if name == "scale":
      return jnp.asarray(1 + 0.1 * rng.normal(size=leaf.shape), leaf.dtype)
    fan_in = int(np.prod(leaf.shape[:-1])) if len(leaf.shape) > 1 else 16
    return jnp.asarray(scale * rng.normal(size=leaf.shape) / np.sqrt(fan_in), leaf.dtype)

  return jax.tree_util.tree_map_with_path(fill, shapes)
