"""`python -m sized_detr_jax.study`: the study's flags; what it does: the package docstring."""
import os
import shlex
import sys
import time

from absl import app
from absl import flags

from sized_detr_jax import study as study_package
from sized_detr_jax.study import report
from sized_detr_jax.study import runner

flags.DEFINE_string("config", None, "Config spec passed to the CLI, e.g. "
                    "synthetic:smoke.")
flags.DEFINE_string("variants", None, "'name=override,override;name2=...': overrides are config "
                    "fields without the --config. prefix, e.g. 'l1=;sized=criterion.bbox_loss="
                    "sized_l1'. An empty list runs the config as it is.")
flags.DEFINE_list("seeds", ["0", "1", "2"], "Seeds (config.seed) run for every variant.")
flags.DEFINE_string("workdir", None, "Study folder: one sub-folder per variant and seed, and the "
                    "study.* reports.")
flags.DEFINE_string("baseline", None, "Variant the others are compared to (default: the first).")
flags.DEFINE_integer("parallel", 1, "Runs at once (each run uses every core it gets).")
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

def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  try:
    if not FLAGS.config or not FLAGS.workdir:
      raise ValueError("--config and --workdir are required")
    variants = runner.parse_variants(FLAGS.variants)
    common = runner.parse_overrides(FLAGS.overrides)
    seeds = [int(s) for s in FLAGS.seeds]
    if len(set(seeds)) != len(seeds):
      raise ValueError(f"--seeds has duplicates: {seeds}")
    baseline = FLAGS.baseline or next(iter(variants))
    if baseline not in variants:
      raise ValueError(f"--baseline={baseline} is not a variant ({', '.join(variants)})")
    if FLAGS.parallel < 1:
      raise ValueError(f"--parallel={FLAGS.parallel} must be >= 1")
    jobs = runner.plan_jobs(FLAGS.config, variants, seeds, FLAGS.workdir, common)
  except (ValueError, FileNotFoundError) as e:
    sys.exit(f"study: {e}")
  print(f"[study] {len(jobs)} runs ({len(variants)} variants x {len(seeds)} seeds) in "
        f"{FLAGS.workdir}, {FLAGS.parallel} at a time; load {runner.load_average()}", flush=True)
  t0 = time.perf_counter()
  if FLAGS.report_only:
    results = {j.name: {"status": "skipped"} for j in jobs}
  else:
    results = runner.run_jobs(jobs, FLAGS.parallel)
  command = shlex.join(["python", "-m", "sized_detr_jax.study", *sys.argv[1:]])
  study = report.build_report(os.path.abspath(FLAGS.workdir), FLAGS.config, variants, seeds,
                              baseline, jobs, results, common, command, FLAGS.report_name,
                              log_metrics=FLAGS.log_metrics, log_from=FLAGS.log_from)
  print(report.format_console(study))
  stem = os.path.join(FLAGS.workdir, FLAGS.report_name)
  print(f"[study] wrote {stem}.md, .json, _ap_by_size.png, _curves.png after "
        f"{time.perf_counter() - t0:.0f} s; load {runner.load_average()}", flush=True)
  if study["failed"]:
    print(f"[study] {len(study['failed'])} of {len(jobs)} runs failed:", file=sys.stderr)
    for f in study["failed"]:
      print(f"  {f['variant']}/seed{f['seed']}: {f['error']} (log: {f['log'] or '-'})",
            file=sys.stderr)
    return 1
  return 0


if __name__ == "__main__":
  if any(a in ("-h", "--help", "-?") for a in sys.argv[1:]):
    print(study_package.__doc__)  # absl exits with status 1 after --help; a help request is not an error.
    print(FLAGS.module_help(sys.modules[__name__]))
    sys.exit(0)
  app.run(main)
