r"""Speed of the real jitted train step (forward, matching, criterion, backward, AdamW).

  python -m sized_detr_jax.benchmarks.train_step            # experiments/synthetic.py, its bucket
  python -m sized_detr_jax.benchmarks.train_step --config=experiments/dino_r50.py \
      --size=800x1333 --batch=1 --steps=3                  # full DINO-4scale R50
  python -m sized_detr_jax.benchmarks.train_step --set=model.dec_layers=3 --set=data.batch_size=4

Runs with run.py's process settings (`host_runtime.configure`; SIZED_DETR_HOST_RUNTIME=0
turns them off). Builds the step exactly as training does (`state.init_state` +
`train.make_train_step` on a 1-device ("data",) mesh, or `--devices`), feeds one fixed batch
of random pixels with `--boxes` ground-truth boxes per image, and prints the compile time, the
median seconds per step over `--steps` steps (after one untimed step) and images per second.
The image is padded to `--size` (default: the config's smallest bucket, i.e. the padded shape
of a training batch).

The step is also split, timed in alternation with it:
  * forward: the jitted loss alone (model forward + criterion with its host matching);
  * backward + update: step - forward (backward pass, optimiser, EMA);
  * matching callback: host seconds inside the step's Hungarian callback (the scipy solves,
    measured around the host function; the device-to-host copy of the cost is not in it), and
    its share of the step;
plus memory (the compiled step's argument / output / temporary bytes from XLA's memory
analysis; the device's peak bytes in use where it reports them, GPU/TPU; else the process's
peak RSS) and MFU: the compiled step's FLOPs (XLA cost analysis, which counts gathers and the
callback as zero) / step seconds / the device's dense bf16 peak (`PEAK_TFLOPS` by device kind,
or `--peak_tflops`).

For the split step (`config.split_step=True`): `--split_step` times it in alternation with the
one-executable step. For memory work without running a step: `--compile_only` prints the
compiled step's memory analysis and FLOPs; `--residuals N` the N largest groups of activations
kept for the backward pass (by shape and source line; tracing only). For compile-time work:
`--compile_profile` times tracing, lowering and XLA compilation apart and lists the compiler's
longest events (HLO passes, code generation). For speed work: `--profile N` traces N more steps
and prints the step's time per HLO op category, source line and op (`op_profile`).
"""
import argparse
import ast
import os
import re
import resource
import time

import jax
# saved_residuals (the data behind jax.ad_checkpoint.print_saved_residuals) is not public.
from jax._src import ad_checkpoint  # pylint: disable=g-direct-tensorflow-import
import jax.numpy as jnp
import numpy as np

from sized_detr_jax import config_lib
from sized_detr_jax import host_runtime
from sized_detr_jax import matching
from sized_detr_jax import methods
from sized_detr_jax import sharding
from sized_detr_jax import split_step
from sized_detr_jax import state as state_lib
from sized_detr_jax import train
from sized_detr_jax.benchmarks import op_profile
from sized_detr_jax.benchmarks.timing import time_interleaved
from sized_detr_jax.data import pipeline



def _literal(text):
  """A Python literal, else the text itself."""
  try:
    return ast.literal_eval(text)
  except (ValueError, SyntaxError):
    return text


def _apply_override(config, assignment):
  """`a.b.c=value` (value a Python literal, else a string) onto a ConfigDict."""
  key, sep, text = assignment.partition("=")
  if not sep:
    raise ValueError(f"--set expects key=value, got {assignment!r}")
  value = _literal(text)
  *parents, leaf = key.split(".")
  node = config
  for name in parents:
    node = node[name]
  if leaf not in node:
    raise ValueError(f"--set {key}: no field {leaf!r}; known: {sorted(node.keys())}")
  node[leaf] = value


# Dense bf16 peak TFLOP/s per device, by (a substring of) jax's device_kind, from the vendors'
# data sheets (SXM parts; sparsity not counted).
PEAK_TFLOPS = (("H200", 989.0), ("H100", 989.0), ("A100", 312.0), ("L4", 121.0),
               ("TPU v6", 918.0), ("TPU v5p", 459.0), ("TPU v5 lite", 197.0),
               ("TPU v5e", 197.0), ("TPU v4", 275.0))


def peak_tflops(device_kind):
  """The dense bf16 peak of a device kind, or None when unknown (CPUs)."""
  for name, tflops in PEAK_TFLOPS:
    if name.lower() in device_kind.lower():
      return tflops
  return None


class CallbackTimer:
  """Accumulates the host seconds spent in the Hungarian solvers (both forms) while active.

  The callbacks look the solvers up at call time, so wrapping the module attributes counts
  every host call of already compiled functions.
  """
  _NAMES = ("_solve_on_host", "_solve_candidates_on_host")

  def __init__(self):
    self.seconds = 0.0
    self.calls = 0
    self._real = {name: getattr(matching, name) for name in self._NAMES}
    for name, real in self._real.items():
      setattr(matching, name, self._timed(real))

  def _timed(self, real):
    def timed(*args):
      start = time.perf_counter()
      try:
        return real(*args)
      finally:
        self.seconds += time.perf_counter() - start
        self.calls += 1
    return timed

  def close(self):
    for name, real in self._real.items():
      setattr(matching, name, real)


def compiled_flops(compiled):
  """FLOPs of a compiled executable by XLA's cost analysis (None when not reported)."""
  analysis = compiled.cost_analysis()
  if isinstance(analysis, (list, tuple)):
    analysis = analysis[0] if analysis else None
  flops = (analysis or {}).get("flops")
  return float(flops) if flops else None


def peak_memory(device):
  """('device peak', bytes) where the device reports it, else ('process peak RSS', bytes)."""
  stats = device.memory_stats() or {}
  if "peak_bytes_in_use" in stats:
    return "device peak", int(stats["peak_bytes_in_use"])
  return "process peak RSS", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def residual_groups(fn, params):
  """Activations `jax.grad(fn)` keeps from forward to backward, grouped.

  Returns:
    (total bytes, [(bytes, count, shape, source) ...] largest first), grouped by shape and
    source line (`jax.ad_checkpoint` saved residuals, before XLA fuses or reuses anything).
  """
  groups, total = {}, 0
  for aval, source in ad_checkpoint.saved_residuals(fn, params):
    size = int(np.prod(aval.shape)) * np.dtype(aval.dtype).itemsize
    total += size
    source = re.sub(r"^.*/(sized_detr_jax|flax|jax)/", r"\1/", source.split(" from ")[-1])
    key = (aval.str_short(), source)
    count, bytes_ = groups.get(key, (0, 0))
    groups[key] = (count + 1, bytes_ + size)
  rows = sorted(((b, c, shape, src) for (shape, src), (c, b) in groups.items()), reverse=True)
  return total, rows


def print_residuals(fn, params, top):
  total, rows = residual_groups(fn, params)
  print(f"saved residuals: {total / 2**30:.2f} GiB in {sum(r[1] for r in rows)} arrays; "
        f"the {top} largest groups:")
  for size, count, shape, source in rows[:top]:
    print(f"  {size / 2**20:9.1f} MiB  {count:3d} x {shape:28s} {source}")


def random_batch(batch, height, width, max_boxes, num_boxes, seed=0):
  """A training batch (data contract, numpy): random pixels, `num_boxes` valid random boxes.

  Returns:
    dict of image f32 [B, H, W, 3], pixel_mask bool [B, H, W] (all real), boxes f32 [B, G, 4]
    normalised cxcywh, labels i32 [B, G] (class 0..3), valid bool [B, G], image_id i32 [B],
    orig_size / size i32 [B, 2] = (H, W).
  """
  rng = np.random.default_rng(seed)
  g, n = max_boxes, min(num_boxes, max_boxes)
  wh = rng.uniform(0.05, 0.4, (batch, g, 2))
  centre = rng.uniform(wh / 2, 1 - wh / 2)
  valid = np.zeros((batch, g), bool)
  valid[:, :n] = True
  hw = np.tile(np.array([[height, width]], np.int32), (batch, 1))
  return {"image": rng.normal(size=(batch, height, width, 3)).astype(np.float32),
          "pixel_mask": np.ones((batch, height, width), bool),
          "boxes": np.where(valid[..., None], np.concatenate([centre, wh], -1), 0.0
                            ).astype(np.float32),
          "labels": rng.integers(0, 4, (batch, g)).astype(np.int32), "valid": valid,
          "image_id": np.arange(batch, dtype=np.int32), "orig_size": hw, "size": hw}


def build_state(config, mesh, abstract=False):
  """The method, optimiser and TrainState of a finalised config, as training builds them.

  Returns:
    (method, tx, schedule, state, state shardings). The state is initialised on `mesh`
    (`state.init_state`), or with `abstract` only its shapes (`jax.ShapeDtypeStruct`s: nothing
    is computed; enough to lower or compile a step).
  """
  method = methods.build(config)
  # Params do not depend on the image size: initialise at a small one (cheaper to compile)
  # that still has num_queries encoder tokens for the top-Q selection (strides 8 to 64).
  side = 64
  while sum((-(-side // 2 ** k)) ** 2 for k in range(3, 7)) < config.model.num_queries:
    side += 64
  example = {"image": jnp.zeros((1, side, side, 3), jnp.float32),
             "pixel_mask": jnp.ones((1, side, side), bool)}
  build = state_lib.abstract_state if abstract else state_lib.init_state
  state, shardings, tx, schedule = build(method, config, example, mesh)
  return method, tx, schedule, state, shardings


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--config", default="synthetic")
  parser.add_argument("--config_arg", default="")
  parser.add_argument("--size", default="", help="HxW padded image size (default: the "
                      "config's smallest bucket)")
  parser.add_argument("--batch", type=int, default=0, help="default: config.data.batch_size")
  parser.add_argument("--boxes", type=int, default=6, help="valid ground-truth boxes per image")
  parser.add_argument("--steps", type=int, default=10, help="timed steps")
  parser.add_argument("--devices", type=int, default=1)
  parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                      help="config override, e.g. model.dec_layers=3 (repeatable)")
  parser.add_argument("--compile_only", action="store_true",
                      help="compile the step and print its memory analysis and FLOPs only "
                      "(no step runs: cheap on a busy machine, deterministic figures)")
  parser.add_argument("--compare_option", action="append", default=[], metavar="KEY=VALUE",
                      help="also compile the step with this XLA option (repeatable; e.g. "
                      "xla_cpu_enable_concurrency_optimized_scheduler=false) and time both "
                      "executables in alternation: step seconds, compile seconds, memory")
  parser.add_argument("--split_step", action="store_true",
                      help="also compile the split step (config.split_step=True: forward and "
                      "update executables, the host matching between them) and time it in "
                      "alternation with the one-executable step: step and compile seconds")
  parser.add_argument("--residuals", type=int, default=0, metavar="N",
                      help="print the N largest groups of activations the loss keeps from "
                      "forward to backward (jax saved_residuals, by shape and source line) and "
                      "their total, then exit (tracing only: seconds, no compile)")
  parser.add_argument("--profile", type=int, default=0, metavar="N",
                      help="after the timing, run N more steps under the profiler and print "
                      "where the step's time goes: per HLO op category, source line and op "
                      "(benchmarks/op_profile.py)")
  parser.add_argument("--compile_profile", action="store_true",
                      help="compile the step in three timed phases (trace, lower, XLA compile; "
                      "the last under the profiler) and print the --top XLA compiler events, "
                      "then exit")
  parser.add_argument("--top", type=int, default=20,
                      help="rows per --profile / --compile_profile table")
  parser.add_argument("--peak_tflops", type=float, default=0.0,
                      help="device peak for MFU (default: PEAK_TFLOPS by device kind)")
  args = parser.parse_args(argv)
  runtime = host_runtime.configure()  # as run.py (XLA flags take effect: no computation yet)
  print(f"host runtime (host_runtime.configure, as run.py): XLA_FLAGS={runtime['xla_flags']!r}, "
        f"malloc keeps freed memory: {runtime['malloc_keeps_memory']}")

  config = config_lib.load_config(args.config, args.config_arg or None)
  for assignment in args.set:
    _apply_override(config, assignment)
  config = config_lib.finalize(config)
  data_cfg = pipeline.resolve_data_config(config.data)
  if args.size:
    height, width = (int(v) for v in args.size.lower().split("x"))
  else:
    height, width = pipeline.buckets_from_config(data_cfg)[0]
  b = args.batch or data_cfg.batch_size
  if b % args.devices:
    raise ValueError(f"--batch {b} is not divisible by --devices {args.devices}")

  mesh = sharding.make_mesh(args.devices)
  start = time.perf_counter()
  method, tx, schedule, state, shardings = build_state(config, mesh)
  init_s = time.perf_counter() - start
  num_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state.params))

  loss_fn = method.loss_fn(method.stage_at(0))
  batch = sharding.global_batch(random_batch(b, height, width, data_cfg.max_boxes, args.boxes),
                                mesh)
  if args.residuals:
    with jax.set_mesh(mesh):
      print_residuals(lambda p: loss_fn(p, state, batch, jax.random.PRNGKey(1))[0],
                      state.params, args.residuals)
    return
  options = dict(ema_momentum=config.get("ema_momentum"), ema_subtree=method.ema_subtree)
  step_fn = train.make_train_step(loss_fn, tx, schedule, mesh, shardings, **options)
  rng = jax.random.PRNGKey(1)
  with jax.set_mesh(mesh):  # as the trainer: host matching per device shard
    if args.compile_profile:
      header(config, args, num_params, b, height, width, data_cfg, init_s, None)
      print_compile_profile(step_fn, state, batch, args.top)
      return
    start = time.perf_counter()
    compiled = step_fn.lower(state, batch).compile()
    compile_s = time.perf_counter() - start
    host_runtime.release_free_memory()  # as the trainer after compiling
    if args.compile_only:
      header(config, args, num_params, b, height, width, data_cfg, init_s, compile_s)
      memory_and_flops(compiled, args)
      return
    if args.compare_option:
      compare_options(step_fn, state, batch, compiled, compile_s, args)
      return
    if args.split_step:
      compare_split_step(loss_fn, lambda loss: train.train_step_fn(loss, tx, schedule, **options),
                         mesh, shardings, state, batch, compiled, compile_s, args)
      return
    forward = jax.jit(lambda p, s, x, r: loss_fn(p, s, x, r)[0]).lower(
        state.params, state, batch, rng).compile()

  losses, callback_s, callback_calls, timer = [], [], [], CallbackTimer()

  def one_step():  # the state is donated: carry it from step to step
    nonlocal state
    before, calls = timer.seconds, timer.calls
    state, metrics = compiled(state, batch)
    jax.block_until_ready(metrics)
    callback_s.append(timer.seconds - before)
    callback_calls.append(timer.calls - calls)
    losses.append(metrics["loss"])
    return metrics["loss"]

  try:
    times = time_interleaved({"train_step": one_step,
                              "forward": lambda: forward(state.params, state, batch, rng)},
                             reps=args.steps, warmup=1)
  finally:
    timer.close()
  step_s, forward_s = times["train_step"], times["forward"]
  match_s = float(np.median(callback_s[1:] or callback_s))
  header(config, args, num_params, b, height, width, data_cfg, init_s, compile_s,
         f"; loss after {args.steps + 1} steps {float(losses[-1]):.4f}")
  print(f"step_s: {step_s:.3f} (median of {args.steps})  img_per_s: {b / step_s:.2f}")
  print(f"split: forward {forward_s:.3f} s ({forward_s / step_s:.0%}), backward + update "
        f"{step_s - forward_s:.3f} s ({1 - forward_s / step_s:.0%}), matching callback "
        f"{match_s * 1e3:.1f} ms ({match_s / step_s:.1%} of the step, "
        f"{max(callback_calls)} host call(s) per step)")
  memory_and_flops(compiled, args, step_s)
  if args.profile:
    times = op_profile.trace_op_times(one_step, args.profile)
    op_profile.print_op_table(times, op_profile.entry_ops(compiled.as_text()), args.top, step_s)


def _option_value(text):
  lowered = text.lower()
  if lowered in ("true", "false"):
    return lowered == "true"
  return _literal(text)


def compare_options(step_fn, state, batch, compiled, compile_s, args):
  """Times the default executable against one compiled with `args.compare_option` (called
  under the step's mesh, `jax.set_mesh`)."""
  options = {}
  for item in args.compare_option:
    key, sep, value = item.partition("=")
    if not sep:
      raise ValueError(f"--compare_option expects KEY=VALUE, got {item!r}")
    options[key] = _option_value(value)
  start = time.perf_counter()
  other = step_fn.lower(state, batch).compile(compiler_options=options)
  print(f"compare: {options}, load {os.getloadavg()[0]:.1f}")
  compare_steps({"default": (compiled, compile_s),
                 "with options": (other, time.perf_counter() - start)}, state, batch, args.steps)


def compare_split_step(loss_fn, make_step, mesh, shardings, state, batch, compiled, compile_s,
                       args):
  """Times the one-executable step (host callback) against the split step
  (`split_step.SplitStep`, as `config.split_step=True` trains; no executable cache), both
  compiled here (called under the step's mesh)."""
  start = time.perf_counter()
  split = split_step.SplitStep(loss_fn, make_step, mesh, shardings).lower(state, batch).compile()
  # The same step from copies of one state: the two losses must agree.
  first = {name: float(executable(jax.tree.map(jnp.copy, state), batch)[1]["loss"])
           for name, executable in (("callback", compiled), ("split", split))}
  print(f"compare: one executable with the host callback vs the split step, load "
        f"{os.getloadavg()[0]:.1f}; one step from the same state: loss {first['callback']:.6f} "
        f"/ {first['split']:.6f}")
  compare_steps({"callback": (compiled, compile_s),
                 "split": (split, time.perf_counter() - start)}, state, batch, args.steps)


def compare_steps(runs, state, batch, steps):
  """Times `runs` (name -> (compiled step, compile seconds); the first is the reference) in
  alternation, the donated state carried from one to the next, and prints step seconds,
  compile seconds, temporaries, the ratio to the reference and each one's last loss."""
  losses = {}

  def timed(name, executable):
    def run():
      nonlocal state
      state, metrics = executable(state, batch)
      losses[name] = metrics["loss"]
      return metrics["loss"]
    return run

  times = time_interleaved({k: timed(k, v[0]) for k, v in runs.items()}, reps=steps, warmup=1)
  reference = next(iter(runs))
  for name, (executable, seconds) in runs.items():
    memory = executable.memory_analysis()
    temp = f"{memory.temp_size_in_bytes / 2**30:.2f} GiB" if memory is not None else "-"
    print(f"  {name:13s} step_s {times[name]:.3f} (median of {steps})  compile_s {seconds:.1f}"
          f"  temporaries {temp}  last loss {float(losses[name]):.4f}  ratio to {reference} "
          f"{times[name] / times[reference]:.3f}")


def print_compile_profile(step_fn, state, batch, top):
  """Times tracing, lowering and XLA compilation of `step_fn(state, batch)` apart and prints
  the `top` longest XLA compiler events (`op_profile.trace_compile_events`)."""
  start = time.perf_counter()
  traced = step_fn.trace(state, batch)
  trace_s = time.perf_counter() - start
  lowered = traced.lower()
  lower_s = time.perf_counter() - start - trace_s
  start = time.perf_counter()
  compiled, events = op_profile.trace_compile_events(lowered)
  compile_s = time.perf_counter() - start
  kernels = compiled.as_text().count(" fusion(")
  print(f"compile phases: trace {trace_s:.1f} s, lower {lower_s:.1f} s, XLA compile "
        f"{compile_s:.1f} s (under the profiler); optimized HLO: {kernels} fusion instructions")
  print(f"{'seconds':>8} {'count':>6}  XLA compiler event (threads summed; nested events "
        "overlap)")
  for name, (seconds, count) in sorted(events.items(), key=lambda kv: -kv[1][0])[:top]:
    print(f"{seconds:8.2f} {count:6d}  {name[:110]}")


def header(config, args, num_params, b, height, width, data_cfg, init_s, compile_s, extra=""):
  """Prints what was measured: device, config, model size, batch, init and compile seconds."""
  device = jax.devices()[0]
  print(f"train_step: {device.platform} ({device.device_kind}) x {args.devices}, config "
        f"{os.path.basename(args.config)}:{args.config_arg or 'default'}"
        f"{' ' + ' '.join(args.set) if args.set else ''}, load {os.getloadavg()[0]:.1f}")
  print(f"model: {num_params:,} params, dtype {config.model.get('dtype', 'float32')}; batch "
        f"{b} x {height}x{width}, {min(args.boxes, data_cfg.max_boxes)} boxes/image{extra}")
  print(f"init_s: {init_s:.1f}" + (f"  compile_s: {compile_s:.1f}" if compile_s is not None
                                   else ""))


def memory_and_flops(compiled, args, step_s=None):
  """Prints the compiled step's memory analysis, the peak memory, FLOPs and (timed) MFU."""
  device = jax.devices()[0]
  memory = compiled.memory_analysis()
  where, peak = peak_memory(device)
  if memory is not None:
    print(f"memory: compiled step arguments {memory.argument_size_in_bytes / 2**30:.2f} GiB, "
          f"outputs {memory.output_size_in_bytes / 2**30:.2f} GiB, temporaries "
          f"{memory.temp_size_in_bytes / 2**30:.2f} GiB; {where} {peak / 2**30:.2f} GiB")
  flops = compiled_flops(compiled)
  if flops and step_s:
    peak_t = args.peak_tflops or peak_tflops(device.device_kind)
    achieved = flops / step_s / 1e12
    mfu = f"MFU {achieved / peak_t:.1%} of {peak_t:.0f} TFLOP/s bf16" if peak_t else (
        "MFU n/a (unknown device peak: --peak_tflops)")
    print(f"flops: {flops / 1e12:.3f} TFLOP per step (per device), {achieved:.3f} TFLOP/s; "
          f"{mfu}")
  elif flops:
    print(f"flops: {flops / 1e12:.3f} TFLOP per step (per device)")


if __name__ == "__main__":
  main()
