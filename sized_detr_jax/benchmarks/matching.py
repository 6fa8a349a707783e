r"""Cost of DINO's Hungarian matching and of the whole criterion, L1 vs Sized L1.

  python -m sized_detr_jax.benchmarks.matching [--reps 10]
  XLA_FLAGS=--xla_force_host_platform_device_count=4 python -m sized_detr_jax.benchmarks.matching

Shapes follow one DINO-4scale step: 6 decoder layers (plus the encoder proposals for the
criterion), batch 8, 900 queries, 91 classes, 100 valid ground-truth boxes per image. Figures:
  * cost: the [6, 8, 900, 100] matching cost on device (jitted);
  * host solve: scipy on that cost array, called directly (48 problems);
  * matching: cost + `hungarian_matching` in one jitted call (one host call);
  * matching sharded: the same with the batch split over all devices (one host call each),
    when there are several accelerators (on a multi-device CPU only with --sharded_on_cpu, see
    the deadlock note in sized_detr_jax/matching.py);
  * criterion l1 / sized_l1: `dino_criterion` (matching of 7 branches + all losses, forward and
    backward w.r.t. the predictions), and their ratio.
"""
import argparse
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from sized_detr_jax import criterion
from sized_detr_jax import matching
from sized_detr_jax.benchmarks.timing import time_interleaved


def _boxes(key, shape):
  k1, k2 = jax.random.split(key)
  return jnp.concatenate([jax.random.uniform(k1, shape + (2,), minval=0.2, maxval=0.8),
                          jax.random.uniform(k2, shape + (2,), minval=0.01, maxval=0.4)], -1)


def _branch(key, batch, queries, classes):
  k1, k2 = jax.random.split(key)
  return {"pred_logits": jax.random.normal(k1, (batch, queries, classes)),
          "pred_boxes": _boxes(k2, (batch, queries))}


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--reps", type=int, default=10)
  parser.add_argument("--layers", type=int, default=6)
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--queries", type=int, default=900)
  parser.add_argument("--gt", type=int, default=100)
  parser.add_argument("--classes", type=int, default=91)
  parser.add_argument("--sharded_on_cpu", action="store_true",
                      help="also time the sharded call on forced CPU devices (may deadlock)")
  args = parser.parse_args()

  keys = iter(jax.random.split(jax.random.key(0), args.layers + 8))
  b, q, g, c = args.batch, args.queries, args.gt, args.classes
  targets = {"boxes": _boxes(next(keys), (b, g)),
             "labels": jax.random.randint(next(keys), (b, g), 0, c),
             "valid": jnp.ones((b, g), bool),
             "orig_size": jnp.full((b, 2), 800, jnp.int32)}
  layers = [_branch(next(keys), b, q, c) for _ in range(args.layers)]
  outputs = dict(layers[-1], aux_outputs=layers[:-1], interm_outputs=_branch(next(keys), b, q, c))
  logits = jnp.stack([x["pred_logits"] for x in layers])
  boxes = jnp.stack([x["pred_boxes"] for x in layers])

  cost_fn = jax.jit(lambda lg, bx, t: matching.matching_cost(
      lg, bx, t["labels"], t["boxes"], t["valid"]))
  match_fn = jax.jit(lambda lg, bx, t: matching.hungarian_matching(
      cost_fn(lg, bx, t), t["valid"]))
  cost = cost_fn(logits, boxes, targets)
  cost_host, valid_host = np.asarray(cost), np.asarray(targets["valid"])

  def criterion_grad(bbox_loss):
    cfg = criterion.CriterionConfig(bbox_loss=bbox_loss)
    loss = lambda o: criterion.dino_criterion(o, targets, cfg)["loss"]
    return functools.partial(jax.jit(jax.value_and_grad(loss)), outputs)

  calls = {
      "cost": functools.partial(cost_fn, logits, boxes, targets),
      "host solve": lambda: matching._solve_on_host(cost_host, valid_host),
      "matching": functools.partial(match_fn, logits, boxes, targets),
      "criterion l1": criterion_grad("l1"),
      "criterion sized_l1": criterion_grad("sized_l1"),
  }
  devices = jax.device_count()
  on_cpu = jax.default_backend() == "cpu"
  if devices > 1 and b % devices == 0 and (args.sharded_on_cpu or not on_cpu):
    mesh = jax.make_mesh((devices,), ("data",))
    put = lambda x, axis: jax.device_put(x, NamedSharding(mesh, P(*([None] * axis), "data")))
    sharded_fn = jax.jit(lambda lg, bx, t: matching.hungarian_matching(
        cost_fn(lg, bx, t), t["valid"], mesh=mesh))
    args_sharded = (put(logits, 1), put(boxes, 1), jax.tree.map(lambda x: put(x, 0), targets))
    calls[f"matching sharded x{devices}"] = functools.partial(sharded_fn, *args_sharded)

  print(f"backend={jax.default_backend()} device={jax.devices()[0].device_kind} "
        f"devices={devices} cost={cost.shape} classes={c} reps={args.reps} (median ms)")
  times = time_interleaved(calls, reps=args.reps, warmup=2)
  for name, seconds in times.items():
    print(f"  {name:24s} {seconds * 1e3:9.2f}")
  print(f"  sized_l1 / l1 criterion  {times['criterion sized_l1'] / times['criterion l1']:9.3f}")
  print(f"  matching / criterion l1  {times['matching'] / times['criterion l1']:9.3f}")


if __name__ == "__main__":
  main()
