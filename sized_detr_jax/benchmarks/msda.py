r"""MSDA sampling alone: the XLA gather vs the Pallas kernel, forward and forward+backward.

  python -m sized_detr_jax.benchmarks.msda                     # DINO-4scale at 800x1333, GPU
  python -m sized_detr_jax.benchmarks.msda --dtype=bfloat16 --batch=8
  python -m sized_detr_jax.benchmarks.msda --height=64 --width=64 --reps=2   # CPU smoke

Shapes are one DINO-4scale R50 image batch: 4 levels at strides 8/16/32/64 of the padded
image, 8 heads of d = 32, 4 points; "encoder" has one query per token (Q = S), "decoder" has
900 queries + 200 denoising queries. Prints the median milliseconds of each implementation
(`time_interleaved`), and the largest output/gradient difference between the two.
"""
import argparse
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from sized_detr_jax.benchmarks.timing import time_interleaved
from sized_detr_jax.models import msda


def _level_shapes(height, width, levels=4):
  """(H_l, W_l) of the backbone levels (strides 8, 16, 32) plus the extra stride-64 level."""
  shapes = []
  h, w = height, width
  for _ in range(levels):
    h, w = math.ceil(h / (8 if not shapes else 2)), math.ceil(w / (8 if not shapes else 2))
    shapes.append((h, w))
  return tuple(shapes)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--height", type=int, default=800)
  parser.add_argument("--width", type=int, default=1333)
  parser.add_argument("--batch", type=int, default=2)
  parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
  parser.add_argument("--reps", type=int, default=20)
  parser.add_argument("--impls", default="gather,pallas")
  args = parser.parse_args(argv)

  shapes = _level_shapes(args.height, args.width)
  s = sum(h * w for h, w in shapes)
  heads, d, points = 8, 32, 4
  dtype = jnp.dtype(args.dtype)
  impls = args.impls.split(",")
  print(f"backend={jax.default_backend()} device={jax.devices()[0].device_kind} "
        f"levels={shapes} S={s} batch={args.batch} dtype={args.dtype} (median ms)")
  rng = np.random.default_rng(0)
  for name, q in (("encoder", s), ("decoder", 1100)):
    value = jnp.asarray(rng.normal(size=(args.batch, s, heads, d)), dtype)
    loc = jnp.asarray(rng.uniform(-0.05, 1.05, size=(args.batch, q, heads, 4, points, 2)),
                      jnp.float32)
    attn = jax.nn.softmax(jnp.asarray(rng.normal(size=(args.batch, q, heads, 4 * points))),
                          -1).reshape(args.batch, q, heads, 4, points).astype(dtype)
    cotangent = jnp.asarray(rng.normal(size=(args.batch, q, heads * d)), dtype)

    def run(impl, backward):
      fn = lambda v, l, a: msda.multi_scale_deformable_attention(v, shapes, l, a,
                                                                 implementation=impl)
      if not backward:
        return jax.jit(fn)
      return jax.jit(lambda v, l, a, g: jax.vjp(fn, v, l, a)[1](g))

    calls, results = {}, {}
    for impl in impls:
      forward, backward = run(impl, False), run(impl, True)
      calls[f"{impl} fwd"] = functools.partial(forward, value, loc, attn)
      calls[f"{impl} fwd+bwd"] = functools.partial(
          lambda f, b, *a: (f(*a[:3]), b(*a)), forward, backward, value, loc, attn, cotangent)
      results[impl] = (forward(value, loc, attn), backward(value, loc, attn, cotangent))
    times = time_interleaved(calls, reps=args.reps, warmup=1)
    print(f"  {name} Q={q}: " + "  ".join(f"{k} {v * 1e3:.2f}" for k, v in times.items()))
    if len(impls) == 2:
      a, b = (jax.tree.leaves(results[i]) for i in impls)
      diffs = [float(jnp.max(jnp.abs(x.astype(jnp.float32) - y.astype(jnp.float32))))
               for x, y in zip(a, b)]
      print(f"    max |{impls[0]} - {impls[1]}| out, d value, d loc, d attn: "
            + ", ".join(f"{x:.2e}" for x in diffs))


if __name__ == "__main__":
  main()
