"""A user's own COCO json through `experiments/coco_custom.py:cpu` with run.py (subprocesses).

One short training run (8 steps + evaluation) on a 7-class dataset written here, with no class,
size or schedule field set: the derived values must reach config.json and the logged lr; bad
class / size overrides must fail before anything is compiled.
"""
import json
import os
import subprocess
import sys
import time

import numpy as np
from PIL import Image
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Category ids are neither contiguous nor starting at 1: the labels are their order.
CATEGORY_IDS = [10 + 3 * k for k in range(7)]
STEPS = 8


def _write_split(root, name, num_images, first_id, rng):
  images, annotations = [], []
  for k in range(num_images):
    h, w = (int(v) for v in rng.integers(64, 97, 2))
    pixels = np.full((h, w, 3), 40, np.uint8)
    image_id = first_id + k
    for _ in range(2):
      label = int(rng.integers(7))
      bw, bh = (int(v) for v in rng.integers(12, 30, 2))
      x, y = int(rng.integers(0, w - bw)), int(rng.integers(0, h - bh))
      pixels[y:y + bh, x:x + bw] = (30 * label + 40, 255 - 30 * label, 128)
      annotations.append({"id": 100 * image_id + len(annotations), "image_id": image_id,
                          "category_id": CATEGORY_IDS[label], "bbox": [x, y, bw, bh],
                          "area": bw * bh, "iscrowd": 0})
    file_name = f"{name}_{k}.png"
    Image.fromarray(pixels).save(os.path.join(root, "images", file_name))
    images.append({"id": image_id, "file_name": file_name, "height": h, "width": w})
  path = os.path.join(root, "annotations", f"{name}.json")
  with open(path, "w") as f:
    json.dump({"images": images, "annotations": annotations,
               "categories": [{"id": c, "name": f"kind{c}"} for c in CATEGORY_IDS]}, f)
  return path


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
  root = str(tmp_path_factory.mktemp("custom") / "shapes7")
  os.makedirs(os.path.join(root, "annotations"))
  os.makedirs(os.path.join(root, "images"))
  rng = np.random.default_rng(0)
  train = _write_split(root, "train", 8, 1, rng)
  val = _write_split(root, "val", 4, 50, rng)
  images = os.path.join(root, "images")
  return [f"--config.data.train_ann={train}", f"--config.data.train_images={images}",
          f"--config.data.val_ann={val}", f"--config.data.val_images={images}"]


def _run(*args, timeout=1200):
  return subprocess.run([sys.executable, "run.py", "--config=experiments/coco_custom.py:cpu",
                         *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def trained(dataset, tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("run") / "wd")
  out = _run(*dataset, f"--workdir={workdir}", f"--config.total_steps={STEPS}",
             "--config.log_every=1")
  assert out.returncode == 0, out.stderr[-3000:]
  with open(os.path.join(workdir, "config.json")) as f:
    config = json.load(f)
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    rows = [r for r in map(json.loads, f) if "step" in r and "lr" in r]
  return dict(workdir=workdir, config=config, rows=rows, out=out)


def test_classes_sizes_and_name_are_derived(trained):
  config = trained["config"]
  assert (config["model"]["num_classes"], config["model"]["dn_labelbook_size"]) == (7, 7)
  assert config["name"] == "shapes7_dino_cpu"
  data = config["data"]
  assert data["size"] == 192 and data["scales"] == [160, 176, 192]
  assert (data["max_size"], data["eval_size"], data["eval_max_size"]) == (192, 192, 192)
  assert data["buckets"] == [[192, 192]]
  # Detections carry the json's category ids (labels 0..6 mapped back).
  with open(os.path.join(trained["workdir"], f"detections_{STEPS}.json")) as f:
    detections = json.load(f)
  assert detections and {d["category_id"] for d in detections} <= set(CATEGORY_IDS)


def test_total_steps_moves_the_lr_drop(trained):
  """2000-step recipe (drop at 7/8, warm-up 2.5%) run for 8 steps: drop at round(7) = 7, no
  warm-up (round(0.2) = 0); the lr logged at step s is the one step s trained with (s - 1
  completed steps)."""
  opt = trained["config"]["optimizer"]
  assert (opt["lr_drop_steps"], opt["warmup_steps"]) == ([7], 0)
  lrs = {r["step"]: r["lr"] for r in trained["rows"]}
  assert sorted(lrs) == list(range(1, STEPS + 1))
  for step, lr in lrs.items():
    assert lr == pytest.approx(1e-3 if step - 1 < 7 else 1e-4, rel=1e-6), step


def _one_line_failure(out, workdir):
  assert out.returncode == 1, out.stderr[-2000:]
  lines = [l for l in out.stderr.splitlines() if l.startswith("run.py:")]
  assert len(lines) == 1, out.stderr[-2000:]
  assert "Compiling" not in out.stderr and "Traceback" not in out.stderr
  assert not os.path.exists(workdir)
  return lines[0]


@pytest.mark.parametrize("classes", [["--config.model.num_classes=7"], []])
def test_small_labelbook_fails_before_compiling(dataset, tmp_path, classes):
  """Set by hand (checked before any data is read) or derived from the json (7)."""
  workdir = str(tmp_path / "wd")
  start = time.perf_counter()
  out = _run(*dataset, f"--workdir={workdir}", *classes, "--config.model.dn_labelbook_size=4",
             timeout=300)
  line = _one_line_failure(out, workdir)
  assert ("config.model.dn_labelbook_size=4 is smaller than config.model.num_classes=7"
          in line), line
  assert time.perf_counter() - start < 120


def test_contradicting_size_overrides_fail_before_compiling(dataset, tmp_path):
  workdir = str(tmp_path / "wd")
  out = _run(*dataset, f"--workdir={workdir}", "--config.data.size=256",
             "--config.data.scales=(160,192)", timeout=300)
  line = _one_line_failure(out, workdir)
  assert "config.data.scales=(160, 192) contradicts config.data.size=256" in line, line
