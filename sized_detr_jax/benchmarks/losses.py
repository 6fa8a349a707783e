r"""Cost of Sized L1 next to L1, alone and inside a DINO-sized loss, in one run.

  python -m sized_detr_jax.benchmarks.losses [--reps 50]

Shapes follow one DINO step: 7 prediction sets (6 decoder layers + encoder proposals), batch 8,
100 matched ground-truth pairs per image for the box losses, 900 queries x 91 classes for the
focal loss. "criterion" = focal over all queries + box loss + GIoU over matched pairs, forward and
backward, which is what a train step pays. Ratios are Sized L1 time / L1 time on the same arrays.
"""
import argparse
import functools

import jax
import jax.numpy as jnp

from sized_detr_jax import losses
from sized_detr_jax.benchmarks.timing import time_interleaved


def _criterion_like(box_loss, logits, onehot, pred, target, valid):
  cls = jnp.sum(losses.sigmoid_focal_loss(logits, onehot))
  return cls + 5.0 * jnp.sum(box_loss(pred, target, valid)) + 2.0 * jnp.sum(
      losses.giou_loss(pred, target, valid))


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--reps", type=int, default=50)
  parser.add_argument("--layers", type=int, default=7)
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--gt", type=int, default=100)
  parser.add_argument("--queries", type=int, default=900)
  parser.add_argument("--classes", type=int, default=91)
  args = parser.parse_args()

  keys = jax.random.split(jax.random.key(0), 4)
  box_shape = (args.layers, args.batch, args.gt)
  target = jnp.concatenate([jax.random.uniform(keys[0], box_shape + (2,), minval=0.2, maxval=0.8),
                            jax.random.uniform(keys[1], box_shape + (2,), minval=0.01, maxval=0.4)], -1)
  pred = jnp.clip(target + 0.03 * jax.random.normal(keys[2], target.shape), 1e-3, 1.0)
  valid = jax.random.uniform(keys[3], box_shape) < 0.8
  logits = jax.random.normal(keys[0], (args.layers, args.batch, args.queries, args.classes))
  onehot = (jax.random.uniform(keys[1], logits.shape) < 0.001).astype(jnp.float32)

  variants = {
      "l1": losses.l1_loss,
      "sized_l1": losses.sized_l1_loss,
      "sized_l1_rescale": functools.partial(losses.sized_l1_loss, rescale=True),
  }
  print(f"backend={jax.default_backend()} device={jax.devices()[0].device_kind} "
        f"boxes={box_shape} logits={logits.shape} reps={args.reps} (median ms)")
  calls = {}
  for name, fn in variants.items():
    alone = jax.jit(lambda p, t, v, fn=fn: jnp.sum(fn(p, t, v)))
    alone_grad = jax.jit(jax.value_and_grad(lambda p, t, v, fn=fn: jnp.sum(fn(p, t, v))))
    crit_grad = jax.jit(jax.value_and_grad(functools.partial(_criterion_like, fn), argnums=(0, 2)))
    calls[(name, 0)] = functools.partial(alone, pred, target, valid)
    calls[(name, 1)] = functools.partial(alone_grad, pred, target, valid)
    calls[(name, 2)] = functools.partial(crit_grad, logits, onehot, pred, target, valid)
  times = time_interleaved(calls, reps=args.reps)
  results = {name: tuple(times[(name, i)] for i in range(3)) for name in variants}
  base = results["l1"]
  print(f"{'loss':18s} {'fwd ms':>9s} {'fwd+bwd ms':>11s} {'criterion fwd+bwd ms':>21s} "
        f"{'ratio fwd':>10s} {'ratio f+b':>10s} {'ratio crit':>11s}")
  for name, (f, fb, crit) in results.items():
    print(f"{name:18s} {f * 1e3:9.3f} {fb * 1e3:11.3f} {crit * 1e3:21.3f} "
          f"{f / base[0]:10.3f} {fb / base[1]:10.3f} {crit / base[2]:11.3f}")


if __name__ == "__main__":
  main()
