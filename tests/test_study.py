"""sized_detr_jax.study: statistics on hand-made numbers, the runner on fake commands, and the
real runner on the smoke config (2 variants x 2 seeds, one module fixture: 4 run.py runs)."""
import json
import math
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from scipy import stats

from sized_detr_jax import evaluate
from sized_detr_jax.study import metrics as study_metrics
from sized_detr_jax.study import report
from sized_detr_jax.study import runner
from sized_detr_jax.study import statistics

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ---------------------------------------------------------------------------------------------
# Flags parsing.
# ---------------------------------------------------------------------------------------------
def test_parse_variants_keeps_tuple_commas_and_order():
  v = runner.parse_variants("l1=;sized=criterion.bbox_loss=sized_l1,optimizer.lr_drop_steps=(5,9),"
                           "--config.criterion.sized_l1_rescale=True; b2=x=1,y=(875,),z=2")
  assert list(v) == ["l1", "sized", "b2"]
  assert v["l1"] == []
  assert v["sized"] == ["criterion.bbox_loss=sized_l1", "optimizer.lr_drop_steps=(5,9)",
                        "criterion.sized_l1_rescale=True"]
  assert v["b2"] == ["x=1", "y=(875,)", "z=2"]


@pytest.mark.parametrize("text, fragment", [
    ("", "empty"), ("a=;a=x=1", "twice"), ("noequals", "name=override"),
    ("a=seed=3", "--seeds"), ("a=3=4", "field.path=value")])
def test_parse_variants_errors_name_the_problem(text, fragment):
  with pytest.raises(ValueError, match=fragment):
    runner.parse_variants(text)


def test_resolve_config_applies_overrides_and_rejects_typos():
  config = runner.resolve_config("experiments/synthetic.py:smoke",
                                ["criterion.bbox_loss=sized_l1", "optimizer.lr_drop_steps=(1,2)"],
                                seed=3)
  assert config.seed == 3 and config.criterion.bbox_loss == "sized_l1"
  assert tuple(config.optimizer.lr_drop_steps) == (1, 2)
  with pytest.raises(ValueError, match="bbox_los"):
    runner.resolve_config("experiments/synthetic.py:smoke", ["criterion.bbox_los=x"], seed=0)
  # A packaged config by name, as run.py takes it.
  by_name = runner.resolve_config("synthetic:smoke", ["criterion.bbox_loss=sized_l1",
                                                      "optimizer.lr_drop_steps=(1,2)"], seed=3)
  assert by_name.to_json() == config.to_json()


# ---------------------------------------------------------------------------------------------
# Statistics on hand-made numbers.
# ---------------------------------------------------------------------------------------------
def test_summarize_mean_sample_std_and_missing_values():
  per_run = {"a": {0: {"AP": 0.1, "APs": -1.0}, 1: {"AP": 0.3, "APs": 0.5},
                   2: {"AP": 0.2, "APs": None}},
             "b": {5: {"AP": 0.4}}}
  s = statistics.seed_statistics(per_run, metrics=("AP", "APs"))
  # deviations -0.1, 0.1, 0 -> sum of squares 0.02 / (3 - 1) -> std 0.1
  assert s["a"]["AP"]["n"] == 3 and s["a"]["AP"]["mean"] == pytest.approx(0.2, abs=1e-15)
  assert s["a"]["AP"]["std"] == pytest.approx(0.1, abs=1e-15)
  assert s["a"]["APs"] == {"mean": 0.5, "std": None, "n": 1, "seeds": [1], "values": [0.5]}
  assert s["b"]["AP"]["mean"] == 0.4 and s["b"]["AP"]["std"] is None
  assert s["b"]["APs"]["n"] == 0 and s["b"]["APs"]["mean"] is None


def test_paired_difference_by_hand():
  base = {0: 0.0, 1: 0.0, 2: 0.0, 7: 5.0}
  d = statistics.paired_difference({0: 1.0, 1: 2.0, 2: 3.0, 9: 1.0}, base)
  assert d["seeds"] == [0, 1, 2] and d["n"] == 3       # only the common seeds
  assert d["mean"] == pytest.approx(2.0) and d["std"] == pytest.approx(1.0)
  # df=2: the t CDF is 1/2 + t / (2 sqrt(t^2 + 2)), so t_{0.975} = 0.95 sqrt(2 / (1 - 0.95^2)).
  half = 0.95 * math.sqrt(2 / (1 - 0.95**2)) / math.sqrt(3)  # x se = std / sqrt(n) = 1 / sqrt(3)
  assert d["ci"] == pytest.approx([2.0 - half, 2.0 + half], abs=1e-12)
  t = 2.0 * math.sqrt(3)                              # so P(|T| > t) = 1 - t / sqrt(t^2 + 2)
  assert d["p_t"] == pytest.approx(1 - t / math.sqrt(t * t + 2), abs=1e-12)
  assert (d["higher"], d["lower"], d["tied"]) == (3, 0, 0)
  assert d["p_sign"] == pytest.approx(2 / 8)          # two-sided: 2 * P(3 of 3 | p=1/2)


def test_paired_difference_ties_single_seed_and_constant_differences():
  d = statistics.paired_difference({0: 1.0, 1: 2.0, 2: 0.0, 3: 4.0},
                                   {0: 1.0, 1: 1.0, 2: 1.0, 3: 2.0})
  assert (d["higher"], d["lower"], d["tied"]) == (2, 1, 1)
  assert d["p_sign"] == pytest.approx(1.0)            # 2 of 3 untied: as likely as not
  one = statistics.paired_difference({0: 0.5}, {0: 0.25})
  assert one["n"] == 1 and one["mean"] == 0.25 and one["ci"] is None and one["p_t"] is None
  const = statistics.paired_difference({0: 1.5, 1: 2.5}, {0: 1.0, 1: 2.0})
  assert const["ci"] == [0.5, 0.5] and const["p_t"] is None
  assert statistics.paired_difference({0: -1}, {0: 0.3})["n"] == 0  # -1: no ground truth


def test_paired_differences_covers_every_non_baseline_variant():
  per_run = {"base": {0: {"AP": 0.1}, 1: {"AP": 0.2}}, "x": {0: {"AP": 0.3}, 1: {"AP": 0.1}}}
  out = statistics.paired_differences(per_run, "base", metrics=("AP",))
  assert list(out) == ["x"]
  assert out["x"]["AP"]["diffs"] == pytest.approx([0.2, -0.1])


def test_metrics_jsonl_keeps_last_record_per_step_and_mean_curves(tmp_path):
  path = tmp_path / "metrics.jsonl"
  path.write_text("\n".join(json.dumps(r) for r in [
      {"step": 2, "loss": 9.0}, {"step": 4, "loss": 8.0}, {"step": 4, "loss": 7.0},  # resumed
      {"step": 6, "loss": 6.0, "metric_loss_bbox_small": 2.0, "metric_num_boxes_small": 3.0,
       "metric_loss_bbox_medium": 1.0, "metric_num_boxes_medium": 2.0,
       "metric_loss_bbox_large": 0.5, "metric_num_boxes_large": 8.0}]) + "\nnot json\n")
  records = study_metrics.read_metrics_jsonl(path)
  assert [r["step"] for r in records] == [2, 4, 6] and records[1]["loss"] == 7.0
  share = evaluate.box_loss_share(records[2])
  assert share == pytest.approx({"small": 6 / 12, "medium": 2 / 12, "large": 4 / 12})
  assert evaluate.box_loss_share(records[0]) is None
  other = [{"step": 4, "loss": 3.0}, {"step": 6, "loss": 2.0}]
  curves = statistics.mean_curves([records, other], keys=("loss", "share_small", "loss_ce"))
  assert curves["loss"] == ([2, 4, 6], [9.0, 5.0, 4.0])
  assert curves["share_small"] == ([6], [0.5])
  assert "loss_ce" not in curves
  curves["grad_norm_bbox"] = ([2, 4], [3.0, float("nan")])
  report.plot_curves({"a": curves, "b": {}}, ["a", "b"], str(tmp_path / "c.png"))
  assert (tmp_path / "c.png").stat().st_size > 0


# ---------------------------------------------------------------------------------------------
# Per-size and class-agnostic AP on a hand-made image.
# ---------------------------------------------------------------------------------------------
def _hand_gt():
  return {"images": [{"id": 1, "width": 200, "height": 200}],
          "categories": [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}],
          "annotations": [
              {"id": 1, "image_id": 1, "category_id": 1, "bbox": [10, 10, 20, 20], "area": 400,
               "iscrowd": 0},                                                     # small
              {"id": 2, "image_id": 1, "category_id": 2, "bbox": [50, 50, 120, 120],
               "area": 14400, "iscrowd": 0}]}                                     # large


def test_log_means_by_hand():
  records = [{"step": 10, "a": 1.0, "b": 4.0}, {"step": 20, "a": 3.0},
             {"step": 30, "a": float("nan"), "b": 8.0}, {"step": 40, "a": 5.0, "b": "x"}]
  assert statistics.log_means(records, ["a", "b", "c"]) == {"a": 3.0, "b": 6.0}
  assert statistics.log_means(records, ["a", "b"], from_step=20) == {"a": 4.0, "b": 8.0}


def test_detection_metrics_by_hand():
  # Small box found with the right class at IoU 280 / 520 = 0.54 (hit at 0.5, miss at 0.55+);
  # the large box found exactly but under the wrong class.
  dets = [{"image_id": 1, "category_id": 1, "bbox": [50, 50, 120, 120], "score": 0.9},  # is 2
          {"image_id": 1, "category_id": 1, "bbox": [16, 10, 20, 20], "score": 0.8}]
  m = study_metrics.detection_metrics(_hand_gt(), dets)
  assert m["AP50_small"] == pytest.approx(1.0) and m["AP75_small"] == 0.0
  assert m["AP50_large"] == 0.0 and m["AP75_large"] == 0.0    # class 2 never predicted
  assert m["AP50_medium"] == -1.0                             # no medium ground truth
  # Merged classes: the large box is a hit at every IoU, the small one only at 0.5.
  assert m["agnostic_APl"] == pytest.approx(1.0)
  assert m["agnostic_APs"] == pytest.approx(0.1)
  assert m["agnostic_AP50"] == pytest.approx(1.0)
  # IoU 0.55..0.95: the large hit first (precision 1 up to recall 0.5 = 51 of 101 recall
  # points), then the small false positive.
  assert m["agnostic_AP"] == pytest.approx((1 + 9 * 51 / 101) / 10)
  assert study_metrics.detection_metrics(_hand_gt(), [])["agnostic_AP"] == 0.0


def test_precision_ap_matches_cocoeval_summary():
  dets = [{"image_id": 1, "category_id": 1, "bbox": [12, 11, 20, 19], "score": 0.7},
          {"image_id": 1, "category_id": 2, "bbox": [55, 48, 110, 125], "score": 0.6},
          {"image_id": 1, "category_id": 2, "bbox": [0, 0, 40, 40], "score": 0.9}]
  ev = evaluate.coco_evaluation(_hand_gt(), dets)[0]
  for i, (iou, area) in enumerate([(None, "all"), (0.5, "all"), (0.75, "all"), (None, "small"),
                                   (None, "medium"), (None, "large")]):
    assert study_metrics.precision_ap(ev, iou=iou, area=area) == pytest.approx(ev.stats[i],
                                                                               abs=1e-12)
  with pytest.raises(ValueError, match="0.42"):
    study_metrics.precision_ap(ev, iou=0.42)


# ---------------------------------------------------------------------------------------------
# The runner on fake commands (no JAX): failure report, skip, parallel, config check, orphans.
# ---------------------------------------------------------------------------------------------
_FAKE_OK = ("import json, os, sys; d = sys.argv[1]; os.makedirs(d, exist_ok=True); "
            "print('training', d); json.dump({'step': 3, 'AP': 0.5}, "
            "open(os.path.join(d, 'eval_metrics.json'), 'w')); "
            "json.dump([], open(os.path.join(d, 'detections_3.json'), 'w'))")
_FAKE_FAIL = "import sys; print('line one'); print('boom: bad thing'); sys.exit(3)"


def _job(tmp_path, name, code, config_json=None):
  workdir = str(tmp_path / name / "seed0")
  return runner.Job(name, 0, workdir, [sys.executable, "-c", code, workdir], 3, config_json)


def test_run_jobs_reports_failures_skips_finished_and_runs_in_parallel(tmp_path):
  jobs = [_job(tmp_path, "ok", _FAKE_OK), _job(tmp_path, "bad", _FAKE_FAIL),
          _job(tmp_path, "ok2", _FAKE_OK)]
  lines = []
  results = runner.run_jobs(jobs, parallel=2, log=lines.append)
  assert [results[j.name]["status"] for j in jobs] == ["done", "failed", "done"]
  bad = results["bad/seed0"]
  assert bad["log"] == jobs[1].log_path and "exit code 3" in bad["error"]
  assert bad["tail"][-1] == "boom: bad thing"
  report = next(l for l in lines if "FAILED bad/seed0" in l)
  assert jobs[1].log_path in report and "boom: bad thing" in report
  record = json.loads(open(os.path.join(jobs[0].workdir, "study_run.json")).read())
  assert record["attempts"][0]["returncode"] == 0 and record["attempts"][0]["wall_s"] > 0
  assert len(record["attempts"][0]["load_start"]) == 3

  lines.clear()
  results = runner.run_jobs(jobs, parallel=1, log=lines.append)
  assert [results[j.name]["status"] for j in jobs] == ["skipped", "failed", "skipped"]
  assert sum("skipped" in l for l in lines) == 2
  assert len(json.loads(open(os.path.join(jobs[0].workdir, "study_run.json")).read())
             ["attempts"]) == 1


def test_run_job_exit_zero_without_final_eval_is_a_failure(tmp_path):
  job = _job(tmp_path, "short", "print('did nothing')")
  out = runner.run_job(job, log=lambda _: None)
  assert out["status"] == "failed" and "no eval_metrics.json for step 3" in out["error"]


def test_run_job_refuses_a_folder_run_with_another_config(tmp_path):
  job = _job(tmp_path, "cfg", _FAKE_OK, config_json={"seed": 0, "criterion": {"bbox_loss": "l1"}})
  os.makedirs(job.workdir)
  with open(os.path.join(job.workdir, "config.json"), "w") as f:
    json.dump({"seed": 0, "criterion": {"bbox_loss": "sized_l1"}}, f)
  out = runner.run_job(job, log=lambda _: None)
  assert out["status"] == "failed" and "criterion.bbox_loss" in out["error"]
  assert not os.path.exists(job.log_path)  # nothing was started


def test_killed_study_takes_its_run_with_it(tmp_path):
  """SIGKILL of the study process also ends the run it started (no orphan training on)."""
  pid_file = tmp_path / "child.pid"
  child = f"import os, time; open({str(pid_file)!r}, 'w').write(str(os.getpid())); time.sleep(60)"
  parent = (f"from sized_detr_jax.study import runner; import sys; "
            f"runner.run_job(runner.Job('v', 0, "
            f"{str(tmp_path / 'v')!r}, [sys.executable, '-c', {child!r}], 1), log=print)")
  proc = subprocess.Popen([sys.executable, "-c", parent], cwd=ROOT)
  deadline = time.time() + 60
  while not (pid_file.exists() and pid_file.read_text()) and time.time() < deadline:
    time.sleep(0.05)
  child_pid = int(pid_file.read_text())
  os.kill(proc.pid, signal.SIGKILL)
  proc.wait()
  deadline = time.time() + 10
  while time.time() < deadline:
    try:
      os.kill(child_pid, 0)
    except ProcessLookupError:
      break
    time.sleep(0.05)
  else:
    os.kill(child_pid, signal.SIGKILL)
    pytest.fail("the run outlived the killed study")


# ---------------------------------------------------------------------------------------------
# The real runner: experiments/synthetic.py:smoke, 2 variants x 2 seeds, 2 steps each.
# ---------------------------------------------------------------------------------------------
_VARIANTS = "l1=;sized=criterion.bbox_loss=sized_l1,criterion.sized_l1_rescale=True"
_SEEDS = (0, 1)


def _study_cmd(workdir):
  return [sys.executable, "-m", "sized_detr_jax.study", "--config=experiments/synthetic.py:smoke",
          f"--variants={_VARIANTS}", f"--seeds={','.join(map(str, _SEEDS))}",
          f"--workdir={workdir}", "--baseline=l1", "--overrides=total_steps=2,log_every=1",
          "--log_metrics=loss_bbox,loss"]


def _snapshot(folder):
  out = {}
  for dirpath, _, files in os.walk(folder):
    for name in files:
      st = os.stat(os.path.join(dirpath, name))
      out[os.path.join(dirpath, name)] = (st.st_mtime_ns, st.st_size)
  return out


@pytest.fixture(scope="module")
def smoke_study(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("study"))
  out = subprocess.run(_study_cmd(workdir), cwd=ROOT, capture_output=True, text=True,
                       timeout=1800)
  assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
  with open(os.path.join(workdir, "study.json")) as f:
    return workdir, json.load(f), out.stdout


@pytest.mark.slow
def test_study_writes_reports(smoke_study):
  workdir, result, stdout = smoke_study
  for name in ("study.json", "study.md", "study_ap_by_size.png", "study_curves.png"):
    assert os.path.getsize(os.path.join(workdir, name)) > 0, name
  assert stdout.count("[study] done ") == 4
  assert result["variant_names"] == ["l1", "sized"] and not result["failed"]
  runs = {(r["variant"], r["seed"]): r for r in result["runs"]}
  assert set(runs) == {(v, s) for v in ("l1", "sized") for s in _SEEDS}
  for (v, s), r in runs.items():
    assert r["status"] == "done" and r["step"] == 2 and r["wall_s"] > 0
    config = json.load(open(os.path.join(workdir, v, f"seed{s}", "config.json")))
    assert config["seed"] == s and config["total_steps"] == 2
    assert config["criterion"]["bbox_loss"] == ("l1" if v == "l1" else "sized_l1")
  md = open(os.path.join(workdir, "study.md")).read()
  assert "Paired per-seed difference against `l1`" in md and "agnostic_APs" in md


@pytest.mark.slow
def test_second_invocation_skips_finished_runs(smoke_study):
  workdir = smoke_study[0]
  before = {v: _snapshot(os.path.join(workdir, v)) for v in ("l1", "sized")}
  out = subprocess.run(_study_cmd(workdir), cwd=ROOT, capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  assert out.stdout.count("[study] skipped ") == 4 and "[study] started" not in out.stdout
  assert {v: _snapshot(os.path.join(workdir, v)) for v in ("l1", "sized")} == before


def _direct_agnostic(gt_path, dets_path):
  """Class-agnostic COCO stats straight from pycocotools (merging done here)."""
  from pycocotools.coco import COCO  # pylint: disable=g-import-not-at-top
  from pycocotools.cocoeval import COCOeval  # pylint: disable=g-import-not-at-top
  gt = json.load(open(gt_path))
  for a in gt["annotations"]:
    a["category_id"] = 7
  gt["categories"] = [{"id": 7, "name": "any"}]
  dets = json.load(open(dets_path))
  for d in dets:
    d["category_id"] = 7
  coco = COCO()
  coco.dataset = gt
  coco.createIndex()
  ev = COCOeval(coco, coco.loadRes(dets), "bbox")
  ev.evaluate()
  ev.accumulate()
  ev.summarize()
  return dict(zip(study_metrics.COCO_METRICS, ev.stats[:6]))


def _per_run_reference(workdir, gt_path):
  """{variant: {seed: metrics}}: AP.. from eval_metrics.json, agnostic_* from pycocotools."""
  per_run = {}
  for v in ("l1", "sized"):
    for s in _SEEDS:
      d = os.path.join(workdir, v, f"seed{s}")
      ev = json.load(open(os.path.join(d, "eval_metrics.json")))
      agn = _direct_agnostic(os.path.join(ROOT, gt_path),
                             os.path.join(d, f"detections_{ev['step']}.json"))
      per_run.setdefault(v, {})[s] = {**{m: ev[m] for m in study_metrics.COCO_METRICS},
                                      **{f"agnostic_{m}": agn[m] for m in agn}}
  return per_run


@pytest.mark.slow
def test_statistics_equal_numpy_on_the_run_files(smoke_study):
  workdir, result, _ = smoke_study
  (gt_path,) = result["gt_json"]
  per_run = _per_run_reference(workdir, gt_path)
  names = study_metrics.COCO_METRICS + study_metrics.AGNOSTIC_METRICS
  for r in result["runs"]:
    ref = per_run[r["variant"]][r["seed"]]
    np.testing.assert_allclose([r["metrics"][m] for m in names], [ref[m] for m in names],
                               rtol=0, atol=1e-12)
  # Two steps of training: class-aware AP is 0, the merged-class AP is not (non-trivial check).
  assert any(per_run[v][s]["agnostic_AP50"] > 0 for v in per_run for s in _SEEDS)
  for v in ("l1", "sized"):
    for m in names:
      values = np.array([per_run[v][s][m] for s in _SEEDS], np.float64)
      got = result["summary"][v][m]
      assert got["n"] == 2
      np.testing.assert_allclose([got["mean"], got["std"]], [values.mean(), values.std(ddof=1)],
                                 rtol=0, atol=1e-12)
  for m in names:
    diffs = np.array([per_run["sized"][s][m] - per_run["l1"][s][m] for s in _SEEDS])
    got = result["paired"]["sized"][m]
    half = stats.t.ppf(0.975, len(diffs) - 1) * diffs.std(ddof=1) / np.sqrt(len(diffs))
    np.testing.assert_allclose(got["mean"], diffs.mean(), rtol=0, atol=1e-12)
    np.testing.assert_allclose(got["ci"], [diffs.mean() - half, diffs.mean() + half], rtol=0,
                               atol=1e-12)
    assert (got["higher"], got["lower"]) == ((diffs > 0).sum(), (diffs < 0).sum())
  assert "l1" not in result["paired"]
  for v in ("l1", "sized"):  # --log_metrics: per run the mean over logged steps, then seeds
    for key in ("loss_bbox", "loss"):
      per_seed = [np.mean([json.loads(line)[key] for line in open(
          os.path.join(workdir, v, f"seed{s}", "metrics.jsonl")) if key in json.loads(line)])
                  for s in _SEEDS]
      got = result["log_summary"][v][key]
      np.testing.assert_allclose([got["mean"], got["std"]],
                                 [np.mean(per_seed), np.std(per_seed, ddof=1)], rtol=1e-12)
  wall = [r["wall_s"] for r in result["runs"] if r["variant"] == "l1"]
  assert result["wall"]["l1"]["mean_s"] == pytest.approx(np.mean(wall))
