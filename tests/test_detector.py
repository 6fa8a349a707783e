"""Detector.load / predict and --mode=predict on a trained smoke run whose dataset is gone.

References: the run's own evaluation (detections_<step>.json, written by training's
`evaluate.run_evaluation`), the checkpoint restored whole by orbax, the val json, pycocotools.
"""
import json
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp
from PIL import Image
import pytest

from sized_detr_jax import detector as detector_lib
from sized_detr_jax import inference_spec

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = pytest.mark.slow  # the shared fixture trains a smoke run (~1-3 min)


@pytest.fixture(scope="module")
def run(trained_smoke_run):
  det = detector_lib.Detector.load(trained_smoke_run["workdir"])
  with open(os.path.join(trained_smoke_run["data"], "annotations", "instances_val.json")) as f:
    val = json.load(f)
  return {**trained_smoke_run, "detector": det, "val": val,
          "val_images": os.path.join(trained_smoke_run["data"], "images", "val")}


def test_dataset_is_gone_and_inference_json_describes_the_run(run):
  with open(os.path.join(run["workdir"], "config.json")) as f:
    config = json.load(f)
  assert not os.path.exists(config["data"]["root"])  # moved away after training
  spec = run["detector"].spec
  assert spec["categories"] == [{"id": c["id"], "name": c["name"]}
                                for c in run["val"]["categories"]]
  assert spec["preprocess"]["eval_size"] == config["data"]["eval_size"]
  assert spec["preprocess"]["eval_max_size"] == config["data"]["eval_max_size"]
  assert spec["postprocess"] == [{"from_step": 0, "kind": "topk",
                                  "num_select": config["model"]["num_select"]}]
  assert config["eval_ema"] and spec["params"] == {"collection": "ema_params", "subtree": []}
  assert run["detector"].step == run["step"] and run["detector"].params_used == "ema_params"


def test_restores_exactly_the_evaluated_params(run):
  with ocp.StandardCheckpointer() as ckptr:
    full = ckptr.restore(os.path.join(run["workdir"], "checkpoints", str(run["step"]), "state"))
  want, got = jax.tree.leaves(full["ema_params"]), jax.tree.leaves(run["detector"].params)
  assert len(want) == len(got)
  for a, b in zip(want, got):
    np.testing.assert_array_equal(np.asarray(a), b)
  student = detector_lib.Detector.load(run["workdir"], use_ema=False)
  assert student.params_used == "params"
  for a, b in zip(jax.tree.leaves(full["params"]), jax.tree.leaves(student.params)):
    np.testing.assert_array_equal(np.asarray(a), b)


def _by_image(detections):
  out = {}
  for d in detections:
    out.setdefault(d["image_id"], []).append(d)
  return {k: sorted(v, key=lambda d: (-d["score"], d["category_id"], d["bbox"]))
          for k, v in out.items()}


def test_predict_on_the_folder_matches_the_runs_evaluation(run):
  """Same detections as training's own evaluation, after the same rounding (the json keeps 3
  decimals of a pixel and 5 of a score: half a unit of each plus 1e-4)."""
  det = run["detector"]
  ids = {im["file_name"]: im["id"] for im in run["val"]["images"]}
  results = det.predict(run["val_images"])
  assert [os.path.basename(r.source) for r in results] == sorted(ids)
  with open(os.path.join(run["workdir"], f"detections_{run['step']}.json")) as f:
    reference = _by_image(json.load(f))
  mine = _by_image([d for r in results for d in det.coco_results(r, ids[os.path.basename(
      r.source)])])
  assert set(mine) == set(reference)
  for image_id, ref in reference.items():
    got = mine[image_id]
    assert [d["category_id"] for d in got] == [d["category_id"] for d in ref]
    np.testing.assert_allclose([d["bbox"] for d in got], [d["bbox"] for d in ref],
                               atol=5e-4 + 1e-4, rtol=0)
    np.testing.assert_allclose([d["score"] for d in got], [d["score"] for d in ref],
                               atol=5e-6 + 1e-4, rtol=0)
  first = results[0]
  assert first.boxes.shape == (len(first), 4) and first.boxes.dtype == np.float32
  assert np.all(np.diff(first.scores) <= 0)
  names = [c["name"] for c in run["val"]["categories"]]
  assert list(first.names) == [names[k] for k in first.labels]


def test_mixed_folder_and_in_memory_inputs(run, tmp_path):
  """PNG, JPEG, 16-bit PNG, grayscale and a corrupt file in one folder, plus arrays and PIL.

  16-bit v << 8 decodes to v (the high byte) and grayscale g to (g, g, g): their detections
  equal those of the 8-bit RGB equivalents. The corrupt file is named, not raised."""
  det = run["detector"]
  rng = np.random.default_rng(0)
  rgb = rng.integers(0, 256, (150, 210, 3), np.uint8)
  gray = rng.integers(0, 256, (230, 170), np.uint8)
  Image.fromarray(rgb).save(tmp_path / "a_rgb.png")
  Image.fromarray(rgb).save(tmp_path / "b_photo.jpg", quality=90)
  Image.fromarray(gray.astype(np.uint16) << 8).save(tmp_path / "c_16bit.png")
  Image.fromarray(gray).save(tmp_path / "d_gray.png")
  (tmp_path / "e_corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n not an image")
  (tmp_path / "notes.txt").write_text("not an image file extension: ignored")
  folder = det.predict(tmp_path, score_threshold=0.0, max_detections=7)
  assert [os.path.basename(r.source) for r in folder] == [
      "a_rgb.png", "b_photo.jpg", "c_16bit.png", "d_gray.png", "e_corrupt.png"]
  corrupt = folder[4]
  assert "e_corrupt.png" in corrupt.error and len(corrupt) == 0
  assert all(r.error is None and len(r) == 7 for r in folder[:4])
  assert folder[0].image_size == (150, 210) and folder[2].image_size == (230, 170)
  gray_rgb = np.repeat(gray[..., None], 3, axis=-1)
  memory = det.predict([rgb, Image.fromarray(gray), gray, gray_rgb], score_threshold=0.0,
                       max_detections=7)
  assert [r.source for r in memory] == ["<array 0>", "<PIL 1>", "<array 2>", "<array 3>"]
  for a, b in ((folder[0], memory[0]), (folder[2], memory[3]), (folder[3], memory[1]),
               (folder[3], memory[2])):
    np.testing.assert_allclose(a.boxes, b.boxes, atol=1e-4)
    np.testing.assert_allclose(a.scores, b.scores, atol=1e-6)
  bad = det.predict(np.zeros((8, 8, 3), np.float32))[0]
  assert "<array 0>: expected a uint8 [H, W, 3] or [H, W] array, got float32" in bad.error
  with pytest.raises(FileNotFoundError, match="no-such"):
    det.predict(str(tmp_path / "no-such.png"))


def test_batches_do_not_change_the_detections(run):
  """The val images one at a time (batch padding) and 16 at once (two full batches of 8)."""
  det = run["detector"]
  together = det.predict(run["val_images"])
  one = detector_lib.Detector.load(run["workdir"], batch_size=1)
  for r in together[:3]:
    alone = one.predict(r.source)[0]
    np.testing.assert_allclose(alone.boxes, r.boxes, atol=1e-4)
    np.testing.assert_allclose(alone.scores, r.scores, atol=1e-5)
  assert det._fn._cache_size() == 1  # pylint: disable=protected-access  # one bucket


def test_run_without_inference_json(run, tmp_path):
  old = str(tmp_path / "old_run")
  shutil.copytree(run["workdir"], old)
  os.remove(os.path.join(old, inference_spec.FILE_NAME))
  with pytest.raises(inference_spec.MissingSpecError) as e:
    detector_lib.Detector.load(old)
  message = str(e.value)
  assert "\n" not in message and "inference.json is missing" in message
  assert "categories=" in message and "--categories" in message
  names = [c["name"] for c in run["val"]["categories"]]
  legacy = detector_lib.Detector.load(old, categories=names)
  assert legacy.spec == run["detector"].spec  # rebuilt from config.json and the checkpoint
  with pytest.raises(ValueError, match="3 given but the model has 4"):
    detector_lib.Detector.load(old, categories=names[:3])


def test_step_choice(run, tmp_path):
  with pytest.raises(FileNotFoundError, match=r"no complete checkpoint of step 7 \(steps: \[2\]\)"):
    detector_lib.Detector.load(run["workdir"], step=7)
  assert detector_lib.Detector.load(run["workdir"], step=2).step == 2


def test_cli_predict_writes_coco_results(run, tmp_path):
  """`run.py --mode=predict` in a subprocess: detections.json that pycocotools loads and
  scores against the val json, drawn PNGs, the corrupt file named in the summary."""
  from pycocotools.coco import COCO  # pylint: disable=g-import-not-at-top
  from pycocotools.cocoeval import COCOeval  # pylint: disable=g-import-not-at-top
  images = tmp_path / "images"
  shutil.copytree(run["val_images"], images)
  (images / "broken.jpg").write_bytes(b"garbage")
  out = tmp_path / "out"
  ann = os.path.join(run["data"], "annotations", "instances_val.json")
  proc = subprocess.run(
      [sys.executable, os.path.join(ROOT, "run.py"), "--mode=predict",
       f"--workdir={run['workdir']}", f"--images={images}", f"--out={out}",
       f"--images_ann={ann}"], capture_output=True, text=True, timeout=600, cwd=str(tmp_path))
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert "skipped 1" in proc.stdout and "broken.jpg" in proc.stdout
  assert "img/s" in proc.stderr and "ETA" in proc.stderr
  with open(out / "detections.json") as f:
    written = json.load(f)
  gt = COCO(ann)
  coco_eval = COCOeval(gt, gt.loadRes(written), "bbox")
  coco_eval.evaluate()
  coco_eval.accumulate()
  coco_eval.summarize()
  with open(os.path.join(run["workdir"], "eval_metrics.json")) as f:
    ap = json.load(f)["AP"]
  assert abs(coco_eval.stats[0] - ap) < 1e-3  # the run's own evaluation score
  assert sorted(p for p in os.listdir(out) if p.endswith(".png")) == sorted(
      os.path.splitext(n)[0] + ".png" for n in os.listdir(run["val_images"]))
  assert {d["file_name"] for d in written} <= set(os.listdir(run["val_images"]))
