"""Tests of the embedded synthetic dataset: determinism, size mix, layout, reuse."""
import hashlib
import json
import os

import numpy as np
import pytest
from PIL import Image, ImageDraw

from sized_detr_jax.data import synthetic


def _digest(root):
  """sha256 of every file under root, keyed by relative path."""
  out = {}
  for dirpath, _, files in os.walk(root):
    for name in files:
      path = os.path.join(dirpath, name)
      with open(path, "rb") as f:
        out[os.path.relpath(path, root)] = hashlib.sha256(f.read()).hexdigest()
  return out


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
  root = str(tmp_path_factory.mktemp("syn") / "a")
  paths = synthetic.make_synthetic_dataset(root, 80, seed=3, num_val=8, num_unlabeled=6)
  return root, paths


def test_deterministic_and_seed_dependent(dataset, tmp_path):
  root, _ = dataset
  again = synthetic.make_synthetic_dataset(str(tmp_path / "b"), 80, seed=3, num_val=8,
                                           num_unlabeled=6)
  assert _digest(root) == _digest(str(tmp_path / "b"))
  other = synthetic.make_synthetic_dataset(str(tmp_path / "c"), 4, seed=4, num_val=1,
                                           num_unlabeled=1)
  with open(other["train"]["ann_file"]) as f:
    ann_other = json.load(f)["annotations"]
  with open(again["train"]["ann_file"]) as f:
    ann_same = [a for a in json.load(f)["annotations"] if a["image_id"] <= 4]
  assert [a["bbox"] for a in ann_other] != [a["bbox"] for a in ann_same]


def test_size_mix_each_class_at_least_15_percent(dataset):
  _, paths = dataset
  with open(paths["train"]["ann_file"]) as f:
    coco = json.load(f)
  area = np.array([a["bbox"][2] * a["bbox"][3] for a in coco["annotations"]], np.float64)
  assert len(area) >= 5 * 80 * 0.6  # several objects per image
  fractions = [(area < 32**2).mean(), ((area >= 32**2) & (area <= 96**2)).mean(),
               (area > 96**2).mean()]
  assert min(fractions) >= 0.15, fractions
  cats = np.array([a["category_id"] for a in coco["annotations"]])
  assert set(cats.tolist()) == {c["id"] for c in coco["categories"]}
  assert len(coco["categories"]) >= 3


def test_layout_boxes_inside_images_and_unlabeled_has_no_annotations(dataset):
  _, paths = dataset
  for split in ("train", "val"):
    with open(paths[split]["ann_file"]) as f:
      coco = json.load(f)
    images = {im["id"]: im for im in coco["images"]}
    for im in coco["images"][:5]:
      with Image.open(os.path.join(paths[split]["image_dir"], im["file_name"])) as pil:
        assert pil.size == (im["width"], im["height"])
        assert pil.mode == "RGB"
    for a in coco["annotations"]:
      im = images[a["image_id"]]
      x, y, w, h = a["bbox"]
      assert x >= 0 and y >= 0 and w > 0 and h > 0
      assert x + w <= im["width"] and y + h <= im["height"]
  with open(paths["unlabeled"]["ann_file"]) as f:
    unl = json.load(f)
  assert "annotations" not in unl and len(unl["images"]) == 6
  ids = [json.load(open(paths[s]["ann_file"]))["images"][0]["id"] for s in synthetic.SPLITS]
  assert len(set(ids)) == 3  # image ids unique across splits


def test_objects_are_drawn_where_their_boxes_are():
  # A lone object: its box must be exactly the bounding box of the pixels that changed.
  rng = np.random.default_rng(0)
  for cat in (1, 2, 3, 4):
    canvas = Image.new("RGB", (120, 100), (0, 0, 0))
    synthetic._draw_object(ImageDraw.Draw(canvas), rng, cat, (17, 23, 41, 33))
    ys, xs = np.nonzero(np.asarray(canvas).sum(-1))
    assert (xs.min(), ys.min(), xs.max() + 1 - xs.min(), ys.max() + 1 - ys.min()) == (
        17, 23, 41, 33), cat


def test_ensure_generates_once_and_rejects_mismatch(tmp_path):
  root = str(tmp_path / "syn")
  paths = synthetic.ensure_synthetic_dataset(root, num_images=3, seed=1, num_val=2,
                                             num_unlabeled=2)
  mtime = os.path.getmtime(paths["train"]["ann_file"])
  assert synthetic.ensure_synthetic_dataset(root, num_images=3, seed=1, num_val=2,
                                            num_unlabeled=2) == paths
  assert os.path.getmtime(paths["train"]["ann_file"]) == mtime
  with pytest.raises(ValueError, match="seed"):
    synthetic.ensure_synthetic_dataset(root, num_images=3, seed=2, num_val=2, num_unlabeled=2)


def test_cli(tmp_path, capsys):
  out = str(tmp_path / "cli")
  assert synthetic.main(["--out", out, "--num-images", "2", "--seed", "0", "--num-val", "1",
                         "--num-unlabeled", "1", "--format", "png"]) == 0
  assert os.path.exists(os.path.join(out, "images", "train", "00000001.png"))
  assert synthetic.main(["--out", out, "--num-images", "0"]) == 1
  assert "num_images" in capsys.readouterr().err


def test_colour_alone_identifies_the_class():
  # Median hue of an object's drawn pixels falls in a per-class interval that no other class
  # reaches, so appearance identifies the class (shape and texture add to it).
  import colorsys
  rng = np.random.default_rng(1)
  hues = {}
  for cat in (1, 2, 3, 4):
    for _ in range(40):
      canvas = Image.new("RGB", (60, 60), (0, 0, 0))
      synthetic._draw_object(ImageDraw.Draw(canvas), rng, cat, (5, 5, 50, 45))
      px = np.asarray(canvas).reshape(-1, 3) / 255.0
      px = px[px.max(-1) > 0.1]
      h = np.array([colorsys.rgb_to_hsv(*p)[0] for p in px[::7]])
      h = np.median(np.where(h > 0.8, h - 1.0, h))  # red wraps around hue 0
      hues.setdefault(cat, []).append(h)
  ranges = sorted((min(v), max(v), c) for c, v in hues.items())
  for (_, hi, c1), (lo, _, c2) in zip(ranges, ranges[1:]):
    assert hi < lo, (c1, c2, ranges)


def _small_share_at_training_size(paths, shorter=192, longest=192):
  """Share of training boxes under 32x32 px after the default run's resize (shorter side to
  `shorter`, longer side capped at `longest`), from the json alone."""
  with open(paths["train"]["ann_file"]) as f:
    coco = json.load(f)
  sizes = {im["id"]: (im["height"], im["width"]) for im in coco["images"]}
  small = []
  for a in coco["annotations"]:
    h, w = sizes[a["image_id"]]
    scale = min(shorter / min(h, w), longest / max(h, w))
    small.append(a["bbox"][2] * a["bbox"][3] * scale**2 < 32**2)
  return float(np.mean(small))


def test_small_object_variant_is_dominated_by_small_boxes(dataset, tmp_path):
  root = str(tmp_path / "small")
  paths = synthetic.ensure_synthetic_dataset(root, num_images=60, seed=3, num_val=2,
                                             num_unlabeled=0,
                                             size_mix=synthetic.SMALL_SIZE_MIX)
  for shorter in (160, 176, 192):  # every training scale, and the eval size 176
    assert _small_share_at_training_size(paths, shorter) >= 0.6
  assert _small_share_at_training_size(dataset[1]) < 0.5  # the default mix: a minority
  with open(os.path.join(root, synthetic.MARKER)) as f:
    assert json.load(f)["size_mix"] == list(synthetic.SMALL_SIZE_MIX)
  # The same root asked with the default mix is another dataset: refused, nothing deleted.
  with pytest.raises(ValueError, match="size_mix"):
    synthetic.ensure_synthetic_dataset(root, num_images=60, seed=3, num_val=2, num_unlabeled=0)
  with pytest.raises(ValueError, match="size_mix"):
    synthetic.make_synthetic_dataset(str(tmp_path / "bad"), 2, seed=0, size_mix=(0.5, 0.5, 0.5))


def test_default_mix_marker_has_no_size_mix_so_old_datasets_still_match(tmp_path):
  root = str(tmp_path / "d")
  synthetic.ensure_synthetic_dataset(root, num_images=2, seed=0, num_val=1, num_unlabeled=1)
  with open(os.path.join(root, synthetic.MARKER)) as f:
    assert "size_mix" not in json.load(f)
  assert synthetic.ensure_synthetic_dataset(root, num_images=2, seed=0, num_val=1,
                                            num_unlabeled=1,
                                            size_mix=synthetic.DEFAULT_SIZE_MIX)
