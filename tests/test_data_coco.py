"""Tests of the COCO json reader's validation, the category maps and the TFDS source."""
import copy
import json
import os

import numpy as np
import pytest
from PIL import Image

from sized_detr_jax.data import coco


def _base():
  """A valid 3-image COCO json (as a dict) with non-contiguous category ids."""
  return {
      "images": [{"id": 10, "file_name": "a.png", "height": 20, "width": 30},
                 {"id": 11, "file_name": "b.png", "height": 16, "width": 16},
                 {"id": 12, "file_name": "c.png", "height": 16, "width": 16}],
      "categories": [{"id": 9, "name": "nine"}, {"id": 2, "name": "two"},
                     {"id": 5, "name": "five"}],
      "annotations": [
          {"id": 1, "image_id": 10, "category_id": 9, "bbox": [1.0, 2.0, 5.0, 4.0]},
          {"id": 2, "image_id": 10, "category_id": 2, "bbox": [25.0, 15.0, 10.0, 10.0]},
          {"id": 3, "image_id": 10, "category_id": 5, "bbox": [3, 3, 0, 4]},
          {"id": 4, "image_id": 10, "category_id": 5, "bbox": [3, 3, 4, -1]},
          {"id": 5, "image_id": 10, "category_id": 5, "bbox": [40, 3, 4, 4]},
          {"id": 6, "image_id": 10, "category_id": 2, "bbox": [2, 2, 6, 6], "iscrowd": 1},
          {"id": 7, "image_id": 11, "category_id": 5, "bbox": [-3, 4, 5, 6]},
      ],
  }


def _write(tmp_path, data, images=True, name="ann.json"):
  img_dir = tmp_path / "img"
  img_dir.mkdir(exist_ok=True)
  if images:
    for im in data["images"]:
      Image.new("RGB", (im["width"], im["height"]), (10, 20, 30)).save(img_dir / im["file_name"])
  path = tmp_path / name
  path.write_text(json.dumps(data) if not isinstance(data, str) else data)
  return str(path), str(img_dir)


def test_valid_file_boxes_counts_and_category_map(tmp_path):
  src = coco.CocoSource(*_write(tmp_path, _base()))
  idx = src.index
  # Sorted category ids 2, 5, 9 -> labels 0, 1, 2.
  np.testing.assert_array_equal(src.category_ids, [2, 5, 9])
  assert src.category_names == ["two", "five", "nine"]
  # Image 10: box 1 kept as is; box 2 clipped to the 30x20 image; 3 (w=0), 4 (h<0) dropped as
  # non-positive; 5 lies right of the image and is dropped after clipping; 6 is crowd, kept.
  np.testing.assert_allclose(idx.boxes[0], [[1, 2, 6, 6], [25, 15, 30, 20], [2, 2, 8, 8]])
  np.testing.assert_array_equal(idx.labels[0], [2, 0, 0])
  np.testing.assert_array_equal(idx.iscrowd[0], [False, False, True])
  np.testing.assert_allclose(idx.boxes[1], [[0, 4, 2, 10]])  # x clipped at 0
  assert idx.boxes[2].shape == (0, 4)  # image without boxes kept
  assert len(src) == 3
  assert idx.stats == dict(images=3, annotations=7, boxes=4, crowd_boxes=1,
                           nonpositive_size_dropped=2, clipped=2, outside_dropped=1,
                           images_without_boxes=1, area_missing=7, iscrowd_missing=6)
  assert src.gt_json is None  # pycocotools needs area/iscrowd: evaluation writes a filled copy
  ex = src[0]
  assert set(ex) == {"image", "image_id", "boxes", "labels", "iscrowd", "orig_size"}
  assert ex["image"].shape == (20, 30, 3) and ex["image"].dtype == np.uint8
  assert ex["image_id"] == 10
  np.testing.assert_array_equal(ex["orig_size"], [20, 30])
  assert ex["boxes"].dtype == np.float32 and ex["labels"].dtype == np.int32
  np.testing.assert_array_equal(coco.labels_to_category_ids([2, 0, 1], src.category_ids),
                                [9, 2, 5])
  np.testing.assert_array_equal(coco.category_ids_to_labels([9, 2, 5], src.category_ids),
                                [2, 0, 1])
  with pytest.raises(ValueError, match="unknown category id 7"):
    coco.category_ids_to_labels([7], src.category_ids)


def _mutated(fn):
  data = _base()
  fn(data)
  return data


@pytest.mark.parametrize("data, pattern", [
    ("{not json", r"ann\.json: malformed JSON"),
    ("[]", r"ann\.json: top level must be an object"),
    (_mutated(lambda d: d.pop("images")), r"ann\.json: missing or non-list top-level key 'images'"),
    (_mutated(lambda d: d["images"][1].pop("file_name")),
     r"ann\.json: images\[1\] \(id=11\): missing key 'file_name'"),
    (_mutated(lambda d: d["images"][0].update(height="20")),
     r"images\[0\] \(id=10\): 'height' has invalid value '20'"),
    (_mutated(lambda d: d["images"].append(dict(d["images"][0]))),
     r"images\[3\] \(id=10\): duplicate image id 10"),
    (_mutated(lambda d: d["categories"][0].pop("id")), r"categories\[0\] .*missing key 'id'"),
    (_mutated(lambda d: d["annotations"][2].pop("bbox")),
     r"annotations\[2\] \(id=3\): missing key 'bbox'"),
    (_mutated(lambda d: d["annotations"][1].update(image_id=99)),
     r"annotations\[1\] \(id=2\): image_id 99 is not in 'images'"),
    (_mutated(lambda d: d["annotations"][0].update(category_id=3)),
     r"annotations\[0\] \(id=1\): category_id 3 is not in 'categories'"),
    (_mutated(lambda d: d["annotations"][0].update(bbox=[1, 2, 3])),
     r"annotations\[0\] \(id=1\): bbox must be 4 finite numbers .*\[1, 2, 3\]"),
    (_mutated(lambda d: d["annotations"][0].update(bbox=[1, 2, float("nan"), 3])),
     r"annotations\[0\] \(id=1\): bbox must be 4 finite numbers"),
    (_mutated(lambda d: d["annotations"][0].update(iscrowd=2)),
     r"annotations\[0\] \(id=1\): iscrowd must be 0 or 1, got 2"),
])
def test_malformed_annotations_raise_named_errors(tmp_path, data, pattern):
  path, img_dir = _write(tmp_path, data, images=False)
  with pytest.raises(coco.CocoFormatError, match=pattern):
    coco.load_coco_index(path, img_dir, check_files=False)


def test_unreadable_annotation_file(tmp_path):
  with pytest.raises(coco.CocoFormatError, match=r"nope\.json: cannot read"):
    coco.load_coco_index(str(tmp_path / "nope.json"), str(tmp_path))


def test_missing_annotations_allowed_only_for_unlabeled(tmp_path):
  data = _mutated(lambda d: d.pop("annotations"))
  path, img_dir = _write(tmp_path, data)
  with pytest.raises(coco.CocoFormatError, match="'annotations'"):
    coco.load_coco_index(path, img_dir)
  idx = coco.load_coco_index(path, img_dir, require_annotations=False)
  assert [b.shape for b in idx.boxes] == [(0, 4)] * 3
  data.pop("categories")
  path, img_dir = _write(tmp_path, data, name="unlabeled.json")
  assert len(coco.load_coco_index(path, img_dir, require_annotations=False).category_ids) == 0
  with pytest.raises(coco.CocoFormatError, match="'categories'"):
    coco.load_coco_index(path, img_dir)


def test_image_file_errors_and_mode_conversion(tmp_path):
  path, img_dir = _write(tmp_path, _base())
  os.remove(os.path.join(img_dir, "b.png"))
  with pytest.raises(coco.CocoFormatError, match=r"1 image file\(s\) missing .*'b.png' \(image id 11\)"):
    coco.load_coco_index(path, img_dir)
  # Corrupt file: named with its image id at decode time.
  with open(os.path.join(img_dir, "b.png"), "wb") as f:
    f.write(b"\x89PNG\r\n\x1a\n garbage")
  src = coco.CocoSource(path, img_dir)
  with pytest.raises(coco.CocoFormatError, match=r"b\.png: cannot decode image \(id 11\)"):
    src[1]
  # Size different from the json.
  Image.new("RGB", (17, 16)).save(os.path.join(img_dir, "b.png"))
  with pytest.raises(coco.CocoFormatError, match=r"b\.png: image \(id 11\) is 16x17 .* 16x16"):
    src[1]
  # Grayscale and RGBA are converted to RGB.
  gray = np.arange(256, dtype=np.uint8).reshape(16, 16)
  Image.fromarray(gray, "L").save(os.path.join(img_dir, "b.png"))
  rgba = np.random.default_rng(0).integers(0, 256, (16, 16, 4), dtype=np.uint8)
  Image.fromarray(rgba, "RGBA").save(os.path.join(img_dir, "c.png"))
  np.testing.assert_array_equal(src[1]["image"], np.repeat(gray[..., None], 3, axis=-1))
  np.testing.assert_array_equal(src[2]["image"], rgba[..., :3])


def _tfds_examples():
  img = np.zeros((20, 30, 3), np.uint8)
  img[5, 7] = (1, 2, 3)
  return [{
      "image": img, "image/id": 42, "image/filename": "x.jpg",
      "objects": {
          # (ymin, xmin, ymax, xmax) normalised; the second sticks out, the third is empty.
          "bbox": np.array([[0.1, 0.2, 0.5, 0.6], [0.5, 0.5, 1.2, 0.9], [0.3, 0.3, 0.3, 0.4]],
                           np.float32),
          "label": np.array([0, 79, 3]), "is_crowd": np.array([False, True, False]),
          "area": np.array([1, 2, 3]), "id": np.array([1, 2, 3])},
  }]


@pytest.mark.slow
def test_tfds_source_with_mock_data(tmp_path):
  pytest.importorskip("tensorflow")
  import tensorflow_datasets as tfds
  with tfds.testing.mock_data(
      as_data_source_fn=lambda *args, **kwargs: _tfds_examples()):
    src = coco.TfdsCocoSource("validation")
    assert len(src) == 1
    ex = src[0]
    assert ex["image_id"] == 42 and ex["image"][5, 7].tolist() == [1, 2, 3]
    np.testing.assert_array_equal(ex["orig_size"], [20, 30])
    # xyxy = (xmin*30, ymin*20, xmax*30, ymax*20), clipped to the image, empty box dropped.
    np.testing.assert_allclose(ex["boxes"], [[6, 2, 18, 10], [15, 10, 27, 20]], rtol=1e-6)
    np.testing.assert_array_equal(ex["labels"], [0, 79])
    np.testing.assert_array_equal(ex["iscrowd"], [False, True])
    assert set(ex) == {"image", "image_id", "boxes", "labels", "iscrowd", "orig_size"}
    np.testing.assert_array_equal(coco.labels_to_category_ids(ex["labels"], src.category_ids),
                                  [1, 90])
    gt = json.load(open(src.write_gt_json(str(tmp_path / "gt.json"))))
    assert [a["category_id"] for a in gt["annotations"]] == [1, 90]
    np.testing.assert_allclose(gt["annotations"][0]["bbox"], [6, 2, 12, 8], rtol=1e-6)
  # The default random mock gives ragged object fields: a named error, not silent truncation.
  with tfds.testing.mock_data(num_examples=2):
    src = coco.TfdsCocoSource("train")
    with pytest.raises(coco.CocoFormatError, match=r"tfds coco/2017:train\[0\] .*boxes"):
      src[0]


def test_coco_category_ids_table():
  ids = coco.COCO_CATEGORY_IDS
  assert len(ids) == 80 and len(set(ids.tolist())) == 80 and ids[0] == 1 and ids[-1] == 90
  assert not {12, 26, 29, 30, 45, 66, 68, 69, 71, 83} & set(ids.tolist())



@pytest.mark.slow
def test_tfds_tfrecord_build_is_refused_with_the_rebuild_command(tmp_path):
  """tfds.data_source reads ArrayRecord builds only; for a TFRecord build it raises
  NotImplementedError (mocked here as tfds raises it): one line with the rebuild command."""
  pytest.importorskip("tensorflow")
  import tensorflow_datasets as tfds

  def tfrecord_build(*args, **kwargs):
    raise NotImplementedError("Random access data source for file format tfrecord is not "
                              "supported.\n\t* ...")

  with tfds.testing.mock_data(as_data_source_fn=tfrecord_build):
    with pytest.raises(coco.CocoFormatError) as e:
      coco.TfdsCocoSource("train", data_dir=str(tmp_path))
  message = str(e.value)
  assert "\n" not in message
  assert (f"`tfds build coco/2017 --data_dir={tmp_path} --file_format=array_record`"
          in message)
