"""Running a study: variants x seeds as CLI subprocesses, resumable, failures reported.

Each variant x seed is one subprocess `python -m sized_detr_jax.cli --config=SPEC
--workdir=DIR/<variant>/seed<k> --config.seed=k --config.<override>...` (the `--overrides`
first, then the variant's), its output in `DIR/<variant>/seed<k>/run.log`. A run whose
`eval_metrics.json` is for the final step is skipped, so a killed study continues where it
stopped (the CLI resumes a run's workdir from its newest checkpoint). A run folder whose
`config.json` differs from the variant's config is not touched and counts as failed (a renamed
or edited variant would otherwise resume someone else's checkpoints).
"""
import concurrent.futures
import dataclasses
import datetime
import json
import os
import re
import shlex
import subprocess
import sys
import threading
import time

from absl import flags

from sized_detr_jax import config_lib
from sized_detr_jax import configs

# Each run is `python -m sized_detr_jax.cli` (what run.py and `sized-detr` run), with this
# package's parent first on PYTHONPATH so a checkout and an installed package both work.
_CLI = ("-m", "sized_detr_jax.cli")
_PACKAGE_PARENT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
_TAIL_LINES = 20


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
  argv = ["run.py", f"--config={configs.resolve(spec)}", f"--config.seed={seed}",
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


def load_average():
  """1, 5 and 15-minute load averages (as `uptime` prints them)."""
  return [round(x, 2) for x in os.getloadavg()]


def _tail(path, n=_TAIL_LINES):
  try:
    with open(path, errors="replace") as f:
      return [l.rstrip("\n") for l in f.readlines()[-n:]]
  except OSError:
    return []


def read_json(path, default=None):
  try:
    with open(path) as f:
      return json.load(f)
  except (OSError, ValueError):
    return default


def write_json(path, obj):
  tmp = f"{path}.tmp"
  with open(tmp, "w") as f:
    json.dump(obj, f, indent=1, allow_nan=False)
  os.replace(tmp, path)


def run_job(job, log=print):
  """Run (or skip) one job. Returns {"status": skipped|done|failed, ...}.

  Every attempt appends its timing to `<run>/study_run.json`: wall seconds, exit code and the
  load averages before and after.
  """
  saved = read_json(os.path.join(job.workdir, "config.json"))
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
             "load_start": load_average()}
  t0 = time.perf_counter()
  with open(job.log_path, "a") as logf:
    logf.write(f"\n=== study attempt {attempt['started']}: {shlex.join(job.argv)}\n")
    logf.flush()
    rc = subprocess.call(_launch_argv(job.argv), stdout=logf, stderr=subprocess.STDOUT,
                         stdin=subprocess.DEVNULL, env=_child_env())
  attempt.update(wall_s=round(time.perf_counter() - t0, 2), returncode=rc, load_end=load_average())
  record_path = os.path.join(job.workdir, "study_run.json")
  record = read_json(record_path, {"variant": job.variant, "seed": job.seed, "attempts": []})
  record["command"] = shlex.join(["python", *job.argv[1:]])
  record["attempts"].append(attempt)
  write_json(record_path, record)
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
