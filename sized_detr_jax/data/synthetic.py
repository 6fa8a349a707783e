"""Embedded multi-scale synthetic detection dataset written in COCO format.

The project's default dataset, so that a new user can run training and evaluation end to end
without COCO. Each image is a textured background with clutter and 3-9 objects of four
categories whose shape, colour and texture identify the class:

  1 "disc"      red-orange filled ellipse with a lighter core
  2 "block"     blue rectangle with dark horizontal stripes
  3 "triangle"  green triangle with a dark outline
  4 "ring"      yellow thick elliptic ring (background visible inside)

Object sizes are drawn from three COCO size classes (small: area < 32^2 px, medium, large:
area > 96^2 px) so that each holds roughly a third of all boxes: the Sized L1 loss is about box
size, so all three must be well represented. Objects are drawn large-first, and a new object may
cover at most `_MAX_COVER` of any earlier object's box, which gives partial occlusion without
hiding objects. Clutter (grey strokes, brown blobs, specks, sensor noise) makes it harder than a
toy: AP stays far from 1.0 after a short run, while a tiny DINO still learns it on CPU.

Boxes are tight by construction (each shape is drawn inside its box and touches all four sides),
in COCO absolute (x, y, w, h) pixels. Everything is drawn from one numpy Generator per image,
seeded from (seed, split, index), so the dataset is bit-identical for a seed.

Layout written under `out_dir`:
  annotations/instances_{train,val,unlabeled}.json   (unlabeled: images only, no annotations)
  images/{train,val,unlabeled}/<image_id>.{jpg,png}
  DONE.json   the parameters, written last (ensure_synthetic_dataset and the CLI): marks a
              complete dataset; a folder without it is partial, being written, or foreign

CLI: python -m sized_detr_jax.data.synthetic --out DIR --num-images N --seed S
(an existing complete DIR of the same parameters is kept; the trainer uses DIR as is with
`--config.data.root=DIR --config.data.synthetic_num_images=N --config.data.synthetic_seed=S`).
"""
from __future__ import annotations

import argparse
import colorsys
import json
import os
import shutil
import sys
import tempfile
import time

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

CATEGORIES = (
    {"id": 1, "name": "disc", "supercategory": "shape"},
    {"id": 2, "name": "block", "supercategory": "shape"},
    {"id": 3, "name": "triangle", "supercategory": "shape"},
    {"id": 4, "name": "ring", "supercategory": "shape"},
)
# Base hue (0..1) per category id; each object jitters it by +-_HUE_JITTER.
_HUE = {1: 0.02, 2: 0.62, 3: 0.33, 4: 0.15}
_HUE_JITTER = 0.035
_MAX_COVER = 0.4  # max fraction of an earlier object's box a later object may cover
SPLITS = ("train", "val", "unlabeled")
# Image ids are offset per split so they are unique over the whole dataset.
_ID_OFFSET = {"train": 1, "val": 1_000_001, "unlabeled": 2_000_001}
_SPLIT_SEED = {"train": 0, "val": 1, "unlabeled": 2}
FORMAT_VERSION = 1


def _size_class_side_range(size_class, max_side):
  """Range of the box's geometric-mean side for a COCO size class, in pixels."""
  if size_class == 0:  # small: area < 32^2 (aspect jitter below keeps it there)
    return 8.0, 26.0
  if size_class == 1:  # medium: 32^2 <= area <= 96^2
    return 38.0, 84.0
  return 104.0, max(105.0, 0.92 * max_side)  # large: area > 96^2


def _sample_box(rng, size_class, img_w, img_h):
  """Samples an integer box (x0, y0, w, h) of the requested COCO size class inside the image."""
  lo, hi = _size_class_side_range(size_class, min(img_w, img_h))
  side = rng.uniform(lo, hi)
  aspect = np.exp(rng.uniform(-0.35, 0.35))  # w / h in ~[0.7, 1.42]
  w = int(round(side * np.sqrt(aspect)))
  h = int(round(side / np.sqrt(aspect)))
  w = int(np.clip(w, 6, img_w - 2))
  h = int(np.clip(h, 6, img_h - 2))
  area = w * h
  # Re-check the class after rounding/clipping; callers retry on failure.
  if (size_class == 0 and area >= 32 * 32) or (size_class == 2 and area <= 96 * 96) or (
      size_class == 1 and not 32 * 32 <= area <= 96 * 96):
    return None
  x0 = int(rng.integers(0, img_w - w + 1))
  y0 = int(rng.integers(0, img_h - h + 1))
  return x0, y0, w, h


def _cover_ok(box, earlier):
  """True if `box` covers at most _MAX_COVER of every earlier box (all xywh ints)."""
  x0, y0, w, h = box
  for ex, ey, ew, eh in earlier:
    iw = min(x0 + w, ex + ew) - max(x0, ex)
    ih = min(y0 + h, ey + eh) - max(y0, ey)
    if iw > 0 and ih > 0 and iw * ih > _MAX_COVER * ew * eh:
      return False
  return True


def _colour(rng, category_id, value_range=(0.55, 1.0)):
  hue = (_HUE[category_id] + rng.uniform(-_HUE_JITTER, _HUE_JITTER)) % 1.0
  r, g, b = colorsys.hsv_to_rgb(hue, rng.uniform(0.55, 1.0), rng.uniform(*value_range))
  return int(r * 255), int(g * 255), int(b * 255)


def _draw_object(draw, rng, category_id, box):
  """Draws one object so that it touches all four sides of `box` (x0, y0, w, h)."""
  x0, y0, w, h = box
  x1, y1 = x0 + w - 1, y0 + h - 1  # PIL shape coordinates are inclusive
  fill = _colour(rng, category_id)
  dark = tuple(int(c * 0.35) for c in fill)
  if category_id == 1:
    draw.ellipse((x0, y0, x1, y1), fill=fill)
    core = tuple(min(255, int(c * 1.25) + 40) for c in fill)
    draw.ellipse((x0 + w * 0.3, y0 + h * 0.3, x1 - w * 0.3, y1 - h * 0.3), fill=core)
  elif category_id == 2:
    draw.rectangle((x0, y0, x1, y1), fill=fill)
    period = max(3, h // 5)
    for y in range(y0 + period // 2, y1, period):
      draw.line((x0, y, x1, y), fill=dark, width=max(1, period // 3))
  elif category_id == 3:
    apex = x0 + rng.uniform(0.2, 0.8) * (w - 1)
    draw.polygon([(x0, y1), (x1, y1), (apex, y0)], fill=fill, outline=dark)
  else:
    draw.ellipse((x0, y0, x1, y1), outline=fill, width=max(2, int(0.22 * min(w, h))))


def _background(rng, img_w, img_h):
  """Smooth random colour field: a bilinear upsampling of a coarse random grid."""
  grid = rng.uniform(40, 200, size=(4, 4, 3)).astype(np.uint8)
  return Image.fromarray(grid).resize((img_w, img_h), Image.BILINEAR)


def _clutter(draw, rng, img_w, img_h):
  """Distractors that are no category: grey strokes, brown blobs and specks."""
  for _ in range(int(rng.integers(3, 9))):
    g = int(rng.integers(60, 200))
    pts = [tuple(rng.uniform(0, (img_w, img_h))) for _ in range(2)]
    draw.line(pts, fill=(g, g, g), width=int(rng.integers(1, 4)))
  for _ in range(int(rng.integers(1, 5))):
    cx, cy = rng.uniform(0, (img_w, img_h))
    rad = rng.uniform(3, 18, size=2)
    brown = (int(rng.integers(90, 140)), int(rng.integers(60, 90)), int(rng.integers(30, 60)))
    draw.ellipse((cx - rad[0], cy - rad[1], cx + rad[0], cy + rad[1]), fill=brown)
  for _ in range(int(rng.integers(5, 20))):
    cx, cy = rng.uniform(0, (img_w, img_h))
    c = tuple(int(v) for v in rng.integers(0, 256, size=3))
    draw.rectangle((cx, cy, cx + 1, cy + 1), fill=c)


# Probability of each object's COCO size class (small, medium, large) in the original image.
DEFAULT_SIZE_MIX = (0.4, 0.33, 0.27)
# The small-object variant (`small` config token). Measured on 150 rendered images (seed 0): 77%
# of boxes are under 32x32 px at the default run's training and eval sizes (shorter side
# 160-192, longer side <= 192), against 44% with DEFAULT_SIZE_MIX.
SMALL_SIZE_MIX = (0.75, 0.17, 0.08)


def render_image(rng, image_size_range=(160, 256), size_mix=DEFAULT_SIZE_MIX):
  """Renders one synthetic image.

  Args:
    rng: numpy Generator; all randomness of the image comes from it.
    image_size_range: inclusive (min, max) of each image side in pixels.
    size_mix: probabilities of the small / medium / large COCO size classes per object.

  Returns:
    (image uint8 [H, W, 3], boxes int [N, 4] COCO absolute xywh, category_ids int [N]).
  """
  img_w, img_h = (int(v) for v in rng.integers(image_size_range[0], image_size_range[1] + 1, 2))
  image = _background(rng, img_w, img_h)
  draw = ImageDraw.Draw(image)
  _clutter(draw, rng, img_w, img_h)
  num_objects = int(rng.integers(3, 10))
  # Size classes small/medium/large; at most two large objects fit without heavy cover.
  size_classes = rng.choice(3, size=num_objects, p=tuple(size_mix))
  size_classes = np.sort(size_classes)[::-1]  # large first: later objects occlude earlier ones
  boxes, cats = [], []
  for size_class in size_classes:
    for _ in range(20):  # placement retries
      box = _sample_box(rng, int(size_class), img_w, img_h)
      if box is not None and _cover_ok(box, boxes):
        cat = int(rng.integers(1, len(CATEGORIES) + 1))
        _draw_object(draw, rng, cat, box)
        boxes.append(box)
        cats.append(cat)
        break
  # Mild blur then sensor noise: texture everywhere, no perfectly flat colours.
  image = image.filter(ImageFilter.GaussianBlur(radius=float(rng.uniform(0.0, 0.8))))
  pixels = np.asarray(image, dtype=np.int16)
  pixels = pixels + rng.normal(0.0, 7.0, size=pixels.shape).astype(np.int16)
  pixels = np.clip(pixels, 0, 255).astype(np.uint8)
  return pixels, np.asarray(boxes, np.int64).reshape(-1, 4), np.asarray(cats, np.int64)


def _write_split(out_dir, split, num_images, seed, image_size_range, fmt, size_mix):
  images, annotations = [], []
  image_dir = os.path.join(out_dir, "images", split)
  os.makedirs(image_dir, exist_ok=True)
  for i in range(num_images):
    rng = np.random.default_rng([seed, _SPLIT_SEED[split], i])
    pixels, boxes, cats = render_image(rng, image_size_range, size_mix)
    image_id = _ID_OFFSET[split] + i
    file_name = f"{image_id:08d}.{fmt}"
    pil = Image.fromarray(pixels)
    if fmt == "jpg":
      pil.save(os.path.join(image_dir, file_name), quality=92)
    else:
      pil.save(os.path.join(image_dir, file_name), compress_level=1)
    images.append({"id": image_id, "file_name": file_name,
                   "height": int(pixels.shape[0]), "width": int(pixels.shape[1])})
    if split == "unlabeled":
      continue
    for box, cat in zip(boxes.tolist(), cats.tolist()):
      annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": cat,
                          "bbox": [float(v) for v in box], "area": float(box[2] * box[3]),
                          "iscrowd": 0})
  info = {"description": "sized_detr_jax synthetic multi-scale shapes", "version": FORMAT_VERSION,
          "seed": seed, "split": split, "num_images": num_images,
          "image_size_range": list(image_size_range), "format": fmt}
  if tuple(size_mix) != DEFAULT_SIZE_MIX:
    info["size_mix"] = list(size_mix)
  coco = {"info": info, "licenses": [], "images": images, "categories": list(CATEGORIES)}
  if split != "unlabeled":
    coco["annotations"] = annotations
  ann_dir = os.path.join(out_dir, "annotations")
  os.makedirs(ann_dir, exist_ok=True)
  with open(os.path.join(ann_dir, f"instances_{split}.json"), "w") as f:
    json.dump(coco, f)


def dataset_paths(root):
  """Annotation json and image folder per split of a synthetic dataset under `root`."""
  return {split: {"ann_file": os.path.join(root, "annotations", f"instances_{split}.json"),
                  "image_dir": os.path.join(root, "images", split)} for split in SPLITS}


def _check_arguments(num_images, seed, num_val, num_unlabeled, image_size_range, fmt,
                     size_mix=DEFAULT_SIZE_MIX):
  """One-line ValueErrors naming the argument (and its CLI flag) for bad generator arguments."""
  if fmt not in ("jpg", "png"):
    raise ValueError(f"synthetic dataset: fmt (--format) must be 'jpg' or 'png', got {fmt!r}")
  for name, flag, value, minimum in (("num_images", "--num-images", num_images, 1),
                                     ("seed", "--seed", seed, 0),
                                     ("num_val", "--num-val", num_val, 0),
                                     ("num_unlabeled", "--num-unlabeled", num_unlabeled, 0)):
    if value is None and name in ("num_val", "num_unlabeled"):
      continue
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < minimum:
      raise ValueError(f"synthetic dataset: {name} ({flag}) must be an integer >= {minimum}, "
                       f"got {value!r}")
  lo, hi = image_size_range
  if not 120 <= lo <= hi:
    raise ValueError(f"synthetic dataset: image_size_range (--min-side, --max-side) must satisfy "
                     f"120 <= min <= max so large (>96^2) objects fit, got {image_size_range}")
  mix = np.asarray(size_mix, float)
  if mix.shape != (3,) or np.any(mix < 0) or abs(mix.sum() - 1.0) > 1e-6:
    raise ValueError(f"synthetic dataset: size_mix (--size-mix) must be 3 non-negative "
                     f"probabilities (small, medium, large) summing to 1, got {size_mix!r}")


def _split_counts(num_images, num_val, num_unlabeled):
  return {"train": num_images,
          "val": max(num_images // 4, 16) if num_val is None else num_val,
          "unlabeled": num_images if num_unlabeled is None else num_unlabeled}


def make_synthetic_dataset(out_dir, num_images, seed, *, num_val=None, num_unlabeled=None,
                           image_size_range=(160, 256), fmt="jpg", size_mix=DEFAULT_SIZE_MIX):
  """Writes the synthetic dataset (COCO json + images) under `out_dir`, in place.

  Use `ensure_synthetic_dataset` (or the CLI) for a dataset others read: it writes into a
  temporary folder, adds the DONE.json marker and renames.

  Args:
    out_dir: output folder (created; existing files of the same names are overwritten).
    num_images: number of labeled training images.
    seed: non-negative integer seed; the output is identical for identical arguments.
    num_val: validation images (default max(num_images // 4, 16)).
    num_unlabeled: unlabeled images, written without annotations (default num_images).
    image_size_range: inclusive (min, max) pixel range of each image side.
    fmt: "jpg" (quality 92, COCO-like) or "png" (lossless).
    size_mix: probabilities of the small / medium / large size classes per object
      (`DEFAULT_SIZE_MIX`; `SMALL_SIZE_MIX` for the small-object variant).

  Returns:
    dataset_paths(out_dir): {split: {"ann_file", "image_dir"}} for train/val/unlabeled.
  """
  _check_arguments(num_images, seed, num_val, num_unlabeled, image_size_range, fmt, size_mix)
  counts = _split_counts(num_images, num_val, num_unlabeled)
  for split in SPLITS:
    _write_split(out_dir, split, counts[split], seed, tuple(image_size_range), fmt,
                 tuple(size_mix))
  return dataset_paths(out_dir)


MARKER = "DONE.json"


def _effective(num_images, seed, num_val=None, num_unlabeled=None, image_size_range=(160, 256),
               fmt="jpg", version=FORMAT_VERSION, size_mix=DEFAULT_SIZE_MIX):
  """The parameters that determine a dataset's content, defaults filled in (marker content;
  `size_mix` only when not the default, so markers written before it existed still match)."""
  counts = _split_counts(num_images, num_val, num_unlabeled)
  effective = {"version": version, "seed": seed, "num_images": counts["train"],
               "num_val": counts["val"], "num_unlabeled": counts["unlabeled"],
               "image_size_range": [int(v) for v in image_size_range], "fmt": fmt}
  if tuple(size_mix) != DEFAULT_SIZE_MIX:
    effective["size_mix"] = [float(v) for v in size_mix]
  return effective


def _adoptable(root, wanted):
  """Why a folder without marker is not the wanted dataset, or None if it is complete.

  Datasets written by this module before it wrote a marker (and by hand with the old CLI) hold
  every split's json (written after its images) with an "info" record of its parameters.
  """
  paths = dataset_paths(root)
  for split in SPLITS:
    ann = paths[split]["ann_file"]
    try:
      with open(ann) as f:
        data = json.load(f)
    except (OSError, ValueError) as e:
      return f"{ann} is missing or unreadable ({type(e).__name__})"
    info = data.get("info", {}) if isinstance(data, dict) else {}
    found = {"seed": info.get("seed"), "num_images": info.get("num_images"),
             "image_size_range": info.get("image_size_range"), "fmt": info.get("format"),
             "version": info.get("version"), "size_mix": info.get("size_mix")}
    want = {"seed": wanted["seed"], "num_images": wanted[
        "num_images" if split == "train" else f"num_{split}"],
            "image_size_range": wanted["image_size_range"], "fmt": wanted["fmt"],
            "version": wanted["version"], "size_mix": wanted.get("size_mix")}
    if found != want:
      return f"{ann} records {found}, not {want}"
    images = data.get("images", [])
    missing = [im.get("file_name") for im in images
               if not os.path.isfile(os.path.join(paths[split]["image_dir"],
                                                  str(im.get("file_name"))))]
    if len(images) != want["num_images"] or missing:
      return (f"{ann} lists {len(images)} images ({len(missing)} missing, first "
              f"{missing[:1]}) instead of {want['num_images']}")
  return None


def _write_marker(folder, wanted):
  tmp = os.path.join(folder, f".{MARKER}.{os.getpid()}.tmp")
  with open(tmp, "w") as f:
    json.dump(wanted, f)
  os.replace(tmp, os.path.join(folder, MARKER))  # atomic: the marker is whole or absent


def ensure_synthetic_dataset(root, num_images=512, seed=0, **kwargs):
  """Returns the paths of the synthetic dataset under `root`, generating it on first use.

  `root/DONE.json` (written last, atomically) marks a complete dataset and records its
  parameters. Cases:
    * marker present and matching: used as is; not matching: ValueError naming both.
    * no marker, but a complete dataset of the wanted parameters (written by the CLI or by a
      version without marker): adopted (the marker is added) and used as is.
    * no marker and anything else in a non-empty `root` (an interrupted or concurrent
      generation, another folder): ValueError saying so; nothing is deleted.
    * `root` absent or empty: generated into a temporary sibling folder and renamed into place,
      so concurrent callers never see a half-written dataset; a caller that loses the race
      uses the winner's dataset.

  Args:
    root: dataset folder.
    num_images, seed, **kwargs: as make_synthetic_dataset.

  Returns:
    {split: {"ann_file", "image_dir"}} for train/val/unlabeled.
  """
  _check_arguments(num_images, seed, kwargs.get("num_val"), kwargs.get("num_unlabeled"),
                   kwargs.get("image_size_range", (160, 256)), kwargs.get("fmt", "jpg"),
                   kwargs.get("size_mix", DEFAULT_SIZE_MIX))
  paths = dataset_paths(root)
  wanted = _effective(num_images, seed, **kwargs)
  if _matches_marker(root, wanted):
    return paths
  if os.path.isdir(root) and os.listdir(root):
    reason = _adoptable(root, wanted)
    if reason is not None:
      raise ValueError(
          f"{root} exists but is not a complete synthetic dataset of {wanted} ({reason}); no "
          f"{MARKER} marker, so a generation was interrupted, another process is writing it, "
          "or it is another folder: wait for the other process, or delete it / use another root")
    _write_marker(root, wanted)
    return paths
  parent = os.path.dirname(os.path.abspath(root))
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=".synthetic-", dir=parent)
  try:
    make_synthetic_dataset(tmp, num_images, seed, **kwargs)
    _write_marker(tmp, wanted)
    try:
      os.rename(tmp, root)  # replaces an empty folder; fails on a non-empty one
    except OSError:
      if not _matches_marker(root, wanted):  # not a lost race to an identical dataset
        raise
  finally:
    if os.path.exists(tmp):
      shutil.rmtree(tmp, ignore_errors=True)
  return paths


def _matches_marker(root, wanted):
  """True if root/DONE.json records `wanted`; False if absent; ValueError if it differs."""
  marker = os.path.join(root, MARKER)
  try:
    with open(marker) as f:
      found = json.load(f)
  except FileNotFoundError:
    return False
  except (OSError, ValueError) as e:
    raise ValueError(f"{marker}: unreadable marker ({e}); delete the dataset folder") from None
  # Markers written before the effective parameters were recorded hold only the arguments.
  keys = ("num_images", "seed", "num_val", "num_unlabeled", "image_size_range", "fmt", "version",
          "size_mix")
  normalised = _effective(**{k: v for k, v in found.items() if k in keys})
  if normalised != wanted:
    raise ValueError(f"{marker}: synthetic dataset exists with {normalised}, but {wanted} was "
                     "requested; use another root or delete it")
  return True


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--out", required=True, help="output folder")
  parser.add_argument("--num-images", type=int, default=512, help="labeled training images")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--num-val", type=int, default=None)
  parser.add_argument("--num-unlabeled", type=int, default=None)
  parser.add_argument("--min-side", type=int, default=160)
  parser.add_argument("--max-side", type=int, default=256)
  parser.add_argument("--format", choices=("jpg", "png"), default="jpg")
  parser.add_argument("--size-mix", default=",".join(map(str, DEFAULT_SIZE_MIX)),
                      help="probabilities of small,medium,large objects (small-object variant: "
                           + ",".join(map(str, SMALL_SIZE_MIX)) + ")")
  args = parser.parse_args(argv)
  start = time.time()
  try:
    # Written like the trainer's default dataset (temporary folder, marker, rename), so
    # `run.py --config.data.root=OUT` with the same parameters uses it as is.
    paths = ensure_synthetic_dataset(args.out, args.num_images, args.seed, num_val=args.num_val,
                                     num_unlabeled=args.num_unlabeled,
                                     image_size_range=(args.min_side, args.max_side),
                                     fmt=args.format,
                                     size_mix=tuple(float(v) for v in args.size_mix.split(",")))
  except (ValueError, OSError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  print(f"wrote synthetic dataset to {args.out} in {time.time() - start:.1f}s: "
        + ", ".join(f"{s}={paths[s]['ann_file']}" for s in SPLITS))
  return 0


if __name__ == "__main__":
  sys.exit(main())
