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
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np


class SplitError(ValueError):
  """Malformed input or arguments; the message names the file or argument."""


def split_coco(data, percent, fold, *, source="<input>"):
  """Partitions a COCO dict's images into a labeled part and the rest.

  Args:
    data: a COCO instances dict with "images" and "annotations" lists.
    percent: labeled percentage in (0, 100].
    fold: integer seed of the split (Soft Teacher uses folds 1..5).
    source: file name for error messages.

  Returns:
    (labeled dict, unlabeled dict): the same top-level keys as `data`, images partitioned,
    annotations following their image.
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
  num_labeled = int(percent / 100.0 * len(images))
  chosen = np.random.RandomState(fold).choice(len(images), size=num_labeled, replace=False)
  is_labeled = np.zeros(len(images), bool)
  is_labeled[chosen] = True
  labeled_ids = {image_ids[i] for i in np.flatnonzero(is_labeled)}
  known_ids = set(image_ids)
  for j, ann in enumerate(data["annotations"]):
    if not isinstance(ann, dict) or ann.get("image_id") not in known_ids:
      raise SplitError(f"{source}: annotations[{j}] has a missing or unknown 'image_id'")

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


def write_split(ann_file, percent, fold, out_dir):
  """Reads `ann_file`, writes both parts into `out_dir`; returns their paths."""
  try:
    with open(ann_file) as f:
      data = json.load(f)
  except OSError as e:
    raise SplitError(f"{ann_file}: cannot read: {e.strerror}") from None
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise SplitError(f"{ann_file}: malformed JSON: {e}") from None
  labeled, unlabeled = split_coco(data, percent, fold, source=ann_file)
  os.makedirs(out_dir, exist_ok=True)
  paths = split_paths(ann_file, percent, fold, out_dir)
  for path, part in zip(paths, (labeled, unlabeled)):
    with open(path, "w") as f:
      json.dump(part, f)
  return paths


def main(argv=None):
  parser = argparse.ArgumentParser(description="COCO-partial split (Soft Teacher format)")
  parser.add_argument("--ann", required=True, help="COCO instances json to split")
  parser.add_argument("--percent", type=float, required=True, help="labeled percent, e.g. 10")
  parser.add_argument("--fold", type=int, required=True, help="fold = random seed, e.g. 1..5")
  parser.add_argument("--out", required=True, help="output folder")
  args = parser.parse_args(argv)
  try:
    labeled, unlabeled = write_split(args.ann, args.percent, args.fold, args.out)
  except (SplitError, OSError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  print(f"wrote {labeled} and {unlabeled}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
