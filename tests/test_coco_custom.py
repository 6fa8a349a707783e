"""A user's own COCO json through `coco_custom` with run.py (subprocesses).

One short DINO run (8 steps + evaluation) on a 7-class dataset written here, with no class,
size or schedule field set: the derived values must reach config.json and the logged lr; bad
class / size overrides and bad token combinations must fail before anything is compiled. Co-DINO
and Semi-DETR (unlabeled images from a folder with no json) train a few steps on the same
non-contiguous category ids (slow); the labeled-percent split is checked against its definition.
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


def _run(*args, timeout=1200, tokens="cpu"):
  return subprocess.run([sys.executable, "run.py", f"--config=experiments/coco_custom.py:{tokens}",
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


@pytest.mark.slow
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


@pytest.mark.slow
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


@pytest.mark.parametrize("tokens, message", [
    ("cpu,co_dino,semi_detr", "tokens 'co_dino' and 'semi_detr' exclude each other"),
    ("cpu,sized_both", "token 'sized_both' is Semi-DETR's; add 'semi_detr'"),
    ("cpu,semi_detr,sized_l1", "with 'semi_detr' the Sized L1 tokens are 'sized_both'"),
    ("cpu,semi_detr,plain", "token 'plain' needs sized_both or sized_sup"),
    ("cpu,semi_detr", "Semi-DETR needs unlabeled images: set config.data.unlabeled_images"),
])
def test_bad_method_combinations_fail_in_one_line(dataset, tmp_path, tokens, message):
  workdir = str(tmp_path / "wd")
  out = _run(*dataset, f"--workdir={workdir}", tokens=tokens, timeout=300)
  line = _one_line_failure(out, workdir)
  assert message in line, line


def _labeled_count(n, percent):
  return int(percent / 100 * n)  # COCO-partial's count (Soft Teacher), written out here


def test_labeled_percent_splits_the_training_json(dataset, tmp_path):
  from sized_detr_jax import config_lib  # pylint: disable=g-import-not-at-top
  config = config_lib.load_config("coco_custom", "cpu,semi_detr,sized_sup")
  for arg in dataset:
    key, value = arg[len("--config."):].split("=", 1)
    section, field = key.split(".")
    config[section][field] = value
  config.data.labeled_percent = 50.0
  config.data.split_dir = str(tmp_path / "splits")
  final = config_lib.finalize(config)
  train_json = dataset[0].split("=", 1)[1]
  with open(train_json) as f:
    original = json.load(f)
  with open(final.data.train_ann) as f:
    labeled = json.load(f)
  with open(final.data.unlabeled_ann) as f:
    unlabeled = json.load(f)
  ids = lambda d: {im["id"] for im in d["images"]}  # pylint: disable=unnecessary-lambda-assignment
  assert len(labeled["images"]) == _labeled_count(len(original["images"]), 50.0) == 4
  assert ids(labeled) | ids(unlabeled) == ids(original) and not ids(labeled) & ids(unlabeled)
  assert all(a["image_id"] in ids(labeled) for a in labeled["annotations"])
  assert final.data.unlabeled_images == final.data.train_images
  assert final.data.labeled_percent == 0.0  # resolved: finalising again changes nothing
  assert config_lib.finalize(final).to_json() == final.to_json()
  assert (final.model.num_classes, final.name) == (7, "shapes7_semi_detr_cpu_sized_sup")


def _train_briefly(dataset, tmp_path, tokens, *extra):
  workdir = str(tmp_path / "wd")
  out = _run(*dataset, f"--workdir={workdir}", "--config.total_steps=2", "--config.log_every=1",
             "--config.checkpoint_every=2", *extra, tokens=tokens)
  assert out.returncode == 0, out.stderr[-3000:]
  with open(os.path.join(workdir, "config.json")) as f:
    config = json.load(f)
  with open(os.path.join(workdir, "detections_2.json")) as f:
    detections = json.load(f)
  assert (config["model"]["num_classes"], config["model"]["dn_labelbook_size"]) == (7, 7)
  assert {d["category_id"] for d in detections} <= set(CATEGORY_IDS)
  return config


@pytest.mark.slow
def test_co_dino_trains_on_own_data(dataset, tmp_path):
  config = _train_briefly(dataset, tmp_path, "cpu,co_dino,sized_l1")
  assert config["method"] == "co_dino" and config["name"] == "shapes7_co_dino_cpu_sized_l1"
  assert (config["criterion"]["bbox_loss"], config["criterion"]["sized_l1_rescale"]) == (
      "sized_l1", True)


@pytest.mark.slow
def test_semi_detr_trains_with_a_folder_of_unlabeled_images(dataset, tmp_path):
  folder = tmp_path / "unlabeled"
  folder.mkdir()
  rng = np.random.default_rng(1)
  for k in range(5):  # no json: just images, of several sizes and kinds
    pixels = rng.integers(0, 255, (int(rng.integers(60, 90)), 80, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(folder / f"u{k}.{'png' if k % 2 else 'jpg'}")
  (folder / "notes.txt").write_text("not an image")
  config = _train_briefly(dataset, tmp_path, "cpu,semi_detr,sized_both",
                          f"--config.data.unlabeled_images={folder}",
                          "--config.semi.switch_step=-1")
  assert config["method"] == "semi_detr" and config["semi"]["sized_l1_branches"] == "both"
  assert config["data"]["unlabeled_ann"] == ""
  import ml_collections  # pylint: disable=g-import-not-at-top
  from sized_detr_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  source = pipeline.get_source(ml_collections.ConfigDict(config["data"]), "unlabeled")
  assert len(source) == 5 and len(source[0]["boxes"]) == 0  # the images only, unannotated


@pytest.mark.slow
def test_empty_unlabeled_folder_is_a_one_line_error(dataset, tmp_path):
  (tmp_path / "empty").mkdir()
  workdir = str(tmp_path / "wd")
  out = _run(*dataset, f"--workdir={workdir}", f"--config.data.unlabeled_images={tmp_path}/empty",
             tokens="cpu,semi_detr", timeout=300)
  assert out.returncode == 1, out.stderr[-2000:]
  assert f"config.data.unlabeled_images={tmp_path}/empty: no image files" in out.stderr
