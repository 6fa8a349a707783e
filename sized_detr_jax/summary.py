"""Parameter summary of the configured detector, without allocating it (`--mode=summary`).

  python run.py --config=experiments/dino_r50.py --mode=summary

Shapes come from `jax.eval_shape(model.init, ...)`, so even the full model costs no memory and
no compile. Counts follow PyTorch's `model.parameters()`: frozen BatchNorm statistics (which
DINO keeps as buffers, and this code stores in `params` under stop_gradient) are reported
separately. DINO-4scale R50 has 46,893,182 parameters, 46,670,782 trainable.
"""
import math
from typing import Dict

import jax
import jax.numpy as jnp
import numpy as np

from sized_detr_jax.models import dino

_BN_STATS = ("scale", "bias", "mean", "var")


def _module_key(keys):
  """Breakdown bucket of a parameter path."""
  top = keys[0]
  if top == "backbone":
    stage = keys[1].split("_")[0]
    return "backbone/" + ("stem" if stage in ("conv1", "bn1") else stage)
  if top == "transformer":
    sub = keys[1]
    if sub.startswith("encoder_layers_"):
      return "transformer/encoder_layers"
    if sub.startswith("decoder_layers_"):
      return "transformer/decoder_layers"
    return "transformer/" + sub
  if top.startswith("input_proj_"):
    return "input_proj"
  return top


def _example_side(num_queries):
  """Smallest multiple of 64 whose stride-8 map alone has >= num_queries tokens."""
  return 64 * max(1, math.ceil(8 * math.sqrt(num_queries) / 64))


def count_params(model) -> Dict[str, object]:
  """Parameter counts of a `dino.DINO` from its abstract init (no memory, no compile)."""
  side = _example_side(model.num_queries)
  images = jax.ShapeDtypeStruct((1, side, side, 3), jnp.float32)
  mask = jax.ShapeDtypeStruct((1, side, side), jnp.bool_)
  shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), images, mask)["params"]
  labels = jax.tree.leaves(dino.param_labels(shapes))
  leaves = jax.tree_util.tree_flatten_with_path(shapes)[0]
  counts = {"params": 0, "trainable": 0, "frozen_bn_statistics": 0}
  modules: Dict[str, int] = {}
  for (path, leaf), label in zip(leaves, labels):
    keys = [getattr(k, "key", str(k)) for k in path]
    n = int(np.prod(leaf.shape))
    if keys[0] == "backbone" and keys[-1] in _BN_STATS:
      counts["frozen_bn_statistics"] += n
      continue
    counts["params"] += n
    counts["trainable"] += 0 if label == "frozen" else n
    bucket = _module_key(keys)
    modules[bucket] = modules.get(bucket, 0) + n
  counts["modules"] = dict(sorted(modules.items()))
  return counts


def summarize(config) -> Dict[str, object]:
  """Prints `params: N` and a per-module breakdown for `config.model`; returns the counts.

  Args:
    config: experiment ConfigDict with a `model` section (experiments/dino_r50.py).

  Returns:
    dict with params (PyTorch-comparable count), trainable, frozen_bn_statistics and
    modules ({bucket: count}).
  """
  model = dino.build_dino(config.model)
  counts = count_params(model)
  print(f"params: {counts['params']}")
  print(f"trainable: {counts['trainable']}")
  print(f"frozen_bn_statistics: {counts['frozen_bn_statistics']} (constants, not counted)")
  width = max(len(k) for k in counts["modules"])
  for name, n in counts["modules"].items():
    print(f"  {name:<{width}}  {n:>12,}")
  return counts
