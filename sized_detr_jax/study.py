r"""Multi-seed study: every variant x seed as one `run.py` run, then paired statistics and plots.

  python -m sized_detr_jax.study --config=synthetic:smoke \
      --variants='l1=;sized=criterion.bbox_loss=sized_l1,criterion.sized_l1_rescale=True' \
      --seeds=0,1 --workdir=runs/study [--baseline=l1] [--parallel=1] [--overrides=total_steps=2]

A thin layer over run.py (no second trainer): each variant x seed is one subprocess
`python run.py --config=SPEC --workdir=DIR/<variant>/seed<k> --config.seed=k --config.<override>...`
(the `--overrides` first, then the variant's), its output in `DIR/<variant>/seed<k>/run.log`.
Runs go one at a time (`--parallel=N`: N at once). A run whose `eval_metrics.json` is for the
final step is skipped, so a killed study continues where it stopped (run.py resumes a run's
workdir from its newest checkpoint). A failing run is reported (exit code, log path, last lines)
and the others go on; the study then exits with status 1. A run folder whose `config.json`
differs from the variant's config is not touched and counts as failed (a renamed or edited
variant would otherwise resume someone else's checkpoints).

Then it writes, from what finished:
  * `DIR/study.json`: per run the metrics and wall time; per variant mean, std (ddof=1: the
    sample standard deviation over seeds, None for one seed) and n of `METRICS`; per variant
    and metric the paired per-seed difference to the baseline variant (mean, t-based 95%
    confidence interval, two-sided paired t-test and sign-test p-values, seeds higher/lower);
  * `DIR/study.md`: the same as tables (with `--log_metrics`, also per variant the mean over
    seeds of each run's mean of those metrics.jsonl keys, e.g. Semi-DETR's pseudo-label count);
  * `DIR/study_ap_by_size.png`: AP, APs, APm, APl per variant (+- std), class-aware and
    class-agnostic;
  * `DIR/study_curves.png`: loss terms over steps, the box-loss share by size and, when the runs
    logged them (`config.log_grad_split`), the gradient norms per loss kind and the clip
    fraction (seed means; metrics.jsonl's last record of a step wins after a resume).

Metrics (0-1): AP, AP50, AP75, APs, APm, APl from the run's `eval_metrics.json`; recomputed
with pycocotools from `detections_<step>.json` and the config's val ground truth:
AP50/AP75 per size (`AP50_small`, ...: COCOeval's precision at that IoU and area range, 100
detections per image) and the class-agnostic `agnostic_AP*` (every category merged into one,
in the ground truth and the detections: localisation without classification; a box detected
under several labels then counts once as a hit and otherwise as false positives). pycocotools'
-1 (no ground truth of that size) is treated as missing: it is left out of means and n.
"""
import concurrent.futures
import contextlib
import copy
import dataclasses
import datetime
import io
import json
import math
import os
import re
import shlex
import subprocess
import sys
import threading
import time

from absl import app
from absl import flags
import numpy as np

from sized_detr_jax import config_lib
from sized_detr_jax import evaluate
from sized_detr_jax import metrics_log

SIZES = ("small", "medium", "large")
COCO_METRICS = ("AP", "AP50", "AP75", "APs", "APm", "APl")
PER_SIZE_METRICS = tuple(f"AP{iou}_{size}" for iou in (50, 75) for size in SIZES)
AGNOSTIC_METRICS = tuple(f"agnostic_{m}" for m in COCO_METRICS)
METRICS = COCO_METRICS + PER_SIZE_METRICS + AGNOSTIC_METRICS
LOSS_CURVES = ("loss", "loss_ce", "loss_bbox", "loss_giou")
SHARE_CURVES = tuple(f"share_{s}" for s in SIZES)  # box_loss_share per size
# Gradient diagnostics (config.log_grad_split=True): total norm before clipping, per loss kind
# (logged on log steps) and the share of steps whose gradient was clipped.
GRAD_CURVES = ("grad_norm", "grad_norm_ce", "grad_norm_bbox", "grad_norm_giou", "clip_fraction")
CURVES = LOSS_CURVES + SHARE_CURVES + GRAD_CURVES
STD_DDOF = 1
CONFIDENCE = 0.95
# Each run is `python -m sized_detr_jax.cli` (what run.py and `sized-detr` run), with this
# package's parent first on PYTHONPATH so a checkout and an installed package both work.
_CLI = ("-m", "sized_detr_jax.cli")
_PACKAGE_PARENT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_TAIL_LINES = 20

flags.DEFINE_string("config", None, "Config spec passed to run.py, e.g. "
                    "synthetic:smoke.")
flags.DEFINE_string("variants", None, "'name=override,override;name2=...': overrides are config "
                    "fields without the --config. prefix, e.g. 'l1=;sized=criterion.bbox_loss="
                    "sized_l1'. An empty list runs the config as it is.")
flags.DEFINE_list("seeds", ["0", "1", "2"], "Seeds (config.seed) run for every variant.")
flags.DEFINE_string("workdir", None, "Study folder: one sub-folder per variant and seed, and the "
                    "study.* reports.")
flags.DEFINE_string("baseline", None, "Variant the others are compared to (default: the first).")
flags.DEFINE_integer("parallel", 1, "Runs at once (each run.py uses every core it gets).")
flags.DEFINE_string("overrides", "", "Overrides for every variant, applied before the variant's, "
                    "e.g. 'total_steps=500,log_every=50'.")
flags.DEFINE_bool("report_only", False, "Run nothing; rewrite the reports from the finished runs "
                  "(e.g. with another --baseline or a subset of --variants).")
flags.DEFINE_list("log_metrics", [], "metrics.jsonl keys whose per-run mean over the logged steps "
                  "(from --log_from) the reports summarise per variant, e.g. "
                  "metric_pseudo_final (pseudo-labels per image of Semi-DETR's final set).")
flags.DEFINE_integer("log_from", 0, "First step counted in the --log_metrics means.")
flags.DEFINE_string("report_name", "study", "Reports are DIR/<name>.json, .md, "
                    "<name>_ap_by_size.png and <name>_curves.png.")
FLAGS = flags.FLAGS


# ---------------------------------------------------------------------------------------------
# Variants and configs.
# ---------------------------------------------------------------------------------------------
def parse_overrides(text):
  """'a.b=1,c=(1,2)' -> ['a.b=1', 'c=(1,2)'].

  A comma starts a new override only when `key=` follows it, so tuple values keep their
  commas. A leading `--config.` or `config.` is dropped.
  """
  parts = [p.strip() for p in re.split(r",(?=\s*(?:--)?[A-Za-z_][\w.]*=)", text or "")]
  out = []
  for p in parts:
    if not p:
      continue
    p = re.sub(r"^(--)?config\.", "", p)
    if "=" not in p or not re.match(r"^[A-Za-z_][\w.]*$", p.split("=", 1)[0]):
      raise ValueError(f"override {p!r} is not field.path=value")
    if p.split("=", 1)[0] == "seed":
      raise ValueError(f"override {p!r}: the seed is set by --seeds")
    out.append(p)
  return out


def parse_variants(text):
  """'l1=;sized=criterion.bbox_loss=sized_l1,x=1' -> {'l1': [], 'sized': [..., 'x=1']}, in order."""
  variants = {}
  for item in (text or "").split(";"):
    if not item.strip():
      continue
    name, sep, overrides = item.partition("=")
    name = name.strip()
    if not sep or not re.match(r"^[A-Za-z0-9][\w.+-]*$", name):
      raise ValueError(f"--variants entry {item!r} is not name=override,override... (a name of "
                       "letters, digits, _ . + -)")
    if name in variants:
      raise ValueError(f"--variants: variant {name!r} given twice")
    variants[name] = parse_overrides(overrides)
  if not variants:
    raise ValueError("--variants is empty: give at least one name=overrides entry")
  return variants


def resolve_config(spec, overrides, seed):
  """The ConfigDict run.py builds from `--config=spec --config.seed=seed --config.<o>...`,
  finalised as run.py does (`config_lib.finalize`; what config.json records)."""
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  argv = ["run.py", f"--config={spec}", f"--config.seed={seed}",
          *[f"--config.{o}" for o in overrides]]
  fv = flags.FlagValues()
  config_flags.DEFINE_config_file("config", None, "", flag_values=fv, lock_config=True,
                                  sys_argv=argv)
  try:
    fv(argv)
  except (KeyError, AttributeError, flags.Error) as e:
    msg = str(e).strip("'\"").replace("\\n", " ").replace("\n", " ")
    raise ValueError(f"config {spec} with overrides {overrides}: {msg}") from None
  try:
    return config_lib.finalize(fv.config)
  except ValueError as e:
    raise ValueError(f"config {spec} with overrides {overrides}: {e}") from None


def _flat(tree, prefix=""):
  if isinstance(tree, dict):
    out = {}
    for k, v in tree.items():
      out.update(_flat(v, f"{prefix}{k}."))
    return out
  return {prefix[:-1]: tree}


def config_differences(saved, expected):
  """Dotted field names whose values differ between two config.json dicts.

  Fields `saved` does not have were added to the configs after that run was made (e.g. the
  sources of derived values, `data.size` or `optimizer.lr_drop_fractions`): they are not
  differences, the resolved values of the fields both have decide.
  """
  a, b = _flat(saved), _flat(expected)
  return sorted(k for k in a if a[k] != b.get(k, "<absent>"))


# ---------------------------------------------------------------------------------------------
# Running.
# ---------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Job:
  """One run.py run of a study: variant x seed."""
  variant: str
  seed: int
  workdir: str            # absolute run folder
  argv: list              # full command line
  total_steps: int
  config_json: dict = None  # the config run.py will write to config.json (None: no check)

  @property
  def name(self):
    return f"{self.variant}/seed{self.seed}"

  @property
  def log_path(self):
    return os.path.join(self.workdir, "run.log")


def plan_jobs(spec, variants, seeds, workdir, common_overrides=(), python=sys.executable):
  """Job per variant x seed, seed-major (a study cut short leaves complete seeds: paired
  differences), with its resolved config (validates overrides)."""
  jobs = []
  for seed in seeds:
    for variant, overrides in variants.items():
      overrides = list(common_overrides) + list(overrides)
      config = resolve_config(spec, overrides, seed)
      if not config.get("eval_at_end", True):
        raise ValueError(f"variant {variant}: config.eval_at_end=False, but the study needs "
                         "the evaluation at the final step")
      run_dir = os.path.join(os.path.abspath(workdir), variant, f"seed{seed}")
      argv = [python, *_CLI, f"--config={spec}", f"--workdir={run_dir}",
              f"--config.seed={seed}", *[f"--config.{o}" for o in overrides]]
      jobs.append(Job(variant, int(seed), run_dir, argv, int(config.total_steps),
                      json.loads(config.to_json_best_effort())))
  return jobs


def finished_step(workdir, total_steps):
  """`total_steps` if the run's eval_metrics.json and detections are for that step, else None."""
  try:
    with open(os.path.join(workdir, "eval_metrics.json")) as f:
      step = int(json.load(f)["step"])
  except (OSError, ValueError, KeyError):
    return None
  if step != total_steps or not os.path.exists(os.path.join(workdir, f"detections_{step}.json")):
    return None
  return step


# Exec wrapper: the run gets SIGTERM when the study dies (Linux PR_SET_PDEATHSIG survives exec),
# so a restarted study never trains next to an orphan in the same run folder. (A preexec_fn
# would do the same but is unsafe with --parallel's threads.)
_EXEC_WITH_PDEATHSIG = ("import ctypes, os, signal, sys; "
                        "ctypes.CDLL(None).prctl(1, signal.SIGTERM); "
                        "os.getppid() == int(sys.argv[1]) or sys.exit(143); "
                        "os.execv(sys.argv[2], sys.argv[2:])")


def _launch_argv(argv):
  if sys.platform.startswith("linux"):
    return [sys.executable, "-c", _EXEC_WITH_PDEATHSIG, str(os.getpid()), *argv]
  return list(argv)


def _child_env():
  """This process's environment with the package's parent first on PYTHONPATH."""
  path = os.environ.get("PYTHONPATH")
  return dict(os.environ, PYTHONPATH=_PACKAGE_PARENT + (os.pathsep + path if path else ""))


def _load():
  """1, 5 and 15-minute load averages (as `uptime` prints them)."""
  return [round(x, 2) for x in os.getloadavg()]


def _tail(path, n=_TAIL_LINES):
  try:
    with open(path, errors="replace") as f:
      return [l.rstrip("\n") for l in f.readlines()[-n:]]
  except OSError:
    return []


def _read_json(path, default=None):
  try:
    with open(path) as f:
      return json.load(f)
  except (OSError, ValueError):
    return default


def _write_json(path, obj):
  tmp = f"{path}.tmp"
  with open(tmp, "w") as f:
    json.dump(obj, f, indent=1, allow_nan=False)
  os.replace(tmp, path)


def run_job(job, log=print):
  """Run (or skip) one job. Returns {"status": skipped|done|failed, ...}.

  Every attempt appends its timing to `<run>/study_run.json`: wall seconds, exit code and the
  load averages before and after.
  """
  saved = _read_json(os.path.join(job.workdir, "config.json"))
  if saved is not None and job.config_json is not None:
    diff = config_differences(saved, job.config_json)
    if diff:
      msg = (f"{job.workdir}/config.json differs from this variant's config in "
             f"{', '.join(diff[:8])}{' ...' if len(diff) > 8 else ''}: delete the folder or "
             "use another --workdir")
      log(f"[study] FAILED {job.name}: {msg}")
      return {"status": "failed", "error": msg, "log": None, "tail": []}
  if finished_step(job.workdir, job.total_steps) is not None:
    log(f"[study] skipped {job.name}: finished (eval at step {job.total_steps})")
    return {"status": "skipped"}
  os.makedirs(job.workdir, exist_ok=True)
  log(f"[study] started {job.name}: {shlex.join(job.argv[1:])}")
  attempt = {"started": datetime.datetime.now().isoformat(timespec="seconds"),
             "load_start": _load()}
  t0 = time.perf_counter()
  with open(job.log_path, "a") as logf:
    logf.write(f"\n=== study attempt {attempt['started']}: {shlex.join(job.argv)}\n")
    logf.flush()
    rc = subprocess.call(_launch_argv(job.argv), stdout=logf, stderr=subprocess.STDOUT,
                         stdin=subprocess.DEVNULL, env=_child_env())
  attempt.update(wall_s=round(time.perf_counter() - t0, 2), returncode=rc, load_end=_load())
  record_path = os.path.join(job.workdir, "study_run.json")
  record = _read_json(record_path, {"variant": job.variant, "seed": job.seed, "attempts": []})
  record["command"] = shlex.join(["python", *job.argv[1:]])
  record["attempts"].append(attempt)
  _write_json(record_path, record)
  if rc == 0 and finished_step(job.workdir, job.total_steps) is None:
    rc, why = -1, f"exit 0 but no eval_metrics.json for step {job.total_steps}"
  else:
    why = f"exit code {rc}"
  if rc != 0:
    tail = _tail(job.log_path)
    log(f"[study] FAILED {job.name} ({why}, {attempt['wall_s']:.0f} s); log: {job.log_path}; "
        "last lines:\n" + "\n".join("    " + l for l in tail))
    return {"status": "failed", "error": why, "log": job.log_path, "tail": tail}
  log(f"[study] done {job.name} in {attempt['wall_s']:.1f} s (load {attempt['load_start']} -> "
      f"{attempt['load_end']})")
  return {"status": "done"}


def run_jobs(jobs, parallel=1, log=print):
  """Run every job, `parallel` at a time, in order. Returns {job.name: run_job result}."""
  lock = threading.Lock()

  def locked_log(msg):
    with lock:
      log(msg)
      sys.stdout.flush()

  if parallel <= 1:
    return {job.name: run_job(job, locked_log) for job in jobs}
  with concurrent.futures.ThreadPoolExecutor(max_workers=parallel) as pool:
    futures = {job.name: pool.submit(run_job, job, locked_log) for job in jobs}
    return {name: f.result() for name, f in futures.items()}


# ---------------------------------------------------------------------------------------------
# Per-run metrics (pycocotools).
# ---------------------------------------------------------------------------------------------
def _coco_eval(gt_dataset, detections):
  """Evaluated + accumulated bbox COCOeval, or None when there are no detections."""
  from pycocotools.cocoeval import COCOeval  # pylint: disable=g-import-not-at-top
  from sized_detr_jax import evaluate  # pylint: disable=g-import-not-at-top
  if not detections:
    return None
  coco_gt = evaluate.load_coco(gt_dataset)
  with contextlib.redirect_stdout(io.StringIO()):
    coco_eval = COCOeval(coco_gt, coco_gt.loadRes(copy.deepcopy(detections)), "bbox")
    coco_eval.evaluate()
    coco_eval.accumulate()
    coco_eval.summarize()
  return coco_eval


def precision_ap(coco_eval, *, iou=None, area="all", max_dets=100):
  """AP from COCOeval's precision array [T, R, K, A, M] as pycocotools' summarize averages it.

  Args:
    coco_eval: an accumulated COCOeval.
    iou: IoU threshold (e.g. 0.5), or None for the mean over 0.50:0.95.
    area: "all", "small", "medium" or "large".
    max_dets: detections per image (one of params.maxDets).

  Returns:
    float in [0, 1], or -1.0 when no ground truth has that size (pycocotools' convention).
  """
  p = coco_eval.params
  precision = coco_eval.eval["precision"]  # [T, R, K, A, M]
  if iou is not None:
    t = np.nonzero(np.isclose(p.iouThrs, iou))[0]
    if not len(t):
      raise ValueError(f"IoU {iou} is not one of COCOeval's thresholds {list(p.iouThrs)}")
    precision = precision[t]
  precision = precision[:, :, :, p.areaRngLbl.index(area), p.maxDets.index(max_dets)]
  valid = precision[precision > -1]
  return float(np.mean(valid)) if valid.size else -1.0


def class_agnostic(gt_dataset, detections):
  """(gt dataset, detections) with every category merged into category 1."""
  gt = dict(gt_dataset)
  gt["categories"] = [{"id": 1, "name": "object", "supercategory": "object"}]
  gt["annotations"] = [{**a, "category_id": 1} for a in gt_dataset["annotations"]]
  return gt, [{**d, "category_id": 1} for d in detections]


def detection_metrics(gt_dataset, detections):
  """PER_SIZE_METRICS and AGNOSTIC_METRICS of one run's detections (see the module docstring).

  Args:
    gt_dataset: COCO ground-truth dict (the config's val_gt_json).
    detections: COCO results list ({image_id, category_id, bbox xywh in pixels, score}).
  """
  out = {}
  ev = _coco_eval(gt_dataset, detections)
  for iou in (50, 75):
    for size in SIZES:
      out[f"AP{iou}_{size}"] = 0.0 if ev is None else precision_ap(ev, iou=iou / 100, area=size)
  ev = _coco_eval(*class_agnostic(gt_dataset, detections))
  for name, value in zip(COCO_METRICS, np.zeros(6) if ev is None else ev.stats[:6]):
    out[f"agnostic_{name}"] = float(value)
  return out


def run_metrics(workdir, step, gt_json, gt_cache=None):
  """All METRICS of a finished run; the pycocotools part is cached in `<run>/study_eval.json`."""
  metrics = {k: v for k, v in _read_json(os.path.join(workdir, "eval_metrics.json")).items()
             if k in COCO_METRICS}
  cache_path = os.path.join(workdir, "study_eval.json")
  cache = _read_json(cache_path, {})
  if cache.get("step") == step and cache.get("gt_json") == gt_json and all(
      k in cache.get("metrics", {}) for k in PER_SIZE_METRICS + AGNOSTIC_METRICS):
    return {**metrics, **cache["metrics"]}
  gt_cache = {} if gt_cache is None else gt_cache
  if gt_json not in gt_cache:
    gt_cache[gt_json] = _read_json(gt_json)
    if gt_cache[gt_json] is None:
      raise FileNotFoundError(f"cannot read the val ground truth {gt_json}")
  detections = _read_json(os.path.join(workdir, f"detections_{step}.json"))
  extra = detection_metrics(gt_cache[gt_json], detections)
  _write_json(cache_path, {"step": step, "gt_json": gt_json, "metrics": extra})
  return {**metrics, **extra}


def val_gt_json(config):
  """The val ground-truth json path the trainer evaluates against (as run.py resolves it)."""
  from sized_detr_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  return pipeline.dataset_info(config.data)["val_gt_json"]


# ---------------------------------------------------------------------------------------------
# Statistics (pure functions).
# ---------------------------------------------------------------------------------------------
def _valid(v):
  return v is not None and math.isfinite(v) and v != -1


def _num(x):
  """float or None (JSON has no NaN)."""
  return None if x is None or not math.isfinite(x) else float(x)


def summarize(per_run, metrics=METRICS, ddof=STD_DDOF):
  """Mean, std and n over seeds.

  Args:
    per_run: {variant: {seed: {metric: value}}}; None, NaN and -1 values are missing.
    metrics: metric names to summarise.
    ddof: delta degrees of freedom of the std (1: sample std).

  Returns:
    {variant: {metric: {"mean", "std", "n", "seeds", "values"}}}: mean/std None when there are
    too few values (std needs n > ddof); seeds/values are the used ones, seeds ascending.
  """
  out = {}
  for variant, runs in per_run.items():
    out[variant] = {}
    for m in metrics:
      seeds = sorted(s for s, r in runs.items() if _valid(r.get(m)))
      values = np.asarray([runs[s][m] for s in seeds], np.float64)
      n = len(values)
      out[variant][m] = {
          "mean": _num(values.mean()) if n else None,
          "std": _num(values.std(ddof=ddof)) if n > ddof else None,
          "n": n, "seeds": seeds, "values": values.tolist()}
  return out


def paired_difference(values, baseline, confidence=CONFIDENCE):
  """Per-seed differences values[s] - baseline[s] over the seeds both have.

  Args:
    values, baseline: {seed: float}; None, NaN and -1 are missing.
    confidence: level of the t interval.

  Returns:
    dict: n, mean, std (ddof=1), ci (two-sided t interval [lo, hi] of the mean difference:
    mean -+ t_{(1+confidence)/2, n-1} std / sqrt(n); None for n < 2; [mean, mean] when all
    differences are equal), p_t (two-sided paired t-test; None for n < 2 or zero spread),
    higher / lower / tied (seed counts), p_sign (two-sided exact sign test over the untied
    seeds; None if all tie), seeds and diffs.
  """
  from scipy import stats  # pylint: disable=g-import-not-at-top
  seeds = sorted(s for s in values if s in baseline and _valid(values[s]) and _valid(baseline[s]))
  d = np.asarray([values[s] - baseline[s] for s in seeds], np.float64)
  n = len(d)
  out = {"n": n, "seeds": seeds, "diffs": d.tolist(), "mean": _num(d.mean()) if n else None,
         "std": None, "ci": None, "p_t": None,
         "higher": int((d > 0).sum()), "lower": int((d < 0).sum()), "tied": int((d == 0).sum()),
         "p_sign": None}
  if n >= 2:
    std = float(d.std(ddof=1))
    se = std / math.sqrt(n)
    half = float(stats.t.ppf(0.5 + confidence / 2, n - 1)) * se
    out.update(std=std, ci=[float(d.mean() - half), float(d.mean() + half)])
    if se > 0:
      out["p_t"] = float(2 * stats.t.sf(abs(d.mean()) / se, n - 1))
  untied = out["higher"] + out["lower"]
  if untied:
    out["p_sign"] = float(stats.binomtest(out["higher"], untied, 0.5).pvalue)
  return out


def paired_differences(per_run, baseline, metrics=METRICS, confidence=CONFIDENCE):
  """{variant: {metric: paired_difference(variant, baseline)}} for every non-baseline variant."""
  if baseline not in per_run:
    return {}
  return {v: {m: paired_difference({s: r.get(m) for s, r in runs.items()},
                                   {s: r.get(m) for s, r in per_run[baseline].items()},
                                   confidence)
              for m in metrics}
          for v, runs in per_run.items() if v != baseline}


def read_metrics_jsonl(path):
  """Records of a metrics.jsonl by ascending step (`metrics_log.read_metrics`: superseded rows
  before a resume/restart event dropped), the last record of a step winning (files written
  before the events existed). Unreadable lines are skipped; a missing file gives []."""
  try:
    records = metrics_log.read_metrics(path)
  except OSError:
    return []
  by_step = {int(r["step"]): r for r in records if isinstance(r.get("step"), (int, float))}
  return [by_step[s] for s in sorted(by_step)]


def log_means(records, keys, from_step=0):
  """{key: mean over the records at step >= from_step that have a finite key} for each key
  some such record has (records: read_metrics_jsonl's)."""
  out = {}
  for k in keys:
    values = [r[k] for r in records if r["step"] >= from_step and isinstance(r.get(k), (int, float))
              and math.isfinite(r[k])]
    if values:
      out[k] = float(np.mean(values))
  return out


def box_loss_share(record):
  """{size: share} of the final layer's box loss of one metrics record (`evaluate.
  box_loss_share`); None when the record has none of them or they sum to 0."""
  return evaluate.box_loss_share(record)


def mean_curves(runs_records, keys=LOSS_CURVES):
  """Seed-mean curves: {key: (steps, means)} over the steps where any run logged the key.

  Args:
    runs_records: list (one per seed) of record lists from read_metrics_jsonl.
    keys: record keys; `share_<size>` keys are box_loss_share's.
  """
  values = {k: {} for k in keys}
  for records in runs_records:
    for r in records:
      share = box_loss_share(r) or {}
      for k in keys:
        v = share.get(k[len("share_"):]) if k.startswith("share_") else r.get(k)
        if v is not None and math.isfinite(v):
          values[k].setdefault(r["step"], []).append(v)
  return {k: (sorted(v), [float(np.mean(v[s])) for s in sorted(v)]) for k, v in values.items()
          if v}


# ---------------------------------------------------------------------------------------------
# Reports.
# ---------------------------------------------------------------------------------------------
def _fmt(x, digits=3, sign=False):
  if x is None:
    return "-"
  return f"{x:+.{digits}f}" if sign else f"{x:.{digits}f}"


def _mean_std(s):
  if s["n"] == 0:
    return "-"
  return f"{_fmt(s['mean'])} ± {_fmt(s['std'])}"


def _seed_count(d):
  """'2/3 higher, 1 lower' from a paired_difference dict (ties named when any)."""
  text = f"{d['higher']}/{d['n']} higher"
  if d["lower"]:
    text += f", {d['lower']} lower"
  if d["tied"]:
    text += f", {d['tied']} tied"
  return text


def format_markdown(study):
  """study.md text from the study.json dict."""
  variants, summary, base = study["variant_names"], study["summary"], study["baseline"]
  lines = [f"# Study: {study['config']}", "",
           f"Command: `{study['command']}`", "",
           f"Seeds {study['seeds']}; baseline `{base}`; mean ± std over seeds (std ddof="
           f"{study['std_ddof']}), n = seeds with a finished run. Overrides for all variants: "
           f"`{','.join(study['overrides']) or '-'}`.", ""]
  for v in variants:
    lines.append(f"* `{v}`: `{','.join(study['variants'][v]) or '(config as is)'}`")
  groups = [("COCO AP", COCO_METRICS), ("AP50 / AP75 per size", PER_SIZE_METRICS),
            ("Class-agnostic AP (all categories merged)", AGNOSTIC_METRICS)]
  for title, names in groups:
    lines += ["", f"## {title}", "", "| variant | n | " + " | ".join(names) + " |",
              "|---|---|" + "---|" * len(names)]
    for v in variants:
      n = max((summary[v][m]["n"] for m in names), default=0)
      lines.append(f"| {v} | {n} | " + " | ".join(_mean_std(summary[v][m]) for m in names)
                   + " |")
  if study["paired"]:
    lines += ["", f"## Paired per-seed difference against `{base}`", "",
              f"Mean of (variant - {base}) over the common seeds, t-based {int(CONFIDENCE * 100)}% "
              "confidence interval, paired t-test p and exact sign-test p; * where the interval "
              "excludes 0.", "",
              "| variant | metric | n | mean diff | 95% CI | seeds | p (t) | p (sign) |",
              "|---|---|---|---|---|---|---|---|"]
    for v, per_metric in study["paired"].items():
      for m in METRICS:
        d = per_metric[m]
        ci = d["ci"]
        star = "*" if ci and (ci[0] > 0 or ci[1] < 0) else ""
        ci_text = f"[{_fmt(ci[0], sign=True)}, {_fmt(ci[1], sign=True)}]{star}" if ci else "-"
        lines.append(f"| {v} | {m} | {d['n']} | {_fmt(d['mean'], sign=True)} | {ci_text} | "
                     f"{_seed_count(d)} | {_fmt(d['p_t'])} | {_fmt(d['p_sign'])} |")
  if study.get("log_metrics"):
    names = study["log_metrics"]
    lines += ["", "## Training-log metrics", "",
              f"Per run the mean over its logged steps >= {study['log_from']} (metrics.jsonl), "
              "then mean ± std over seeds.", "",
              "| variant | n | " + " | ".join(names) + " |", "|---|---|" + "---|" * len(names)]
    for v in variants:
      s = study["log_summary"][v]
      n = max((s[m]["n"] for m in names), default=0)
      lines.append(f"| {v} | {n} | " + " | ".join(
          _mean_std(s[m]) if s[m]["n"] else "-" for m in names) + " |")
  lines += ["", "## Runs", "",
            "| variant | seed | status | AP | APs | wall s | attempts | load (1/5/15 min) |",
            "|---|---|---|---|---|---|---|---|"]
  for r in study["runs"]:
    m = r.get("metrics") or {}
    load = r.get("load_start")
    lines.append(f"| {r['variant']} | {r['seed']} | {r['status']} | {_fmt(m.get('AP'))} | "
                 f"{_fmt(m.get('APs'))} | {_fmt(r.get('wall_s'), 1)} | {r.get('attempts', 0)} | "
                 f"{' '.join(map(str, load)) if load else '-'} |")
  if study["failed"]:
    lines += ["", "## Failed runs", ""]
    for f in study["failed"]:
      lines.append(f"* {f['variant']}/seed{f['seed']}: {f['error']} (log: {f['log'] or '-'})")
  lines += ["", f"Plots: `{study['report_name']}_ap_by_size.png`, "
            f"`{study['report_name']}_curves.png`.", ""]
  return "\n".join(lines)


def plot_ap_by_size(summary, variants, path):
  """Grouped bars of AP, APs, APm, APl per variant (error bars: std), class-aware and agnostic."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  names = ("AP", "APs", "APm", "APl")
  fig, axes = plt.subplots(1, 2, figsize=(11, 3.8), sharey=True)
  width = 0.8 / max(len(variants), 1)
  for ax, prefix, title in ((axes[0], "", "COCO AP by size"),
                            (axes[1], "agnostic_", "class-agnostic AP by size")):
    for i, v in enumerate(variants):
      stats_ = [summary[v][prefix + n] for n in names]
      ax.bar(np.arange(len(names)) + (i - (len(variants) - 1) / 2) * width,
             [s["mean"] or 0.0 for s in stats_], width,
             yerr=[s["std"] or 0.0 for s in stats_], capsize=3,
             label=f"{v} (n={max(s['n'] for s in stats_)})")
    ax.set_xticks(np.arange(len(names)), names)
    ax.set_title(title)
    ax.grid(axis="y", alpha=0.3)
  axes[0].set_ylabel("AP (mean ± std over seeds)")
  axes[0].legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=90)
  plt.close(fig)


def plot_curves(curves, variants, path):
  """One panel per CURVES key that some variant logged, one line per variant (seed means):
  loss terms, box-loss share by size, gradient norms and clip fraction."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  keys = [k for k in CURVES if k in LOSS_CURVES or any(k in curves.get(v, {}) for v in variants)]
  ncols = 4
  nrows = math.ceil(len(keys) / ncols)
  fig, axes = plt.subplots(nrows, ncols, figsize=(4 * ncols, 3.2 * nrows), squeeze=False)
  for ax, key in zip(axes.flat, keys):
    for v in variants:
      if key in curves.get(v, {}):
        steps, means = curves[v][key]
        ax.plot(steps, means, marker="." if len(steps) < 20 else None, label=v)
    ax.set_title(f"box-loss share: {key[6:]}" if key in SHARE_CURVES else key)
    ax.set_xlabel("step")
    if key in SHARE_CURVES or key == "clip_fraction":
      ax.set_ylim(0, 1)
    elif key in ("loss", "loss_bbox") or key.startswith("grad_norm"):
      ax.set_yscale("log")
    ax.grid(alpha=0.3)
  for ax in list(axes.flat)[len(keys):]:
    ax.axis("off")
  axes[0, 0].legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=80)
  plt.close(fig)


def build_report(study_dir, spec, variants, seeds, baseline, jobs, results, common_overrides=(),
                 command="", name="study", log_metrics=(), log_from=0):
  """Collect metrics of finished runs, compute the statistics, write study.{json,md} and plots.

  Args:
    study_dir: the study folder.
    spec: config spec; variants: {name: overrides}; seeds: ints; baseline: variant name.
    jobs: plan_jobs output; results: {job.name: run_job result} (failed ones are reported).
    common_overrides: the --overrides list; command: the command line to print.
    name: report file stem (study.json, study.md, study_ap_by_size.png, study_curves.png).
    log_metrics, log_from: metrics.jsonl keys summarised per variant (`log_means` per run).

  Returns:
    the study dict written to study.json.
  """
  gt_paths, gt_cache, per_run, runs, curves_in, failed = {}, {}, {}, [], {}, []
  per_run_log = {}
  for job in jobs:
    res = results.get(job.name, {"status": "not run"})
    record = _read_json(os.path.join(job.workdir, "study_run.json"), {"attempts": []})
    attempts = record["attempts"]
    run = {"variant": job.variant, "seed": job.seed,
           "workdir": os.path.relpath(job.workdir, study_dir), "status": res["status"],
           "wall_s": round(sum(a["wall_s"] for a in attempts), 2) if attempts else None,
           "attempts": len(attempts),
           "load_start": attempts[-1]["load_start"] if attempts else None,
           "load_end": attempts[-1]["load_end"] if attempts else None}
    step = finished_step(job.workdir, job.total_steps)
    if res["status"] == "failed" or step is None:
      failed.append({"variant": job.variant, "seed": job.seed,
                     "error": res.get("error", "not finished"),
                     "log": os.path.relpath(res["log"], study_dir) if res.get("log") else None,
                     "tail": res.get("tail", [])})
      run["status"] = "failed"
    else:
      data_key = json.dumps(job.config_json["data"], sort_keys=True)
      if data_key not in gt_paths:
        gt_paths[data_key] = val_gt_json(resolve_config(
            spec, list(common_overrides) + variants[job.variant], job.seed))
      run["step"] = step
      run["gt_json"] = gt_paths[data_key]
      run["metrics"] = run_metrics(job.workdir, step, gt_paths[data_key], gt_cache)
      per_run.setdefault(job.variant, {})[job.seed] = run["metrics"]
      records = read_metrics_jsonl(os.path.join(job.workdir, "metrics.jsonl"))
      curves_in.setdefault(job.variant, []).append(records)
      if log_metrics:
        run["log_means"] = log_means(records, log_metrics, log_from)
        per_run_log.setdefault(job.variant, {})[job.seed] = run["log_means"]
    runs.append(run)
  names = list(variants)
  summary = summarize({v: per_run.get(v, {}) for v in names})
  paired = paired_differences(per_run, baseline) if baseline in per_run else {}
  wall = {}
  for v in names:
    w = [r["wall_s"] for r in runs if r["variant"] == v and r["wall_s"] is not None]
    wall[v] = {"mean_s": _num(float(np.mean(w))) if w else None, "total_s": float(sum(w)),
               "n": len(w)}
  study = {"config": spec, "command": command, "report_name": name, "variants": variants,
           "variant_names": names,
           "overrides": list(common_overrides), "seeds": list(seeds), "baseline": baseline,
           "metrics": list(METRICS), "std_ddof": STD_DDOF, "confidence": CONFIDENCE,
           "gt_json": sorted(set(gt_paths.values())), "summary": summary, "paired": paired,
           "wall": wall, "runs": runs, "failed": failed,
           "log_metrics": list(log_metrics), "log_from": log_from,
           "log_summary": summarize({v: per_run_log.get(v, {}) for v in names}, log_metrics)}
  os.makedirs(study_dir, exist_ok=True)
  _write_json(os.path.join(study_dir, f"{name}.json"), study)
  with open(os.path.join(study_dir, f"{name}.md"), "w") as f:
    f.write(format_markdown(study))
  plot_ap_by_size(summary, names, os.path.join(study_dir, f"{name}_ap_by_size.png"))
  plot_curves({v: mean_curves(rs, CURVES) for v, rs in curves_in.items()}, names,
              os.path.join(study_dir, f"{name}_curves.png"))
  return study


def format_console(study):
  """A few lines for the terminal: AP and AP by size per variant, and AP/APs against baseline."""
  lines = []
  for v in study["variant_names"]:
    s = study["summary"][v]
    lines.append(f"  {v:<16s} n={s['AP']['n']}  " + "  ".join(
        f"{m} {_mean_std(s[m])}" for m in ("AP", "APs", "APm", "APl", "agnostic_APs")))
    if v in study["paired"]:
      for m in ("AP", "APs"):
        d = study["paired"][v][m]
        ci = (f"[{_fmt(d['ci'][0], sign=True)}, {_fmt(d['ci'][1], sign=True)}]"
              if d["ci"] else "-")
        lines.append(f"  {'':<16s} {m} - {study['baseline']}: {_fmt(d['mean'], sign=True)} "
                     f"95% CI {ci}, seeds {_seed_count(d)}")
  return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Entry point.
# ---------------------------------------------------------------------------------------------
def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  try:
    if not FLAGS.config or not FLAGS.workdir:
      raise ValueError("--config and --workdir are required")
    variants = parse_variants(FLAGS.variants)
    common = parse_overrides(FLAGS.overrides)
    seeds = [int(s) for s in FLAGS.seeds]
    if len(set(seeds)) != len(seeds):
      raise ValueError(f"--seeds has duplicates: {seeds}")
    baseline = FLAGS.baseline or next(iter(variants))
    if baseline not in variants:
      raise ValueError(f"--baseline={baseline} is not a variant ({', '.join(variants)})")
    if FLAGS.parallel < 1:
      raise ValueError(f"--parallel={FLAGS.parallel} must be >= 1")
    jobs = plan_jobs(FLAGS.config, variants, seeds, FLAGS.workdir, common)
  except (ValueError, FileNotFoundError) as e:
    sys.exit(f"study: {e}")
  print(f"[study] {len(jobs)} runs ({len(variants)} variants x {len(seeds)} seeds) in "
        f"{FLAGS.workdir}, {FLAGS.parallel} at a time; load {_load()}", flush=True)
  t0 = time.perf_counter()
  if FLAGS.report_only:
    results = {j.name: {"status": "skipped"} for j in jobs}
  else:
    results = run_jobs(jobs, FLAGS.parallel)
  command = shlex.join(["python", "-m", "sized_detr_jax.study", *sys.argv[1:]])
  study = build_report(os.path.abspath(FLAGS.workdir), FLAGS.config, variants, seeds, baseline,
                       jobs, results, common, command, FLAGS.report_name,
                       log_metrics=FLAGS.log_metrics, log_from=FLAGS.log_from)
  print(format_console(study))
  stem = os.path.join(FLAGS.workdir, FLAGS.report_name)
  print(f"[study] wrote {stem}.md, .json, _ap_by_size.png, _curves.png after "
        f"{time.perf_counter() - t0:.0f} s; load {_load()}", flush=True)
  if study["failed"]:
    print(f"[study] {len(study['failed'])} of {len(jobs)} runs failed:", file=sys.stderr)
    for f in study["failed"]:
      print(f"  {f['variant']}/seed{f['seed']}: {f['error']} (log: {f['log'] or '-'})",
            file=sys.stderr)
    return 1
  return 0


if __name__ == "__main__":
  if any(a in ("-h", "--help", "-?") for a in sys.argv[1:]):
    print(__doc__)  # absl exits with status 1 after --help; a help request is not an error.
    print(FLAGS.module_help(sys.modules[__name__]))
    sys.exit(0)
  app.run(main)
