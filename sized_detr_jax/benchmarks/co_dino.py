r"""Step-time overhead of Co-DINO's auxiliary heads and positive queries over the same DINO.

  python -m sized_detr_jax.benchmarks.co_dino                        # synthetic-size model, 192 px
  python -m sized_detr_jax.benchmarks.co_dino --config_arg=smoke --size=64 --batch=4

Times the jitted loss + gradient (forward, assignments, criterion with the host Hungarian
matching, backward; the optimiser update is the same for both and left out) of
experiments/co_dino.py:<config_arg> with its auxiliary heads and with `co_dino.heads = ()`
(the identical 5-scale DINO), interleaved (`benchmarks.timing.time_interleaved`). Random params
and a fixed batch of `--boxes` ground-truth boxes per image. Prints compile and median step
times and the ratio.
"""
import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from sized_detr_jax import co_dino
from sized_detr_jax import config_lib
from sized_detr_jax import state as state_lib
from sized_detr_jax.benchmarks.timing import time_interleaved
from sized_detr_jax.models.testing import random_params

_CONFIG = "co_dino"


def _batch(batch, size, boxes, seed=0):
  rng = np.random.default_rng(seed)
  images = jnp.asarray(rng.normal(size=(batch, size, size, 3)), jnp.float32)
  mask = jnp.ones((batch, size, size), bool)
  cxcy = rng.uniform(0.2, 0.8, (batch, boxes, 2))
  wh = rng.uniform(0.03, 0.4, (batch, boxes, 2))
  targets = {"boxes": jnp.asarray(np.concatenate([cxcy, wh], -1), jnp.float32),
             "labels": jnp.asarray(rng.integers(0, 4, (batch, boxes)), jnp.int32),
             "valid": jnp.ones((batch, boxes), bool)}
  return images, mask, targets


def _step_fn(config, images, mask, targets):
  """(jitted loss+grad closure, params) for one config."""
  method = co_dino.build(config)
  model = method.model
  shapes = jax.eval_shape(model.init, {"params": jax.random.PRNGKey(0),
                                       "dn": jax.random.PRNGKey(0)}, images, mask)["params"]
  params = random_params(shapes, seed=0)

  batch = {"image": images, "pixel_mask": mask, **targets}
  loss_fn = method.loss_fn(1)
  state = state_lib.TrainState(step=0, params=None, model_state={}, opt_state=None, rng=None)
  grad = jax.jit(jax.value_and_grad(lambda p, key: loss_fn(p, state, batch, key)[0]))
  return grad, params


def main(argv=None):
  parser = argparse.ArgumentParser(description="Co-DINO vs DINO train-step time")
  parser.add_argument("--config_arg", default="synthetic")
  parser.add_argument("--size", type=int, default=192)
  parser.add_argument("--batch", type=int, default=2)
  parser.add_argument("--boxes", type=int, default=8)
  parser.add_argument("--reps", type=int, default=5)
  args = parser.parse_args(argv)
  images, mask, targets = _batch(args.batch, args.size, args.boxes)
  calls, compile_s = {}, {}
  for name, heads in (("dino", ()), ("co_dino", None)):
    config = config_lib.load_config(_CONFIG, args.config_arg)
    if heads is not None:
      config.co_dino.heads = heads
    config = config_lib.finalize(config)
    fn, params = _step_fn(config, images, mask, targets)
    key = jax.random.PRNGKey(1)
    start = time.perf_counter()
    jax.block_until_ready(fn(params, key))
    compile_s[name] = time.perf_counter() - start
    calls[name] = (lambda f, p: lambda: f(p, key))(fn, params)
  times = time_interleaved(calls, reps=args.reps, warmup=1)
  print(f"experiments/co_dino.py:{args.config_arg}, batch {args.batch} x {args.size}x{args.size},"
        f" {args.boxes} boxes/image, device {jax.devices()[0].platform}")
  for name in calls:
    print(f"  {name:8s} compile {compile_s[name]:7.1f} s   "
          f"loss+grad median {times[name] * 1e3:9.1f} ms")
  print(f"  Co-DINO / DINO step time: {times['co_dino'] / times['dino']:.2f}x")


if __name__ == "__main__":
  main()
