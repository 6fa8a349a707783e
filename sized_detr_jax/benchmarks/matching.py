r"""Cost of DINO's Hungarian matching and of the whole criterion, L1 vs Sized L1.

  python -m sized_detr_jax.benchmarks.matching [--reps 10]
  python -m sized_detr_jax.benchmarks.matching --host_table [--reps 20]
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

--host_table instead prints the host solve alone (`matching._solve_on_host` on a ready numpy
cost, what one callback does) for 6 layers x 8 images x 900 queries x {7, 30, 100} valid ground
truth, on 1, 2 and all host threads, for the full [Q, G] cost and for the pruned candidates of
`hungarian_matching(prune=True)` (each column's G cheapest queries: [G, G] costs + indices;
their optimal totals are checked equal; MiB = what the host receives), and whether scipy's solver releases the GIL (how fast a
Python loop in the main thread runs while another thread solves, relative to when it is idle:
~0% if the GIL were held, 50-100% if released).
"""
import argparse
import functools
import os
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from scipy import optimize

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


def _python_loop_rate(seconds):
  """Iterations per second of a bare Python loop over `seconds`."""
  count, end = 0, time.perf_counter() + seconds
  while time.perf_counter() < end:
    count += 1
  return count / seconds


def gil_released_fraction(size=1500):
  """Main-thread Python speed while a thread runs linear_sum_assignment, over idle speed."""
  cost = np.random.default_rng(0).uniform(size=(size, size))
  start = time.perf_counter()
  optimize.linear_sum_assignment(cost)
  solve = time.perf_counter() - start
  idle = _python_loop_rate(min(solve, 1.0) / 2)
  worker = threading.Thread(target=optimize.linear_sum_assignment, args=(cost,))
  worker.start()
  busy = _python_loop_rate(solve / 2)  # measured while the solve is surely still running
  worker.join()
  return busy / idle, solve


def matching_total(cost, matches):
  """Summed cost [..., Q, G] of matches [..., G] (all valid), in float64."""
  picked = np.take_along_axis(cost.astype(np.float64), matches[..., None, :], axis=-2)
  return picked.sum(axis=(-2, -1))


def host_table(args):
  """Prints the host solve time per callback for {7, 30, 100} valid GT on 1, 2, all threads."""
  cores = os.cpu_count() or 1
  thread_counts = sorted({1, 2, cores})
  fraction, solve = gil_released_fraction()
  print(f"GIL check: main-thread Python speed while a thread solves a 1500x1500 problem "
        f"({solve * 1e3:.0f} ms): {fraction * 100:.0f}% of idle")
  print(f"host solve of {args.layers} layers x {args.batch} images x {args.queries} queries "
        f"(median ms of {args.reps}, os.cpu_count()={cores}, load {os.getloadavg()[0]:.1f})")
  print(f"  {'valid GT':>8s} {'cost':>6s} {'MiB':>7s} "
        + " ".join(f"{t:>6d} thr" for t in thread_counts) + "   vs full, 1 thread")
  keys = iter(jax.random.split(jax.random.key(1), 16))
  for num_gt in (7, 30, 100):
    logits = jax.random.normal(next(keys), (args.layers, args.batch, args.queries, args.classes))
    boxes = _boxes(next(keys), (args.layers, args.batch, args.queries))
    labels = jax.random.randint(next(keys), (args.batch, num_gt), 0, args.classes)
    gt_boxes = _boxes(next(keys), (args.batch, num_gt))
    valid = np.ones((args.batch, num_gt), bool)
    cost = np.asarray(jax.jit(matching.matching_cost)(logits, boxes, labels, gt_boxes, valid))

    values, indices = (np.asarray(x) for x in jax.jit(
        matching.candidate_queries, static_argnums=1)(cost, num_gt))

    def solve(threads, cost=cost, valid=valid):
      matching.set_host_workers(threads)
      return matching._solve_on_host(cost, valid)  # pylint: disable=protected-access

    def solve_pruned(threads, values=values, indices=indices, valid=valid):
      matching.set_host_workers(threads)
      return matching._solve_candidates_on_host(  # pylint: disable=protected-access
          values, indices, valid)

    first = solve(1)
    for threads in thread_counts:
      np.testing.assert_array_equal(solve(threads), first)
    pruned = solve_pruned(1)
    np.testing.assert_allclose(matching_total(cost, pruned), matching_total(cost, first),
                               rtol=1e-9)
    runs = {("full", t): functools.partial(solve, t) for t in thread_counts}
    runs.update({("pruned", t): functools.partial(solve_pruned, t) for t in thread_counts})
    times = time_interleaved(runs, reps=args.reps, warmup=1)
    for kind, sent in (("full", cost.nbytes), ("pruned", values.nbytes + indices.nbytes)):
      print(f"  {num_gt:8d} {kind:>6s} {sent / 2**20:7.2f} "
            + " ".join(f"{times[kind, t] * 1e3:10.1f}" for t in thread_counts)
            + f"   {times['full', 1] / times[kind, thread_counts[-1]]:8.2f}x")
  matching.set_host_workers(None)


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
  parser.add_argument("--host_table", action="store_true",
                      help="only the host solve: {7, 30, 100} GT on 1, 2 and all threads")
  args = parser.parse_args()
  if args.host_table:
    host_table(args)
    return

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
