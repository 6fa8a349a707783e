"""Statistics over seeds (pure functions): mean and std per variant, paired differences to a
baseline (t interval, paired t-test, exact sign test), means of training-log keys and curves."""
import math

import numpy as np

from sized_detr_jax import evaluate

STD_DDOF = 1
CONFIDENCE = 0.95


def _valid(v):
  return v is not None and math.isfinite(v) and v != -1


def num_or_none(x):
  """float or None (JSON has no NaN)."""
  return None if x is None or not math.isfinite(x) else float(x)


def seed_statistics(per_run, metrics, ddof=STD_DDOF):
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
          "mean": num_or_none(values.mean()) if n else None,
          "std": num_or_none(values.std(ddof=ddof)) if n > ddof else None,
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
  out = {"n": n, "seeds": seeds, "diffs": d.tolist(), "mean": num_or_none(d.mean()) if n else None,
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


def paired_differences(per_run, baseline, metrics, confidence=CONFIDENCE):
  """{variant: {metric: paired_difference(variant, baseline)}} for every non-baseline variant."""
  if baseline not in per_run:
    return {}
  return {v: {m: paired_difference({s: r.get(m) for s, r in runs.items()},
                                   {s: r.get(m) for s, r in per_run[baseline].items()},
                                   confidence)
              for m in metrics}
          for v, runs in per_run.items() if v != baseline}


def log_means(records, keys, from_step=0):
  """{key: mean over the records at step >= from_step that have a finite key} for each key
  some such record has (records: `metrics.read_metrics_jsonl`'s)."""
  out = {}
  for k in keys:
    values = [r[k] for r in records if r["step"] >= from_step and isinstance(r.get(k), (int, float))
              and math.isfinite(r[k])]
    if values:
      out[k] = float(np.mean(values))
  return out


def mean_curves(runs_records, keys):
  """Seed-mean curves: {key: (steps, means)} over the steps where any run logged the key.

  Args:
    runs_records: list (one per seed) of record lists from `metrics.read_metrics_jsonl`.
    keys: record keys; `share_<size>` keys are `evaluate.box_loss_share`'s.
  """
  values = {k: {} for k in keys}
  for records in runs_records:
    for r in records:
      share = evaluate.box_loss_share(r) or {}
      for k in keys:
        v = share.get(k[len("share_"):]) if k.startswith("share_") else r.get(k)
        if v is not None and math.isfinite(v):
          values[k].setdefault(r["step"], []).append(v)
  return {k: (sorted(v), [float(np.mean(v[s])) for s in sorted(v)]) for k, v in values.items()
          if v}
