r"""Side by side with the official PyTorch DINO-4scale R50: agreement, speed, memory, compile.

  python -m sized_detr_jax.benchmarks.vs_pytorch --dino_src=DIR          # CPU, docs/benchmarks.md's size
  python -m sized_detr_jax.benchmarks.vs_pytorch --dino_src=DIR --device=gpu --batch=8 \
      --sizes=800x1333,800x1200 --reps=5
  python -m sized_detr_jax.benchmarks.vs_pytorch --jax_only --config_arg=tiny \
      --sizes=96x96,80x96 --reps=1                                         # JAX half, no torch

`--dino_src` is a checkout of https://github.com/IDEA-Research/DINO. The torch half needs
torch, torchvision, timm and termcolor in the interpreter given by `--torch_python` (default:
this one); on the CPU, or where DINO's CUDA op is not built, MSDA runs DINO's pure-PyTorch
`ms_deform_attn_core_pytorch` (`benchmarks/official_dino.py`).

What it does (every framework in its own process; this one imports neither):
1. prepare (torch): builds DINO-4scale R50 with seed `--seed`, N(0, 0.02) added to every weight,
   saves its state_dict, and runs DINO's eval forward on the batch (random images of
   `--sizes`, padded to the largest, `--boxes` boxes per image).
2. check (JAX): converts those weights with convert_torch into `--config:--config_arg`
   (default experiments/dino_r50.py:coco91), runs the eval forward with DINO's top-k encoder
   tokens injected and prints the max |difference| of logits and boxes over every decoder layer
   and of the encoder proposals; then with its own selection (`model.query_selection`), and how
   that selection compares with DINO's (`official_dino.compare_selection`).
3. timing, for `eval` (forward, no gradient, no postprocess) then `train` (PyTorch: DINO's
   forward + SetCriterion + backward + grad clipping 0.1 + AdamW with DINO's param groups, as
   engine.py; JAX: this package's jitted train step: forward, host Hungarian matching,
   criterion, backward, clipping, AdamW): one long-lived worker process per framework (the
   two of a mode are alive together, only one computes at a time), started one after the other
   (JAX's trace and compile time measured in its worker, plus one untimed warm-up run on
   each side), then `--reps` rounds alternating which framework goes first. The JAX workers
   apply run.py's process settings (`host_runtime.configure`, and the heap trim after
   compiling); the PyTorch workers get the same glibc malloc setting unless
   `--no-torch_keep_freed_memory` (a process that keeps its memory makes the other's page
   faults dearer). Each worker reports its seconds per run and, when it exits, its peak RSS
   (`resource.getrusage`, the whole process: weights, compiled code, framework runtime) and its
   RSS before and after the warm-up run; per run its CPU seconds (user, system) and minor page
   faults (a run that gets fewer cores than the other, or that maps fresh memory every time,
   shows there); on GPUs the peak device memory.

Printed: the agreement, a table (median, min and every run in seconds, peak RSS in GB,
JAX trace/compile seconds), the JAX/PyTorch time ratio per mode (< 1: JAX faster) and the
1/5/15-minute load averages before and after (`os.getloadavg`; on a shared machine compare only
runs at similar load). `--json=PATH` writes everything as JSON.
"""
import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

from sized_detr_jax import host_runtime
from sized_detr_jax.benchmarks import official_dino

_ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
_MODULE = "sized_detr_jax.benchmarks.vs_pytorch"
FRAMEWORKS = ("pytorch", "jax")
MODES = ("eval", "train")


def _parse_sizes(text):
  try:
    sizes = [tuple(int(v) for v in item.lower().split("x")) for item in text.split(",")]
  except ValueError:
    sizes = []
  if not sizes or any(len(s) != 2 or min(s) <= 0 for s in sizes):
    raise ValueError(f"--sizes: expected HxW[,HxW...], got {text!r}")
  return sizes


def _peak_rss_gb():
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def _rss_gb():
  """Current resident set size of this process (Linux /proc), GiB; None elsewhere."""
  try:
    with open("/proc/self/statm") as f:
      return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**30
  except (OSError, ValueError, IndexError):
    return None


def _load():
  return [round(v, 2) for v in os.getloadavg()]


# ---------------------------------------------------------------------------------------------
# Workers (one process each). They answer on the original stdout, one JSON object per line;
# anything the libraries print goes to stderr (the worker's log file).


class _Channel:
  """Worker side of the line protocol: `send(dict)`, `commands()` (lines from stdin)."""

  def __init__(self):
    self._out = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)  # library prints -> stderr
    sys.stdout = sys.stderr

  def send(self, obj):
    self._out.write(json.dumps(obj) + "\n")
    self._out.flush()

  def commands(self):
    for line in sys.stdin:
      yield line.strip()


def _batch(args):
  with np.load(os.path.join(args.workdir, "batch.npz")) as data:
    return {k: data[k] for k in data.files}


def _jax_config(args):
  from sized_detr_jax import config_lib  # pylint: disable=g-import-not-at-top
  from sized_detr_jax import configs  # pylint: disable=g-import-not-at-top
  path = args.config  # a packaged config's name, or a file relative to here or to the checkout
  if not (os.path.isabs(path) or os.path.exists(path.partition(":")[0])
          or path in configs.NAMES):
    path = os.path.join(_ROOT, path)
  return config_lib.finalize(config_lib.load_config(path, args.config_arg or None))


def _jax_params(args, model_config, model, batch):
  """Converted official weights when prepared, else random params (--jax_only)."""
  import jax  # pylint: disable=g-import-not-at-top
  from sized_detr_jax.models.testing import random_params  # pylint: disable=g-import-not-at-top
  weights = os.path.join(args.workdir, "weights.npz")
  if os.path.exists(weights):
    with np.load(weights) as data:
      state_dict = {k: data[k] for k in data.files}
    return jax.tree.map(np.asarray, official_dino.converted_params(state_dict, model_config))
  shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), batch["image"][:1],
                          batch["pixel_mask"][:1])
  extra = sorted(set(shapes) - {"params"})
  if extra:
    raise ValueError(f"vs_pytorch: model has variable collections {extra} besides params")
  return random_params(shapes["params"], seed=args.seed)


def _device_peak_gb(framework):
  """Peak accelerator memory of this process (None on the CPU)."""
  if framework == "jax":
    import jax  # pylint: disable=g-import-not-at-top
    device = jax.devices()[0]
    if device.platform == "cpu":
      return None
    stats = device.memory_stats() or {}
    return stats.get("peak_bytes_in_use", 0) / 2**30
  import torch  # pylint: disable=g-import-not-at-top
  if not torch.cuda.is_available():
    return None
  return torch.cuda.max_memory_allocated() / 2**30


def _serve(channel, run_once, info, framework):
  """Warm-up run, `ready` (with info), then one timed run per `run` command until `quit`."""
  info = {**info, "rss_before_runs_gb": _rss_gb()}  # weights, runtime, compiled code
  run_once()
  channel.send({"ready": True, **info, "rss_after_warmup_gb": _rss_gb()})
  last = None
  for command in channel.commands():
    if command == "run":
      before = resource.getrusage(resource.RUSAGE_SELF)
      start = time.perf_counter()
      last = run_once()
      seconds = time.perf_counter() - start
      after = resource.getrusage(resource.RUSAGE_SELF)
      channel.send({"seconds": seconds,
                    "user_s": after.ru_utime - before.ru_utime,
                    "sys_s": after.ru_stime - before.ru_stime,
                    "minor_faults": after.ru_minflt - before.ru_minflt})
    elif command == "quit":
      break
  channel.send({"peak_rss_gb": _peak_rss_gb(), "device_peak_gb": _device_peak_gb(framework),
                "last_loss": last})


def _torch_device(args):
  return "cuda" if args.device == "gpu" else "cpu"


def _worker_prepare(args, channel):
  import torch  # pylint: disable=g-import-not-at-top
  start = time.perf_counter()
  official = official_dino.build_official(args.dino_src, seed=args.seed,
                                          device=_torch_device(args))
  build_s = time.perf_counter() - start
  np.savez(os.path.join(args.workdir, "weights.npz"),
           **official_dino.numpy_state_dict(official.model))
  batch = _batch(args)
  ref = official_dino.run_official(official, batch["image"], batch["pixel_mask"])
  np.savez(os.path.join(args.workdir, "reference.npz"), **ref)
  channel.send({"describe": official_dino.describe(official), "build_s": build_s,
                "torch": torch.__version__, "threads": torch.get_num_threads(),
                "msda": official.msda})


def _worker_check(args, channel):
  import jax  # pylint: disable=g-import-not-at-top
  from sized_detr_jax.models import dino  # pylint: disable=g-import-not-at-top
  config = _jax_config(args)
  model = dino.build_dino(config.model)
  batch = _batch(args)
  params = _jax_params(args, config.model, model, batch)
  with np.load(os.path.join(args.workdir, "reference.npz")) as data:
    ref = {k: data[k] for k in data.files}
  forward = official_dino.jax_eval_fn(model)
  injected, _ = forward(params, batch["image"], batch["pixel_mask"], ref["topk"], True)
  own, selection = forward(params, batch["image"], batch["pixel_mask"], ref["topk"], False)
  selection = jax.device_get(selection)
  channel.send({
      "injected": official_dino.max_abs_diffs(official_dino.jax_outputs_numpy(injected), ref),
      "own_selection": official_dino.max_abs_diffs(official_dino.jax_outputs_numpy(own), ref),
      "selection": official_dino.compare_selection(selection["own_topk"], ref["topk"],
                                                   selection["scores"], selection["usable"]),
      "query_selection": config.model.query_selection})


def _worker_torch(args, channel, mode):
  # The JAX workers' glibc malloc setting (host_runtime), unless --no-torch_keep_freed_memory:
  # otherwise a JAX process that keeps its memory makes the other's page faults dearer.
  keeps_memory = args.torch_keep_freed_memory and host_runtime.keep_freed_memory()
  import torch  # pylint: disable=g-import-not-at-top
  start = time.perf_counter()
  device = _torch_device(args)
  official = official_dino.build_official(args.dino_src, seed=args.seed, device=device)
  with np.load(os.path.join(args.workdir, "weights.npz")) as data:
    official_dino.load_numpy_state_dict(official.model, {k: data[k] for k in data.files})
  batch = _batch(args)
  model, criterion = official.model, official.criterion
  samples = official_dino.torch_samples(official, batch["image"], batch["pixel_mask"])
  sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
  cuda_calls = official_dino.cpu_cuda_calls(device)
  cuda_calls.__enter__()  # for the whole worker process
  if mode == "eval":
    model.eval()

    def run_once():
      with torch.no_grad():
        out = model(samples)
      sync()
      return float(out["pred_logits"].float().mean())
  else:
    from util.get_param_dicts import get_param_dict  # pylint: disable=g-import-not-at-top
    args_ns = official.args
    optimizer = torch.optim.AdamW(get_param_dict(args_ns, model), lr=args_ns.lr,
                                  weight_decay=args_ns.weight_decay)
    targets = official_dino.torch_targets(official, batch["boxes"], batch["labels"],
                                          batch["valid"])
    weight_dict = criterion.weight_dict
    model.train()
    criterion.train()

    def run_once():  # engine.py train_one_epoch, one iteration (no AMP)
      loss_dict = criterion(model(samples, targets), targets)
      loss = sum(loss_dict[k] * weight_dict[k] for k in loss_dict if k in weight_dict)
      optimizer.zero_grad()
      loss.backward()
      torch.nn.utils.clip_grad_norm_(model.parameters(), args_ns.clip_max_norm)
      optimizer.step()
      sync()
      return float(loss.detach())
  setup_s = time.perf_counter() - start
  _serve(channel, run_once, {"setup_s": setup_s, "torch": torch.__version__,
                             "malloc_keeps_memory": keeps_memory,
                             "threads": torch.get_num_threads(), "msda": official.msda},
         "pytorch")


def _worker_jax(args, channel, mode):
  runtime = host_runtime.configure()  # as run.py, before the XLA backend starts
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from sized_detr_jax import methods  # pylint: disable=g-import-not-at-top
  from sized_detr_jax import optim  # pylint: disable=g-import-not-at-top
  from sized_detr_jax import sharding  # pylint: disable=g-import-not-at-top
  from sized_detr_jax import state as state_lib  # pylint: disable=g-import-not-at-top
  from sized_detr_jax import train  # pylint: disable=g-import-not-at-top
  start = time.perf_counter()
  config = _jax_config(args)
  method = methods.build(config)
  model = method.model
  batch = _batch(args)
  params = _jax_params(args, config.model, model, batch)
  if mode == "eval":
    forward = jax.jit(lambda p, images, mask: model.apply({"params": p}, images, mask))
    images, mask = jnp.asarray(batch["image"]), jnp.asarray(batch["pixel_mask"])
    params = jax.device_put(params)
    setup_s = time.perf_counter() - start
    start = time.perf_counter()
    lowered = forward.lower(params, images, mask)
    trace_s = time.perf_counter() - start
    start = time.perf_counter()
    compiled = lowered.compile()
    compile_s = time.perf_counter() - start
    host_runtime.release_free_memory()  # as the trainer after compiling

    def run_once():
      out = jax.block_until_ready(compiled(params, images, mask))
      return float(jnp.mean(out["pred_logits"]))
  else:
    mesh = sharding.make_mesh(1)
    tx, schedule = optim.make_optimizer(params, method.param_labels(params), config.optimizer)
    state = state_lib.TrainState(step=jnp.zeros((), jnp.int32), params=params, model_state={},
                                 opt_state=tx.init(params), rng=jax.random.PRNGKey(args.seed))
    shardings = jax.tree.map(lambda _: sharding.replicated(mesh), state)
    state = jax.device_put(state, shardings)
    step_fn = train.make_train_step(method.loss_fn(method.stage_at(0)), tx, schedule, mesh,
                                    shardings)
    device_batch = sharding.global_batch(batch, mesh)
    setup_s = time.perf_counter() - start
    with jax.set_mesh(mesh):  # as the trainer: host matching per device shard
      start = time.perf_counter()
      lowered = step_fn.lower(state, device_batch)
      trace_s = time.perf_counter() - start
      start = time.perf_counter()
      compiled = lowered.compile()
      compile_s = time.perf_counter() - start
    host_runtime.release_free_memory()  # as the trainer after compiling

    def run_once():  # the state is donated: carry it from step to step
      nonlocal state
      state, metrics = compiled(state, device_batch)
      return float(jax.block_until_ready(metrics["loss"]))
  device = jax.devices()[0]
  _serve(channel, run_once, {
      "setup_s": setup_s, "trace_s": trace_s, "compile_s": compile_s, "jax": jax.__version__,
      "platform": f"{device.platform} ({device.device_kind})",
      "config": f"{os.path.basename(args.config)}:{args.config_arg}",
      "xla_flags": runtime["xla_flags"],
      "malloc_keeps_memory": runtime["malloc_keeps_memory"],
      "disable_most_optimizations": os.environ.get("JAX_DISABLE_MOST_OPTIMIZATIONS", "")},
         "jax")


def _worker_main(args):
  channel = _Channel()
  role = args._worker  # pylint: disable=protected-access
  if role == "prepare":
    _worker_prepare(args, channel)
  elif role == "check":
    _worker_check(args, channel)
  else:
    framework, mode = role.split("_")
    (_worker_torch if framework == "pytorch" else _worker_jax)(args, channel, mode)


# ---------------------------------------------------------------------------------------------
# Parent: starts the workers, interleaves them, prints and saves the figures.


class _Worker:
  """Parent side of one worker process."""

  def __init__(self, role, args, workdir):
    self.role = role
    python = args.torch_python if role in ("prepare", "pytorch_eval", "pytorch_train") else (
        args.jax_python)
    self.log_path = os.path.join(workdir, f"{role}.log")
    self._log = open(self.log_path, "w")  # pylint: disable=consider-using-with
    env = dict(os.environ)
    env["PYTHONPATH"] = _ROOT + os.pathsep + env.get("PYTHONPATH", "")
    if role.startswith("jax") or role == "check":
      env.setdefault("JAX_PLATFORMS", "cuda" if args.device == "gpu" else "cpu")
    command = [python, "-m", _MODULE, f"--_worker={role}", f"--workdir={workdir}",
               f"--dino_src={args.dino_src}", f"--device={args.device}",
               f"--seed={args.seed}", f"--config={args.config}",
               f"--config_arg={args.config_arg}"]
    if not args.torch_keep_freed_memory:
      command.append("--no-torch_keep_freed_memory")
    self.process = subprocess.Popen(  # pylint: disable=consider-using-with
        command, cwd=_ROOT, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
        stderr=self._log, text=True)

  def receive(self):
    line = self.process.stdout.readline()
    if not line:
      self.process.wait()
      self._log.flush()
      with open(self.log_path, encoding="utf-8", errors="replace") as f:
        tail = "".join(f.readlines()[-25:])
      raise RuntimeError(f"vs_pytorch: worker {self.role} exited with {self.process.returncode}"
                         f" (log {self.log_path}):\n{tail}")
    return json.loads(line)

  def send(self, command):
    self.process.stdin.write(command + "\n")
    self.process.stdin.flush()

  def close(self):
    self.send("quit")
    reply = self.receive()
    self.process.wait()
    self._log.close()
    return reply


def _time_mode(mode, frameworks, args, workdir, log):
  """Starts one worker per framework (sequentially), interleaves `reps` timed runs."""
  workers, results = {}, {}
  try:
    for framework in frameworks:
      log(f"{mode}: starting the {framework} worker (load {_load()})")
      start = time.perf_counter()
      workers[framework] = _Worker(f"{framework}_{mode}", args, workdir)
      results[framework] = {**workers[framework].receive(), "start_s":
                            time.perf_counter() - start, "runs": [], "usage": []}
      results[framework].pop("ready")
    for rep in range(args.reps):
      order = frameworks if rep % 2 == 0 else frameworks[::-1]
      for framework in order:
        workers[framework].send("run")
        reply = workers[framework].receive()
        results[framework]["runs"].append(reply.pop("seconds"))
        results[framework]["usage"].append(reply)
      log(f"{mode}: round {rep + 1}/{args.reps}: " + ", ".join(
          f"{f} {results[f]['runs'][-1]:.3f} s" for f in frameworks))
    for framework in frameworks:
      results[framework].update(workers.pop(framework).close())
  finally:
    for worker in workers.values():
      worker.process.kill()
  for framework in frameworks:
    runs = results[framework]["runs"]
    results[framework]["median_s"] = statistics.median(runs)
    results[framework]["min_s"] = min(runs)
    usage = results[framework]["usage"]
    for key in ("user_s", "sys_s", "minor_faults"):
      results[framework][f"median_{key}"] = statistics.median(u[key] for u in usage)
  if len(frameworks) == 2:
    results["jax_over_pytorch"] = results["jax"]["median_s"] / results["pytorch"]["median_s"]
  return results


def _print_report(report):
  meta = report["meta"]
  sizes = ", ".join(f"{h}x{w}" for h, w in meta["sizes"])
  print(f"vs_pytorch: {meta['device']}, batch {meta['batch']} ({sizes}; padded to "
        f"{meta['padded'][0]}x{meta['padded'][1]}), {meta['boxes']} boxes/image, reps "
        f"{meta['reps']}, seed {meta['seed']}")
  print(f"load (1/5/15 min) before {meta['load_before']}, after {meta['load_after']}; "
        f"{meta['cpus']} CPUs")
  if report.get("prepare"):
    p = report["prepare"]
    print(f"{p['describe']}; torch {p['torch']}, {p['threads']} threads")
  jax_info = report["timing"][meta["modes"][0]].get("jax", {})
  if jax_info:
    print(f"jax {jax_info['jax']} on {jax_info['platform']}, config {jax_info['config']}"
          + (f", XLA_FLAGS={jax_info['xla_flags']}" if jax_info["xla_flags"] else "")
          + (", JAX_DISABLE_MOST_OPTIMIZATIONS=" + jax_info["disable_most_optimizations"]
             if jax_info["disable_most_optimizations"] else ""))
  first = report["timing"][meta["modes"][0]]
  print("glibc malloc keeps freed memory (host_runtime.keep_freed_memory): " + ", ".join(
      f"{f} {first[f].get('malloc_keeps_memory')}" for f in meta["frameworks"] if f in first))
  check = report.get("check")
  if check:
    fmt = lambda d: ", ".join(f"{k} {v:.2g}" for k, v in d.items())
    print(f"agreement, DINO's top-k injected (max |JAX - PyTorch|, all layers): "
          f"{fmt(check['injected'])}")
    sel = check["selection"]
    print(f"own selection (query_selection={check['query_selection']!r}): positions differing "
          f"{sel['positions_differing']}, unusable tokens JAX {sel['unusable_ours']} / DINO "
          f"{sel['unusable_dino']}, max score gap {sel['max_score_gap']:.2g}; outputs "
          f"{fmt(check['own_selection'])}")
  print(f"{'mode':6} {'framework':9} {'median_s':>9} {'min_s':>8} {'peak_rss_gb':>11} "
        f"{'trace_s':>8} {'compile_s':>9}  runs")
  for mode in meta["modes"]:
    timing = report["timing"][mode]
    for framework in meta["frameworks"]:
      r = timing[framework]
      trace = f"{r['trace_s']:.1f}" if "trace_s" in r else "-"
      compile_ = f"{r['compile_s']:.1f}" if "compile_s" in r else "-"
      device = (f"  device peak {r['device_peak_gb']:.2f} GB"
                if r.get("device_peak_gb") is not None else "")
      if r.get("rss_before_runs_gb") is not None:
        device += (f"  (RSS before the first run {r['rss_before_runs_gb']:.2f} GB, after it "
                   f"{r['rss_after_warmup_gb']:.2f} GB)")
      print(f"{mode:6} {framework:9} {r['median_s']:9.3f} {r['min_s']:8.3f} "
            f"{r['peak_rss_gb']:11.2f} {trace:>8} {compile_:>9}  "
            + " ".join(f"{t:.3f}" for t in r["runs"]) + device)
    print(f"{mode:6} per run (median): " + "; ".join(
        f"{f} CPU user {timing[f]['median_user_s']:.2f} s + sys {timing[f]['median_sys_s']:.2f} s"
        f", {timing[f]['median_minor_faults'] / 1e3:.0f}k minor page faults"
        for f in meta["frameworks"]))
    if "jax_over_pytorch" in timing:
      ratio = timing["jax_over_pytorch"]
      print(f"{mode:6} JAX/PyTorch time {ratio:.2f} (JAX {1 / ratio:.2f}x PyTorch's speed)")


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--dino_src", default="", help="checkout of IDEA-Research/DINO")
  parser.add_argument("--device", choices=("cpu", "gpu"), default="cpu")
  parser.add_argument("--batch", type=int, default=2)
  parser.add_argument("--sizes", default="320x416,288x384",
                      help="HxW per image, cycled over the batch, padded to the largest")
  parser.add_argument("--boxes", type=int, default=5, help="ground-truth boxes per image")
  parser.add_argument("--reps", type=int, default=3, help="timed runs per framework and mode")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--modes", default="eval,train")
  parser.add_argument("--config", default="dino_r50")
  parser.add_argument("--config_arg", default="coco91")
  parser.add_argument("--jax_only", action="store_true",
                      help="time only the JAX half (random params; no torch, no dino_src)")
  parser.add_argument("--torch_keep_freed_memory", action=argparse.BooleanOptionalAction,
                      default=True, help="give the PyTorch workers the JAX workers' glibc "
                      "malloc setting (host_runtime.keep_freed_memory); "
                      "--no-torch_keep_freed_memory runs them with glibc's defaults")
  parser.add_argument("--torch_python", default=sys.executable)
  parser.add_argument("--jax_python", default=sys.executable)
  parser.add_argument("--workdir", default="", help="worker files and logs (default: a "
                      "temporary folder, removed unless a worker failed)")
  parser.add_argument("--json", default="", help="also write the report here")
  parser.add_argument("--_worker", default="", help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  if args._worker:  # pylint: disable=protected-access
    return _worker_main(args)

  modes = [m for m in args.modes.split(",") if m]
  if not modes or any(m not in MODES for m in modes):
    raise ValueError(f"--modes: expected a comma list of {MODES}, got {args.modes!r}")
  if args.batch < 1 or args.reps < 1 or args.boxes < 1:
    raise ValueError(f"--batch, --reps and --boxes must be >= 1, got {args.batch}, "
                     f"{args.reps}, {args.boxes}")
  if not args.jax_only and not os.path.isfile(os.path.join(args.dino_src or ".",
                                                           official_dino.CONFIG_4SCALE)):
    raise ValueError(f"--dino_src={args.dino_src!r} is not a checkout of IDEA-Research/DINO "
                     f"(no {official_dino.CONFIG_4SCALE}); pass one, or --jax_only")
  sizes = _parse_sizes(args.sizes)
  frameworks = ("jax",) if args.jax_only else FRAMEWORKS
  log = lambda text: print(f"[vs_pytorch] {text}", file=sys.stderr, flush=True)

  own_workdir = not args.workdir
  workdir = args.workdir or tempfile.mkdtemp(prefix="vs_pytorch_")
  os.makedirs(workdir, exist_ok=True)
  # Labels in [1, 80): valid for DINO's 91 category-id rows and for 80-class configs.
  batch = official_dino.make_batch(sizes, batch=args.batch, boxes_per_image=args.boxes,
                                   num_classes=80, seed=args.seed)
  np.savez(os.path.join(workdir, "batch.npz"), **batch)
  report = {"meta": {
      "device": args.device, "batch": args.batch, "sizes": [list(s) for s in sizes],
      "padded": list(batch["image"].shape[1:3]), "boxes": args.boxes, "reps": args.reps,
      "seed": args.seed, "modes": modes, "frameworks": list(frameworks),
      "cpus": os.cpu_count(), "load_before": _load()}, "timing": {}}
  failed = False
  try:
    if not args.jax_only:
      log(f"prepare: building the official DINO (load {_load()})")
      prepare = _Worker("prepare", args, workdir)
      report["prepare"] = prepare.receive()
      prepare.process.wait()
      log("check: converting and comparing outputs")
      check = _Worker("check", args, workdir)
      report["check"] = check.receive()
      check.process.wait()
    for mode in modes:
      report["timing"][mode] = _time_mode(mode, frameworks, args, workdir, log)
  except Exception:
    failed = True
    raise
  finally:
    if own_workdir and not failed:
      for name in os.listdir(workdir):
        os.remove(os.path.join(workdir, name))
      os.rmdir(workdir)
  report["meta"]["load_after"] = _load()
  _print_report(report)
  if args.json:
    with open(args.json, "w", encoding="utf-8") as f:
      json.dump(report, f, indent=1)
  return report


if __name__ == "__main__":
  main()
