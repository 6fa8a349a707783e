r"""The paper's training runs on paper: FLOPs, device memory and wall time at COCO size.

  python -m sized_detr_jax.benchmarks.scale --out=DIR              # the three paper rows
  python -m sized_detr_jax.benchmarks.scale --dry_run --out=DIR    # tiny configs at 64x64
  python -m sized_detr_jax.benchmarks.scale --rows=dino --memory_batches=2,4 --out=DIR

For each paper row (DINO-4scale R50 12 epochs: config dino_r50; Semi-DETR 120k iterations on
COCO-partial: semi_detr; Co-DINO R50 12 epochs: co_dino) it reports, per image at --size
(default 800x1333, the padded COCO input):
  * FLOPs of the train step (forward, matching costs, criterion, backward, optimiser, EMA) and
    of inference (forward + postprocess), from XLA's cost analysis of the lowered modules
    (`jax.jit(...).lower(...).cost_analysis()`: no compile, no data; the state and batch are
    `jax.ShapeDtypeStruct`s). The step is the trainer's (`train.make_train_step` on
    `train_step.build_state`'s state), so the Hungarian matching is a host callback inside
    it: the cost analysis counts a callback as 0 FLOPs (the host solve is not device work; its
    rate is reported apart), and it counts gathers as 0 too (the gather MSDA's sampling);
  * the device memory per image of the compiled train step (`memory_analysis()`: temporaries +
    arguments + outputs, / batch; the outputs alias the donated state, so the total less that
    alias is also given) at --memory_batches per device, with and without
    `model.remat`, for --memory_rows only (each is a full XLA compile: minutes on a CPU). The
    analysis is that of the backend this runs on: on a CPU it is XLA:CPU's buffer assignment,
    not a GPU's (the GPU suite, benchmarks/gpu_suite.py, runs this on a GPU);
  * the expected wall time of the row's schedule (config.total_steps x its images per step) on
    each of `PLATFORMS` at each --mfu, and the images/s the host must then feed: the input pipeline
    rate and the host matching rate (the step's matching problems, found while tracing,
    solved on this host with `matching.solve_host_problem` on random costs with --gt_valid
    valid columns, the COCO mean being 7.3 boxes per image).

Per device the batch is the paper's: DINO and Co-DINO 16 images on 8 GPUs (2 per GPU);
Semi-DETR groups of `semi.images_per_group` (5) images per GPU, L labeled + (5 - L) unlabeled
(weak + strong views), L drawn per step (`semi.sampler`, E[L] = 1.33): its FLOPs are taken at
L = 1 and 2 in both detector stages and averaged over the schedule (FLOPs are affine in L;
stage 1 until `switch_fraction`). Semi-DETR's pseudo-label slots (`semi.max_pseudo`, sized from
the annotations in a run) are set to `data.max_boxes` here: no annotations are read.

Results are cached by key in --out/scale.json: a rerun with the same --out computes only what
is missing (so the compiles can be spread over several shorter runs); --fresh ignores it.
"""
import dataclasses
import json
import os
import platform
import time

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np
from scipy import stats

from sized_detr_jax import config_lib
from sized_detr_jax import evaluate
from sized_detr_jax import matching
from sized_detr_jax import sharding
from sized_detr_jax import train
from sized_detr_jax.benchmarks import train_step as train_step_bench

FLAGS = flags.FLAGS
flags.DEFINE_string("out", "", "folder for scale.json / scale.md (and the cache)")
flags.DEFINE_list("rows", ["dino", "semi_detr", "co_dino"], "paper rows")
flags.DEFINE_string("size", "800x1333", "padded HxW image size")
flags.DEFINE_list("memory_rows", ["dino"], "rows whose step is compiled for the memory table")
flags.DEFINE_list("memory_batches", ["2", "4", "8"], "per-device batches of the memory table")
flags.DEFINE_list("mfu", ["0.25", "0.05"], "assumed model FLOPs utilisations for the wall-time "
                  "estimate (the host rates are given at the first)")
flags.DEFINE_integer("gt_valid", 7, "valid ground-truth columns per matching problem (host rate)")
flags.DEFINE_float("pipeline_img_s", 0.0, "measured input-pipeline images/s per host "
                   "(benchmarks/pipeline.py) to compare with the required rate; 0: not given")
flags.DEFINE_bool("dry_run", False, "tiny configs (the rows' dry_arg) at 64x64")
flags.DEFINE_bool("fresh", False, "ignore results cached in --out/scale.json")

# COCO train2017 images (the 12-epoch schedules are 12 x this at batch 16).
COCO_TRAIN_IMAGES = 118_287
PAPER_GPUS = 8  # every paper row trained on 8 GPUs


@dataclasses.dataclass(frozen=True)
class Row:
  key: str
  title: str
  config: str
  config_arg: str
  dry_arg: str  # the tiny variant for --dry_run


ROWS = {r.key: r for r in (
    Row("dino", "DINO-4scale R50, 12 epochs", "dino_r50", "", "tiny"),
    Row("semi_detr", "Semi-DETR R50, 120k iterations, COCO-partial", "semi_detr", "p10", "smoke"),
    Row("co_dino", "Co-DINO 5-scale R50, 12 epochs", "co_dino", "", "smoke"))}


@dataclasses.dataclass(frozen=True)
class Platform:
  name: str
  chips: int
  hosts: int
  peak_f32: float   # TFLOP/s per chip for the f32 model (what XLA's default precision uses)
  peak_bf16: float  # dense bf16 TFLOP/s per chip
  memory_gib: float
  source: str


# Dense (no sparsity) peaks per chip.
PLATFORMS = (
    Platform("1x H100 SXM", 1, 1, 494.7, 989.4, 80 * 1e9 / 2**30,
             "NVIDIA H100 Tensor Core GPU datasheet (SXM5): TF32 tensor core 989 TFLOP/s and "
             "BF16 1,979 TFLOP/s with sparsity, half that dense; f32 dots run as TF32 under "
             "JAX's default matmul precision on GPU"),
    Platform("8x H100 SXM", 8, 1, 494.7, 989.4, 80 * 1e9 / 2**30, "as above, one 8-GPU host"),
    Platform("TPU v5e-32", 32, 8, 197.0, 197.0, 16.0,
             "Google Cloud TPU v5e docs: 197 TFLOP/s bf16, 16 GiB HBM per chip; f32 dots run as "
             "one bf16 pass at the default precision; 4 chips per host in multi-host slices"),
)


def load_row_config(row, dry_run, overrides=()):
  """The finalised config of a paper row (its tiny variant with `dry_run`), with `overrides`
  (`key=value`, as train_step's --set) applied."""
  config = config_lib.load_config(row.config, (row.dry_arg if dry_run else row.config_arg) or None)
  if config.get("method") == "semi_detr":
    config.semi.max_pseudo = int(config.data.max_boxes)  # not from the annotations
  for assignment in overrides:
    train_step_bench._apply_override(config, assignment)  # pylint: disable=protected-access
  return config_lib.finalize(config)


def _abstract(tree):
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), np.asarray(x).dtype), tree)


def abstract_batch(config, height, width, labeled, unlabeled=0):
  """The train batch's shapes: `labeled` images, plus for Semi-DETR `unlabeled` images in a weak
  and a strong view (`pipeline` batch contract)."""
  max_boxes = int(config.data.max_boxes)
  make = lambda b: train_step_bench.random_batch(b, 1, 1, max_boxes, 1)  # shapes only
  def sized(b):
    batch = _abstract(make(b))
    for key in ("image", "pixel_mask"):
      batch[key] = jax.ShapeDtypeStruct((b, height, width) + batch[key].shape[3:],
                                        batch[key].dtype)
    return batch
  if config.get("method") != "semi_detr":
    return sized(labeled)
  view = {**sized(unlabeled), "matrix": jax.ShapeDtypeStruct((unlabeled, 3, 3), jnp.float32)}
  return {"labeled": sized(labeled), "unlabeled": {"weak": view, "strong": dict(view)}}


def flops_of(lowered):
  """FLOPs of a lowered (or compiled) computation by XLA's cost analysis."""
  analysis = lowered.cost_analysis()
  if isinstance(analysis, (list, tuple)):
    analysis = analysis[0]
  return float(analysis["flops"])


class Built:
  """A row's method, abstract state and train-step builder on a 1-device mesh."""

  def __init__(self, config):
    self.config = config
    self.mesh = sharding.make_mesh(1)
    (self.method, self.tx, self.schedule, self.state,
     self.shardings) = train_step_bench.build_state(config, self.mesh, abstract=True)
    self.num_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(self.state.params))

  def lower_train_step(self, stage, batch):
    """(lowered train step, [(problem shape, prune)] of its Hungarian matchings). The step is the
    trainer's; the problems are recorded while it traces (the host callback stays in it)."""
    problems = []

    def record(cost, gt_valid, prune):
      problems.append((tuple(cost.shape), bool(prune)))
      with matching.deferred_matching(None):  # the trainer's own host matching
        return matching.hungarian_matching(cost, gt_valid, prune=prune)

    step_fn = train.make_train_step(
        self.method.loss_fn(stage), self.tx, self.schedule, self.mesh, self.shardings,
        ema_momentum=self.config.get("ema_momentum"), ema_subtree=self.method.ema_subtree)
    with jax.set_mesh(self.mesh), matching.deferred_matching(record):
      lowered = step_fn.lower(self.state, batch)
    return lowered, problems

  def lower_inference(self, batch_size, height, width):
    """The evaluation's predict function (`evaluate.Predictor`, the last stage) lowered."""
    batch = {"image": jax.ShapeDtypeStruct((batch_size, height, width, 3), jnp.float32),
             "pixel_mask": jax.ShapeDtypeStruct((batch_size, height, width), jnp.bool_),
             "orig_size": jax.ShapeDtypeStruct((batch_size, 2), jnp.int32),
             "image_index": jax.ShapeDtypeStruct((batch_size,), jnp.int32)}
    predict = evaluate.Predictor(self.method, self.mesh)(int(self.config.total_steps))
    with jax.set_mesh(self.mesh):
      return predict.lower(evaluate.eval_params(self.config, self.state),
                           self.state.model_state, batch)


def step_variants(config, method):
  """[(weight, stage, labeled, unlabeled)] of one device's batch over the schedule: the
  per-device share of the paper's batch; Semi-DETR: L = 1 and 2 per detector stage, weighted so
  that the affine FLOPs(L) average to E[L] (see the module docstring)."""
  if config.get("method") != "semi_detr":
    return [(1.0, method.stage_at(0), max(1, int(config.data.batch_size) // PAPER_GPUS), 0)]
  from sized_detr_jax.semi import method as semi_method  # pylint: disable=import-outside-toplevel
  from sized_detr_jax.semi import sampler  # pylint: disable=import-outside-toplevel
  k = int(config.semi.images_per_group)
  p = sampler.official_ratio(config.semi.sample_ratio)
  n = np.arange(k + 1)
  expected_l = float(np.sum(np.clip(n, 1, k - 1) * stats.binom.pmf(n, k, p)))
  fixed = config.semi.batch_sampler != "by_prob"  # one composition: the configured batch
  total = int(config.total_steps)
  switch = method.stage_at(total - 1)
  stage1 = semi_method.detector_stage(method.stage_at(0))
  share2 = 0.0 if semi_method.detector_stage(switch) == stage1 else (
      1.0 - float(config.semi.switch_fraction))
  variants = []
  for detector, share in ((1, 1.0 - share2), (2, share2)):
    if share == 0.0:
      continue
    if fixed:
      variants.append((share, detector, int(config.data.batch_size),
                       int(config.data.unlabeled_batch_size)))
      continue
    for labeled, weight in ((1, 2.0 - expected_l), (2, expected_l - 1.0)):
      variants.append((share * weight, semi_method.Stage(detector, labeled), labeled,
                       k - labeled))
  return variants


def host_solve_seconds(problems, gt_valid, reps=3):
  """Median host seconds to solve one step's matching problems (`matching.solve_host_problem` on
  random costs, `gt_valid` valid columns each), as the callback does."""
  rng = np.random.default_rng(0)
  prepared = []
  for shape, prune in problems:
    cost = rng.uniform(0, 10, shape).astype(np.float32)
    valid = np.zeros(shape[:-2] + shape[-1:], bool)
    valid[..., :min(gt_valid, shape[-1])] = True
    problem = tuple(np.asarray(x) for x in jax.jit(matching.host_problem, static_argnums=1)(
        cost, prune))
    prepared.append((problem, valid))
  times = []
  for _ in range(reps):
    start = time.perf_counter()
    for problem, valid in prepared:
      matching.solve_host_problem(problem, valid)
    times.append(time.perf_counter() - start)
  return float(np.median(times))


def _count_problems(problems):
  return int(sum(np.prod(shape[:-2]) for shape, _ in problems))


def row_flops(row, size, dry_run, cache, log, gt_valid=7):
  """The row's train / inference FLOPs per image and host matching figures (cached by key)."""
  key = f"flops/{row.key}/{size[0]}x{size[1]}/{'dry' if dry_run else 'full'}"
  if key in cache:
    return cache[key]
  config = load_row_config(row, dry_run)
  start = time.perf_counter()
  built = Built(config)
  variants, per_variant = step_variants(config, built.method), []
  for weight, stage, labeled, unlabeled in variants:
    t0 = time.perf_counter()
    lowered, problems = built.lower_train_step(stage, abstract_batch(config, *size, labeled,
                                                                     unlabeled))
    images = labeled + unlabeled
    per_variant.append({"weight": weight, "stage": str(stage), "labeled": labeled,
                        "unlabeled": unlabeled, "flops_per_step": flops_of(lowered),
                        "matching_problems": _count_problems(problems),
                        "problem_shapes": [list(s) for s, _ in problems],
                        "host_solve_s": host_solve_seconds(problems, gt_valid),
                        "images": images, "lower_s": time.perf_counter() - t0})
    log(f"  {row.key} stage {stage}, {labeled}+{unlabeled} images: "
        f"{per_variant[-1]['flops_per_step'] / images / 1e9:.1f} GFLOP/image, "
        f"{per_variant[-1]['matching_problems']} matching problems, lowered in "
        f"{per_variant[-1]['lower_s']:.0f} s")
  mean = lambda field: sum(v["weight"] * v[field] for v in per_variant)
  eval_batch = max(1, int(config.data.eval_batch_size) // PAPER_GPUS)
  inference = flops_of(built.lower_inference(eval_batch, *size)) / eval_batch
  images_per_step = int(built.method.images_per_step)
  result = {
      "row": row.title, "config": ":".join(
          [row.config] + [a for a in [row.dry_arg if dry_run else row.config_arg] if a]),
      "params": built.num_params, "dtype": str(config.model.get("dtype", "float32")),
      "size": list(size), "variants": per_variant,
      "train_flops_per_image": mean("flops_per_step") / mean("images"),
      "inference_flops_per_image": inference, "eval_batch_per_device": eval_batch,
      "images_per_device_step": mean("images"),
      "matching_problems_per_image": mean("matching_problems") / mean("images"),
      "host_solve_s_per_image": mean("host_solve_s") / mean("images"),
      "total_steps": int(config.total_steps), "images_per_step": images_per_step,
      "total_images": int(config.total_steps) * images_per_step,
      "seconds": time.perf_counter() - start}
  cache[key] = result
  return result


def row_memory(row, size, dry_run, batch, remat, cache, log):
  """Compiled train-step memory analysis of the row at per-device `batch` (cached by key)."""
  key = f"memory/{row.key}/{size[0]}x{size[1]}/{'dry' if dry_run else 'full'}/b{batch}/remat{int(remat)}"
  if key in cache:
    return cache[key]
  config = load_row_config(row, dry_run, [f"model.remat={remat}"])
  built = Built(config)
  (_, stage, labeled, unlabeled), = step_variants(config, built.method)[:1]
  if unlabeled:  # a Semi-DETR group scaled to `batch` images, labeled share kept
    labeled = max(1, round(batch * labeled / (labeled + unlabeled)))
    unlabeled = batch - labeled
  else:
    labeled = batch
  start = time.perf_counter()
  lowered, _ = built.lower_train_step(stage, abstract_batch(config, *size, labeled, unlabeled))
  compiled = lowered.compile()
  memory = compiled.memory_analysis()
  result = {"row": row.key, "batch": batch, "remat": remat,
            "backend": f"{jax.devices()[0].platform} ({jax.devices()[0].device_kind})",
            "temp_bytes": int(memory.temp_size_in_bytes),
            "argument_bytes": int(memory.argument_size_in_bytes),
            "output_bytes": int(memory.output_size_in_bytes),
            "alias_bytes": int(memory.alias_size_in_bytes),
            "compiled_flops": flops_of(compiled), "compile_s": time.perf_counter() - start}
  result["total_bytes"] = result["temp_bytes"] + result["argument_bytes"] + result["output_bytes"]
  result["bytes_per_image"] = result["total_bytes"] / batch
  log(f"  {row.key} batch {batch} remat={remat}: {result['total_bytes'] / 2**30:.2f} GiB "
      f"({result['temp_bytes'] / 2**30:.2f} temporaries), compiled in {result['compile_s']:.0f} s")
  cache[key] = result
  return result


def wall_times(flops, mfu):
  """Per platform at utilisation `mfu`: hours, images/s in total and per host, and the host's
  matching load (problems/s, cores busy solving) for a row's FLOPs figures."""
  out = {}
  for p in PLATFORMS:
    peak = p.peak_bf16 if flops["dtype"] == "bfloat16" else p.peak_f32
    rate = p.chips * peak * 1e12 * mfu
    seconds = flops["total_images"] * flops["train_flops_per_image"] / rate
    img_s = flops["total_images"] / seconds
    out[p.name] = {"hours": seconds / 3600, "img_s": img_s, "img_s_per_host": img_s / p.hosts,
                   "matching_problems_per_s_per_host":
                       img_s / p.hosts * flops["matching_problems_per_image"],
                   "host_matching_cores": img_s / p.hosts * flops["host_solve_s_per_image"]}
  return out


def markdown(results, header):
  """The tables of docs/scale.md."""
  lines = [f"Generated by `{header['command']}` on {header['host']} ({header['date']}, "
           f"load {header['load']}); jax {header['jax']}, backend {header['backend']}.", "",
           "### FLOPs per image (XLA cost analysis of the lowered modules)", "",
           "| paper row | config | params | train step GFLOP/image | inference GFLOP/image | "
           "images / device step | matching problems / image |", "|---|---|---|---|---|---|---|"]
  for f in results["flops"].values():
    lines.append(f"| {f['row']} | {f['config']} | {f['params'] / 1e6:.1f} M | "
                 f"{f['train_flops_per_image'] / 1e9:,.0f} | "
                 f"{f['inference_flops_per_image'] / 1e9:,.0f} | "
                 f"{f['images_per_device_step']:.2f} | {f['matching_problems_per_image']:.2f} |")
  if results["memory"]:
    lines += ["", f"### Train-step memory per device ({header['backend']} memory analysis)", "",
              "| row | batch / device | remat | temporaries GiB | arguments GiB | outputs GiB | "
              "total GiB | GiB / image | total less the donated state's alias, GiB | "
              "compiled GFLOP / image |", "|---|---|---|---|---|---|---|---|---|---|"]
    for m in sorted(results["memory"].values(), key=lambda m: (m["row"], m["remat"],
                                                                m["batch"])):
      g = lambda b: f"{b / 2**30:.2f}"
      lines.append(f"| {m['row']} | {m['batch']} | {'yes' if m['remat'] else 'no'} | "
                   f"{g(m['temp_bytes'])} | {g(m['argument_bytes'])} | {g(m['output_bytes'])} "
                   f"| {g(m['total_bytes'])} | {g(m['bytes_per_image'])} | "
                   f"{g(m['total_bytes'] - m['alias_bytes'])} | "
                   f"{m['compiled_flops'] / m['batch'] / 1e9:,.0f} |")
  mfus = header["mfu"]
  lines += ["", "### Expected wall time at MFU " + " / ".join(f"{m:.0%}" for m in mfus)
            + " (f32 model; dense peaks per chip: "
            + "; ".join(f"{p.name} {p.peak_f32:g} TFLOP/s" for p in PLATFORMS) + ")", "",
            "| paper row | images | " + " | ".join(p.name for p in PLATFORMS) + " |",
            "|---|---|" + "---|" * len(PLATFORMS)]
  for key, f in results["flops"].items():
    w = results["wall"][key]
    lines.append(f"| {f['row']} | {f['total_images'] / 1e6:.2f} M | " + " | ".join(
        " / ".join(f"{w[str(m)][p.name]['hours']:.1f} h" for m in mfus) for p in PLATFORMS)
        + " |")
  pipe = header["pipeline_img_s"]
  lines += ["", f"### What the host must keep up with, per host, at MFU {mfus[0]:.0%}", "",
            "| paper row | platform | images/s per host | matching problems/s per host | "
            "host cores busy with the matching | input pipeline |", "|---|---|---|---|---|---|"]
  for key, f in results["flops"].items():
    for p in PLATFORMS:
      w = results["wall"][key][str(mfus[0])][p.name]
      pipe_text = (f"needs {w['img_s_per_host']:.0f} img/s; measured {pipe:.0f} img/s: "
                   f"{w['img_s_per_host'] / pipe:.1f} such hosts' worth" if pipe else
                   f"needs {w['img_s_per_host']:.0f} img/s")
      lines.append(f"| {f['row']} | {p.name} | {w['img_s_per_host']:.0f} | "
                   f"{w['matching_problems_per_s_per_host']:,.0f} | "
                   f"{w['host_matching_cores']:.2f} | {pipe_text} |")
  return "\n".join(lines) + "\n"


def run(*, rows, size, dry_run=False, memory_rows=(), memory_batches=(2, 4, 8), mfu=(0.25,),
        gt_valid=7, pipeline_img_s=0.0, out="", fresh=False, command="", log=print):
  """Computes (or takes from --out's cache) every figure; writes scale.json / scale.md to `out`.

  Returns:
    (results dict: flops / memory / wall per row, the markdown tables).
  """
  unknown = sorted(set(rows) - set(ROWS))
  if unknown:
    raise ValueError(f"unknown rows {unknown}; known: {sorted(ROWS)}")
  cache_path = os.path.join(out, "scale.json") if out else ""
  cache = {}
  if cache_path and os.path.exists(cache_path) and not fresh:
    with open(cache_path) as f:
      cache = json.load(f).get("cache", {})
  device = jax.devices()[0]
  header = {"command": command, "host": f"{platform.node()} ({os.cpu_count()} CPUs)",
            "date": time.strftime("%Y-%m-%d %H:%M"), "load": f"{os.getloadavg()[0]:.1f}",
            "jax": jax.__version__, "mfu": list(mfu), "pipeline_img_s": pipeline_img_s,
            "backend": f"{device.platform} ({device.device_kind})"}
  results = {"flops": {}, "memory": {}, "wall": {}}

  def save():
    if cache_path:
      os.makedirs(out, exist_ok=True)
      with open(cache_path, "w") as f:
        json.dump({"header": header, "results": results, "cache": cache}, f, indent=1)

  for key in rows:
    results["flops"][key] = row_flops(ROWS[key], size, dry_run, cache, log, gt_valid)
    results["wall"][key] = {str(m): wall_times(results["flops"][key], m) for m in mfu}
    save()
    for remat in ((False, True) if key in memory_rows else ()):
      for b in memory_batches:
        m = row_memory(ROWS[key], size, dry_run, b, remat, cache, log)
        results["memory"][f"{key}/b{b}/remat{int(remat)}"] = m
        save()
  table = markdown(results, header)
  if out:
    with open(os.path.join(out, "scale.md"), "w") as f:
      f.write(table)
  return results, table


def main(argv):
  del argv
  size = tuple(int(v) for v in ("64x64" if FLAGS.dry_run else FLAGS.size).lower().split("x"))
  command = ("python -m sized_detr_jax.benchmarks.scale " + " ".join(
      f"--{k}={v}" for k, v in (("rows", ",".join(FLAGS.rows)),
                                ("memory_rows", ",".join(FLAGS.memory_rows)),
                                ("memory_batches", ",".join(FLAGS.memory_batches)),
                                ("size", FLAGS.size), ("mfu", ",".join(FLAGS.mfu)),
                                ("gt_valid", FLAGS.gt_valid),
                                ("pipeline_img_s", FLAGS.pipeline_img_s)))
             + (" --dry_run" if FLAGS.dry_run else ""))
  try:
    _, table = run(rows=FLAGS.rows, size=size, dry_run=FLAGS.dry_run,
                   memory_rows=FLAGS.memory_rows,
                   memory_batches=[int(b) for b in FLAGS.memory_batches],
                   mfu=[float(m) for m in FLAGS.mfu], gt_valid=FLAGS.gt_valid, pipeline_img_s=FLAGS.pipeline_img_s,
                   out=FLAGS.out, fresh=FLAGS.fresh, command=command,
                   log=lambda text: print(text, flush=True))
  except ValueError as e:
    raise app.UsageError(str(e)) from e
  print(table)


if __name__ == "__main__":
  app.run(main)
