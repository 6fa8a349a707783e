"""Tests of the COCO-partial split CLI: exact partition, counts, determinism, errors."""
import json
import os
import re
import subprocess
import sys

import pytest

from sized_detr_jax.data import coco_partial


def _coco(n=203):
  return {"info": {"year": 2017}, "licenses": [{"id": 1}],
          "categories": [{"id": 1, "name": "a"}],
          "images": [{"id": 1000 + i, "file_name": f"{i}.jpg", "height": 8, "width": 8}
                     for i in range(n)],
          "annotations": [{"id": k, "image_id": 1000 + (k * 7) % n, "category_id": 1,
                           "bbox": [0, 0, 2, 2]} for k in range(3 * n)]}


@pytest.fixture(scope="module")
def ann_file(tmp_path_factory):
  path = tmp_path_factory.mktemp("ann") / "instances_train2017.json"
  path.write_text(json.dumps(_coco()))
  return str(path)


@pytest.mark.parametrize("percent", [1, 5, 10, 50])
def test_exact_partition_and_count(ann_file, tmp_path, percent):
  lab_path, unl_path = coco_partial.write_split(ann_file, percent, 1, str(tmp_path))
  assert os.path.basename(lab_path) == f"instances_train2017.1@{percent}.json"
  assert os.path.basename(unl_path) == f"instances_train2017.1@{percent}-unlabeled.json"
  src = _coco()
  lab, unl = json.load(open(lab_path)), json.load(open(unl_path))
  lab_ids = [im["id"] for im in lab["images"]]
  unl_ids = [im["id"] for im in unl["images"]]
  assert len(lab_ids) == int(percent / 100 * 203)  # Soft Teacher's count
  assert not set(lab_ids) & set(unl_ids)
  assert sorted(lab_ids + unl_ids) == [im["id"] for im in src["images"]]
  assert lab_ids == sorted(lab_ids)  # input order kept
  for part, ids in ((lab, set(lab_ids)), (unl, set(unl_ids))):
    assert all(a["image_id"] in ids for a in part["annotations"])
    assert part["categories"] == src["categories"] and part["info"] == src["info"]
    assert part["licenses"] == src["licenses"]
  assert len(lab["annotations"]) + len(unl["annotations"]) == len(src["annotations"])


def test_deterministic_per_fold_and_folds_differ(ann_file, tmp_path):
  ids = {}
  for fold, sub in ((1, "a"), (1, "b"), (2, "c")):
    lab, _ = coco_partial.write_split(ann_file, 10, fold, str(tmp_path / sub))
    ids[sub] = [im["id"] for im in json.load(open(lab))["images"]]
  assert ids["a"] == ids["b"]
  assert ids["a"] != ids["c"]


@pytest.mark.parametrize("content, args, pattern", [
    ("{bad", [], r"bad\.json: malformed JSON"),
    ('{"images": []}', [], r"bad\.json: expected a COCO object"),
    ('{"images": [{"id": 1}], "annotations": [{"image_id": 2}]}', [],
     r"bad\.json: annotations\[0\] has a missing or unknown 'image_id'"),
    ('{"images": [{"id": 1}], "annotations": []}', ["--percent", "0"],
     r"bad\.json: --percent must be in \(0, 100\], got 0"),
    (None, [], r"missing\.json: cannot read"),
])
def test_cli_errors_one_line_no_traceback(tmp_path, content, args, pattern):
  name = "bad.json" if content is not None else "missing.json"
  if content is not None:
    (tmp_path / name).write_text(content)
  argv = ["--ann", str(tmp_path / name), "--percent", "10", "--fold", "1",
          "--out", str(tmp_path / "out")] + args
  proc = subprocess.run([sys.executable, "-m", "sized_detr_jax.data.coco_partial", *argv],
                        capture_output=True, text=True, check=False)
  assert proc.returncode != 0
  assert "Traceback" not in proc.stderr
  assert len(proc.stderr.strip().splitlines()) == 1
  assert re.search(pattern, proc.stderr), proc.stderr
