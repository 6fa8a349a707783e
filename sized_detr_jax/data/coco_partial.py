"""COCO-partial splits in Soft Teacher's format (labeled / unlabeled json per fold and percent).

python -m sized_detr_jax.data.coco_partial --ann instances_train2017.json --percent 10 \
    --fold 1 --out DIR

writes DIR/instances_train2017.1@10.json (the labeled images with their annotations) and
DIR/instances_train2017.1@10-unlabeled.json (all other images, with their annotations, which the
semi-supervised trainer ignores), as Soft Teacher's tools/misc/split_coco: the fold is the seed of
`np.random.RandomState`, and int(percent / 100 * N) images are labeled. Soft Teacher draws the
indices with `np.random.choice` (with replacement, so slightly fewer unique images); we draw
without replacement so the labeled count is exactly int(percent / 100 * N). Both files keep the
input's other top-level keys (info, licenses, categories) and the input's image order.

A split that would be empty is an error naming --percent and the image count (e.g. 10 % of 4
images is int(0.4) = 0 labeled images); `--min-labeled K` raises the labeled count to at least
K instead (a deviation from Soft Teacher's count).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

import numpy as np


class SplitError(ValueError):
  """Malformed input or arguments; the message names the file or argument."""


def labeled_count(num_images, percent, min_labeled=0, *, source="<input>"):
  """Soft Teacher's int(percent / 100 * N), raised to `min_labeled`; empty splits raise.

  Raises:
    SplitError: the labeled split would be empty, or (percent < 100) the unlabeled one would.
  """
  if not 0 <= min_labeled <= num_images:
    raise SplitError(f"{source}: --min-labeled must be in [0, {num_images}] (the image count), "
                     f"got {min_labeled}")
  count = max(int(percent / 100.0 * num_images), min_labeled)
  if count == 0:
    hint = (f"use --percent >= {100.0 / num_images:.4g} or --min-labeled 1" if num_images
            else "the input has no images")
    raise SplitError(f"{source}: --percent {percent:g} of {num_images} images gives "
                     f"int({percent:g} / 100 x {num_images}) = 0 labeled images, an empty "
                     f"labeled split; {hint}")
  if count == num_images and percent < 100:
    raise SplitError(f"{source}: --percent {percent:g} with --min-labeled {min_labeled} labels "
                     f"all {num_images} images: the unlabeled split would be empty")
  return count


def split_coco(data, percent, fold, *, source="<input>", min_labeled=0):
  """Partitions a COCO dict's images into a labeled part and the rest.

  Args:
    data: a COCO instances dict with "images" and "annotations" lists.
    percent: labeled percentage in (0, 100].
    fold: integer seed of the split (Soft Teacher uses folds 1..5).
    source: file name for error messages.
    min_labeled: the labeled count is at least this (0: Soft Teacher's count exactly).

  Returns:
    (labeled dict, unlabeled dict): the same top-level keys as `data`, images partitioned,
    annotations following their image.

  Raises:
    SplitError: bad arguments or input, or a split that would be empty (`labeled_count`).
  """
  if not 0 < percent <= 100:
    raise SplitError(f"{source}: --percent must be in (0, 100], got {percent}")
  if not 0 <= fold < 2**32:
    raise SplitError(f"{source}: --fold must be a non-negative integer seed, got {fold}")
  if not isinstance(data, dict) or not isinstance(data.get("images"), list) or not isinstance(
      data.get("annotations"), list):
    raise SplitError(f"{source}: expected a COCO object with 'images' and 'annotations' lists")
  images = data["images"]
  image_ids = []
  for i, im in enumerate(images):
    if not isinstance(im, dict) or "id" not in im:
      raise SplitError(f"{source}: images[{i}] has no 'id'")
    image_ids.append(im["id"])
  if len(set(image_ids)) != len(image_ids):
    raise SplitError(f"{source}: duplicate image ids")
  known_ids = set(image_ids)
  for j, ann in enumerate(data["annotations"]):
    if not isinstance(ann, dict) or ann.get("image_id") not in known_ids:
      raise SplitError(f"{source}: annotations[{j}] has a missing or unknown 'image_id'")
  num_labeled = labeled_count(len(images), percent, min_labeled, source=source)
  chosen = np.random.RandomState(fold).choice(len(images), size=num_labeled, replace=False)
  is_labeled = np.zeros(len(images), bool)
  is_labeled[chosen] = True
  labeled_ids = {image_ids[i] for i in np.flatnonzero(is_labeled)}

  def part(keep_labeled):
    out = {k: v for k, v in data.items() if k not in ("images", "annotations")}
    out["images"] = [im for im, lab in zip(images, is_labeled) if lab == keep_labeled]
    out["annotations"] = [a for a in data["annotations"]
                          if (a["image_id"] in labeled_ids) == keep_labeled]
    return out

  return part(True), part(False)


def split_paths(ann_file, percent, fold, out_dir):
  """(labeled, unlabeled) output paths: <stem>.<fold>@<percent>.json and ...-unlabeled.json."""
  stem = os.path.splitext(os.path.basename(ann_file))[0]
  pct = f"{percent:g}"
  return (os.path.join(out_dir, f"{stem}.{fold}@{pct}.json"),
          os.path.join(out_dir, f"{stem}.{fold}@{pct}-unlabeled.json"))


def write_split(ann_file, percent, fold, out_dir, *, min_labeled=0):
  """Reads `ann_file`, writes both parts into `out_dir`; returns their paths."""
  try:
    with open(ann_file) as f:
      data = json.load(f)
  except OSError as e:
    raise SplitError(f"{ann_file}: cannot read: {e.strerror}") from None
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise SplitError(f"{ann_file}: malformed JSON: {e}") from None
  labeled, unlabeled = split_coco(data, percent, fold, source=ann_file, min_labeled=min_labeled)
  os.makedirs(out_dir, exist_ok=True)
  paths = split_paths(ann_file, percent, fold, out_dir)
  for path, part in zip(paths, (labeled, unlabeled)):
    with open(path, "w") as f:
      json.dump(part, f)
  return paths


def cached_split(ann_file, percent, fold, split_dir):
  """`write_split` into `split_dir/<stem>-<version of the json>/`, done once per version of the
  json: the files of an earlier call are reused. Each file is written under a temporary name and
  renamed into place, so concurrent runs (one per host) never read a partial file.

  Returns:
    (labeled json path, unlabeled json path).
  """
  try:
    st = os.stat(ann_file)
  except OSError as e:
    raise SplitError(f"{ann_file}: cannot read: {e.strerror}") from None
  stem = os.path.splitext(os.path.basename(ann_file))[0]
  out_dir = os.path.join(split_dir, f"{stem}-{st.st_mtime_ns:x}-{st.st_size:x}")
  paths = split_paths(ann_file, percent, fold, out_dir)
  if all(os.path.isfile(p) for p in paths):
    return paths
  os.makedirs(out_dir, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=".split-", dir=out_dir)
  written = write_split(ann_file, percent, fold, tmp)
  for src, dst in zip(written, paths):
    os.replace(src, dst)
  os.rmdir(tmp)
  return paths


def main(argv=None):
  parser = argparse.ArgumentParser(description="COCO-partial split (Soft Teacher format)")
  parser.add_argument("--ann", required=True, help="COCO instances json to split")
  parser.add_argument("--percent", type=float, required=True, help="labeled percent, e.g. 10")
  parser.add_argument("--fold", type=int, required=True, help="fold = random seed, e.g. 1..5")
  parser.add_argument("--out", required=True, help="output folder")
  parser.add_argument("--min-labeled", type=int, default=0,
                      help="label at least this many images (default 0: Soft Teacher's count "
                           "int(percent / 100 * N), and an error if that is 0)")
  args = parser.parse_args(argv)
  try:
    labeled, unlabeled = write_split(args.ann, args.percent, args.fold, args.out,
                                     min_labeled=args.min_labeled)
  except (SplitError, OSError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  print(f"wrote {labeled} and {unlabeled}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
