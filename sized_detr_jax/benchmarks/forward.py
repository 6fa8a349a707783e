r"""Forward-pass time of the detector (inference, no denoising) on the default JAX device.

  python -m sized_detr_jax.benchmarks.forward                       # DINO-4scale R50, 800x1333
  python -m sized_detr_jax.benchmarks.forward --config_arg=tiny --height=256 --width=256
  python -m sized_detr_jax.benchmarks.forward --dtype=bfloat16 --train   # + denoising queries

Params are random (shapes from `jax.eval_shape`, values from numpy), which avoids compiling the
initialisers; timing does not depend on the values except through which encoder tokens the
top-Q selection picks. Prints compile time and the median / min of `--repeats` runs.
"""
import argparse
import os
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from sized_detr_jax import config_lib
from sized_detr_jax.models import dino
from sized_detr_jax.models.testing import random_params

_CONFIG = "dino_r50"


def main(argv=None):
  parser = argparse.ArgumentParser(description="DINO forward benchmark")
  parser.add_argument("--config", default=_CONFIG)
  parser.add_argument("--config_arg", default="")
  parser.add_argument("--height", type=int, default=800)
  parser.add_argument("--width", type=int, default=1333)
  parser.add_argument("--batch", type=int, default=1)
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--dtype", default=None, help="override config.model.dtype")
  parser.add_argument("--msda", default=None,
                      help="override config.model.msda_implementation (msda.IMPLEMENTATIONS)")
  parser.add_argument("--train", action="store_true",
                      help="training forward with denoising queries (10 boxes per image)")
  args = parser.parse_args(argv)

  config = config_lib.load_config(args.config, args.config_arg or None)
  if args.dtype:
    config.model.dtype = args.dtype
  if args.msda:
    config.model.msda_implementation = args.msda
  config = config_lib.finalize(config)
  model = dino.build_dino(config.model)
  b, h, w = args.batch, args.height, args.width
  images = jnp.asarray(np.random.default_rng(0).normal(size=(b, h, w, 3)), jnp.float32)
  mask = jnp.ones((b, h, w), bool)
  shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), images, mask)["params"]
  params = random_params(shapes, seed=0)
  g = 10
  targets = {"boxes": jnp.full((b, g, 4), 0.3), "labels": jnp.zeros((b, g), jnp.int32),
             "valid": jnp.ones((b, g), bool)}

  @jax.jit
  def forward(params, images, mask, key):
    if args.train:
      return model.apply({"params": params}, images, mask, targets, train=True,
                         rngs={"dn": key})
    return model.apply({"params": params}, images, mask)

  key = jax.random.PRNGKey(1)
  start = time.perf_counter()
  compiled = forward.lower(params, images, mask, key).compile()
  compile_s = time.perf_counter() - start
  times = []
  for _ in range(args.repeats):
    start = time.perf_counter()
    jax.block_until_ready(compiled(params, images, mask, key))
    times.append(time.perf_counter() - start)
  device = jax.devices()[0]
  print(f"forward: {device.platform} ({device.device_kind}), config "
        f"{os.path.basename(args.config)}:{args.config_arg or 'full'}, dtype "
        f"{config.model.dtype}, msda {config.model.msda_implementation}, "
        f"{'train+dn' if args.train else 'inference'}, "
        f"batch {b} x {h}x{w}")
  print(f"compile_s: {compile_s:.1f}")
  print(f"forward_s: median {statistics.median(times):.3f} min {min(times):.3f} "
        f"({args.repeats} runs)")


if __name__ == "__main__":
  main()
