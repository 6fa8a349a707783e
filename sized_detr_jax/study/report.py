"""A study's reports from its finished runs: study.json, study.md and two plots.

  * `<name>.json`: per run the metrics and wall time; per variant mean, std (ddof=1: the sample
    standard deviation over seeds, None for one seed) and n of `metrics.METRICS`; per variant
    and metric the paired per-seed difference to the baseline variant (mean, t-based 95%
    confidence interval, two-sided paired t-test and sign-test p-values, seeds higher/lower);
  * `<name>.md`: the same as tables (with `log_metrics`, also per variant the mean over seeds of
    each run's mean of those metrics.jsonl keys, e.g. Semi-DETR's pseudo-label count);
  * `<name>_ap_by_size.png`: AP, APs, APm, APl per variant (+- std), class-aware and
    class-agnostic;
  * `<name>_curves.png`: loss terms over steps, the box-loss share by size and, when the runs
    logged them (`config.log_grad_split`), the gradient norms per loss kind and the clip
    fraction (seed means; metrics.jsonl's last record of a step wins after a resume).
"""
import json
import math
import os

import numpy as np

from sized_detr_jax.study import metrics as metrics_lib
from sized_detr_jax.study import runner
from sized_detr_jax.study import statistics


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
  groups = [("COCO AP", metrics_lib.COCO_METRICS),
            ("AP50 / AP75 per size", metrics_lib.PER_SIZE_METRICS),
            ("Class-agnostic AP (all categories merged)", metrics_lib.AGNOSTIC_METRICS)]
  for title, names in groups:
    lines += ["", f"## {title}", "", "| variant | n | " + " | ".join(names) + " |",
              "|---|---|" + "---|" * len(names)]
    for v in variants:
      n = max((summary[v][m]["n"] for m in names), default=0)
      lines.append(f"| {v} | {n} | " + " | ".join(_mean_std(summary[v][m]) for m in names)
                   + " |")
  if study["paired"]:
    lines += ["", f"## Paired per-seed difference against `{base}`", "",
              f"Mean of (variant - {base}) over the common seeds, t-based "
              f"{int(study['confidence'] * 100)}% "
              "confidence interval, paired t-test p and exact sign-test p; * where the interval "
              "excludes 0.", "",
              "| variant | metric | n | mean diff | 95% CI | seeds | p (t) | p (sign) |",
              "|---|---|---|---|---|---|---|---|"]
    for v, per_metric in study["paired"].items():
      for m in metrics_lib.METRICS:
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
    lines += ["", "## Failed or unfinished runs", ""]
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
  """One panel per `metrics.CURVES` key that some variant logged, one line per variant (seed
  means): loss terms, box-loss share by size, gradient norms and clip fraction."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  keys = [k for k in metrics_lib.CURVES
          if k in metrics_lib.LOSS_CURVES or any(k in curves.get(v, {}) for v in variants)]
  ncols = 4
  nrows = math.ceil(len(keys) / ncols)
  fig, axes = plt.subplots(nrows, ncols, figsize=(4 * ncols, 3.2 * nrows), squeeze=False)
  for ax, key in zip(axes.flat, keys):
    for v in variants:
      if key in curves.get(v, {}):
        steps, means = curves[v][key]
        ax.plot(steps, means, marker="." if len(steps) < 20 else None, label=v)
    ax.set_title(f"box-loss share: {key[6:]}" if key in metrics_lib.SHARE_CURVES else key)
    ax.set_xlabel("step")
    if key in metrics_lib.SHARE_CURVES or key == "clip_fraction":
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
    record = runner.read_json(os.path.join(job.workdir, "study_run.json"), {"attempts": []})
    attempts = record["attempts"]
    run = {"variant": job.variant, "seed": job.seed,
           "workdir": os.path.relpath(job.workdir, study_dir), "status": res["status"],
           "wall_s": round(sum(a["wall_s"] for a in attempts), 2) if attempts else None,
           "attempts": len(attempts),
           "load_start": attempts[-1]["load_start"] if attempts else None,
           "load_end": attempts[-1]["load_end"] if attempts else None}
    step = runner.finished_step(job.workdir, job.total_steps)
    if res["status"] == "failed" or step is None:
      failed.append({"variant": job.variant, "seed": job.seed,
                     "error": res.get("error", "not finished"),
                     "log": os.path.relpath(res["log"], study_dir) if res.get("log") else None,
                     "tail": res.get("tail", [])})
      # A run that stopped with an error, or one not run (to the end) yet.
      run["status"] = "failed" if res["status"] == "failed" else "not finished"
    else:
      data_key = json.dumps(job.config_json["data"], sort_keys=True)
      if data_key not in gt_paths:
        gt_paths[data_key] = metrics_lib.val_gt_json(runner.resolve_config(
            spec, list(common_overrides) + variants[job.variant], job.seed))
      run["step"] = step
      run["gt_json"] = gt_paths[data_key]
      run["metrics"] = metrics_lib.run_metrics(job.workdir, step, gt_paths[data_key], gt_cache)
      per_run.setdefault(job.variant, {})[job.seed] = run["metrics"]
      records = metrics_lib.read_metrics_jsonl(os.path.join(job.workdir, "metrics.jsonl"))
      curves_in.setdefault(job.variant, []).append(records)
      if log_metrics:
        run["log_means"] = statistics.log_means(records, log_metrics, log_from)
        per_run_log.setdefault(job.variant, {})[job.seed] = run["log_means"]
    runs.append(run)
  names = list(variants)
  summary = statistics.seed_statistics({v: per_run.get(v, {}) for v in names}, metrics_lib.METRICS)
  paired = (statistics.paired_differences(per_run, baseline, metrics_lib.METRICS)
            if baseline in per_run else {})
  wall = {}
  for v in names:
    w = [r["wall_s"] for r in runs if r["variant"] == v and r["wall_s"] is not None]
    wall[v] = {"mean_s": statistics.num_or_none(float(np.mean(w))) if w else None,
               "total_s": float(sum(w)), "n": len(w)}
  study = {"config": spec, "command": command, "report_name": name, "variants": variants,
           "variant_names": names,
           "overrides": list(common_overrides), "seeds": list(seeds), "baseline": baseline,
           "metrics": list(metrics_lib.METRICS), "std_ddof": statistics.STD_DDOF,
           "confidence": statistics.CONFIDENCE,
           "gt_json": sorted(set(gt_paths.values())), "summary": summary, "paired": paired,
           "wall": wall, "runs": runs, "failed": failed,
           "log_metrics": list(log_metrics), "log_from": log_from,
           "log_summary": statistics.seed_statistics({v: per_run_log.get(v, {}) for v in names},
                                               log_metrics)}
  os.makedirs(study_dir, exist_ok=True)
  runner.write_json(os.path.join(study_dir, f"{name}.json"), study)
  with open(os.path.join(study_dir, f"{name}.md"), "w") as f:
    f.write(format_markdown(study))
  plot_ap_by_size(summary, names, os.path.join(study_dir, f"{name}_ap_by_size.png"))
  plot_curves({v: statistics.mean_curves(rs, metrics_lib.CURVES) for v, rs in curves_in.items()},
              names,
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
