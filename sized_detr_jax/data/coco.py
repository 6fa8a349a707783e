"""COCO detection sources: an instances json + image folder, or TFDS `coco/2017`.

Both sources are random-access (`len(source)`, `source[i]`, usable as a grain data source) and
return the same example dict:

  image      uint8 [H, W, 3] RGB (grayscale, RGBA, palette... converted)
  image_id   int64 scalar, the COCO image id
  boxes      float32 [N, 4] absolute (x0, y0, x1, y1) pixels, clipped to the image, non-degenerate
  labels     int32 [N] contiguous class ids 0..C-1 (`source.category_ids[label]` = COCO id)
  iscrowd    bool [N]; crowd boxes are kept here (evaluation needs them) and dropped from the
             training targets by the pipeline
  orig_size  int32 [2] (h, w)

Validation of the json happens once, at load time, and every error is a `CocoFormatError` naming
the file, the record and the offending value. Boxes with zero or negative size, and boxes that
are degenerate after clipping to the image, are dropped and counted in `CocoIndex.stats` (logged
once); boxes sticking out of the image are clipped and counted. Images without boxes are kept.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os

from absl import logging
import numpy as np
from PIL import Image

from sized_detr_jax import fs

# The 80 COCO category ids in order; TFDS coco/2017 label i is category COCO_CATEGORY_IDS[i].
COCO_CATEGORY_IDS = np.array(
    [*range(1, 12), *range(13, 26), 27, 28, *range(31, 45), *range(46, 66), 67, 70,
     *range(72, 83), *range(84, 91)], np.int64)


class CocoFormatError(ValueError):
  """Malformed COCO annotations or image files; the message names file, record and value."""


@dataclasses.dataclass(frozen=True)
class CocoIndex:
  """A validated COCO annotation file, grouped per image.

  Attributes:
    ann_file: the json path.
    image_dir: folder the images' file_name are relative to.
    image_ids: int64 [N] COCO image ids, in file order.
    file_names: N file names.
    sizes: int32 [N, 2] (h, w) from the json.
    boxes: N arrays float32 [n_i, 4], absolute (x0, y0, x1, y1), clipped, non-degenerate.
    labels: N arrays int32 [n_i], contiguous labels.
    iscrowd: N arrays bool [n_i].
    category_ids: int64 [C], sorted COCO category ids; index = contiguous label.
    category_names: C names, same order.
    stats: counts of what validation changed (clipped / dropped boxes, crowd boxes, ...).
  """
  ann_file: str
  image_dir: str
  image_ids: np.ndarray
  file_names: list
  sizes: np.ndarray
  boxes: list
  labels: list
  iscrowd: list
  category_ids: np.ndarray
  category_names: list
  stats: dict


def _read_json(ann_file):
  try:
    with fs.path(ann_file).open() as f:
      return json.load(f)
  except OSError as e:
    raise CocoFormatError(f"{ann_file}: cannot read annotation file: "
                          f"{e.strerror or e}") from None
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise CocoFormatError(f"{ann_file}: malformed JSON: {e}") from None


def _record(ann_file, section, i, rec, keys, kinds):
  """Checks that records[i] is a dict holding `keys` of types `kinds`; returns their values."""
  if not isinstance(rec, dict):
    raise CocoFormatError(f"{ann_file}: {section}[{i}] is not an object: {rec!r:.80}")
  name = f"{ann_file}: {section}[{i}] (id={rec.get('id')!r})"
  values = []
  for key, kind in zip(keys, kinds):
    if key not in rec:
      raise CocoFormatError(f"{name}: missing key '{key}'")
    value = rec[key]
    if not isinstance(value, kind) or isinstance(value, bool):
      raise CocoFormatError(f"{name}: '{key}' has invalid value {value!r:.80}")
    values.append(value)
  return name, values


def clip_boxes_xyxy(boxes, height, width):
  """Clips absolute xyxy boxes to the image and flags the non-degenerate ones.

  Args:
    boxes: float [N, 4] absolute (x0, y0, x1, y1) pixels.
    height, width: image size in pixels.

  Returns:
    (clipped boxes float32 [N, 4], keep bool [N] = positive width and height after clipping,
    changed bool [N] = clipping moved a coordinate).
  """
  boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
  clipped = np.clip(boxes, 0.0, np.array([width, height, width, height], np.float32))
  keep = (clipped[:, 2] > clipped[:, 0]) & (clipped[:, 3] > clipped[:, 1])
  return clipped, keep, np.any(clipped != boxes, axis=1)


def load_coco_index(ann_file, image_dir, *, require_annotations=True, check_files=True):
  """Reads and validates a COCO instances json.

  Args:
    ann_file: path of the json (instances_*.json, a COCO-partial split, or
      image_info_unlabeled2017.json with require_annotations=False).
    image_dir: folder holding the images named by `file_name`.
    require_annotations: if False, missing "annotations" / "categories" lists mean no boxes
      (unlabeled data).
    check_files: check at load time that every image file exists.

  Returns:
    CocoIndex.

  Raises:
    CocoFormatError: malformed json, missing keys or wrong types, duplicate ids, annotations
      pointing at unknown images or categories, non-finite boxes, missing image files.
  """
  data = _read_json(ann_file)
  if not isinstance(data, dict):
    raise CocoFormatError(f"{ann_file}: top level must be an object, got {type(data).__name__}")
  # Unlabeled files (image_info_unlabeled2017.json) may lack annotations and categories.
  sections = ("images",) + (("categories", "annotations") if require_annotations else ())
  for key in sections:
    if not isinstance(data.get(key), list):
      raise CocoFormatError(f"{ann_file}: missing or non-list top-level key '{key}'")
  for key in ("categories", "annotations"):
    if not isinstance(data.get(key, []), list):
      raise CocoFormatError(f"{ann_file}: '{key}' must be a list")
  annotations = data.get("annotations", [])

  categories = {}
  for i, cat in enumerate(data.get("categories", [])):
    name, (cid, cname) = _record(ann_file, "categories", i, cat, ("id", "name"), (int, str))
    if cid in categories:
      raise CocoFormatError(f"{name}: duplicate category id {cid}")
    categories[cid] = cname
  category_ids = np.array(sorted(categories), np.int64)
  cat_to_label = {int(c): i for i, c in enumerate(category_ids)}

  image_index, file_names, sizes = {}, [], []
  for i, im in enumerate(data["images"]):
    name, (iid, fname, h, w) = _record(ann_file, "images", i, im,
                                       ("id", "file_name", "height", "width"),
                                       (int, str, int, int))
    if iid in image_index:
      raise CocoFormatError(f"{name}: duplicate image id {iid}")
    if h <= 0 or w <= 0:
      raise CocoFormatError(f"{name}: non-positive image size height={h} width={w}")
    image_index[iid] = len(file_names)
    file_names.append(fname)
    sizes.append((h, w))
  num_images = len(file_names)

  stats = dict(images=num_images, annotations=len(annotations), boxes=0, crowd_boxes=0,
               nonpositive_size_dropped=0, clipped=0, outside_dropped=0, images_without_boxes=0,
               area_missing=0, iscrowd_missing=0)
  per_image = [[] for _ in range(num_images)]
  for j, ann in enumerate(annotations):
    name, (_, iid, cid, bbox) = _record(ann_file, "annotations", j, ann,
                                        ("id", "image_id", "category_id", "bbox"),
                                        (int, int, int, list))
    if iid not in image_index:
      raise CocoFormatError(f"{name}: image_id {iid} is not in 'images'")
    if cid not in cat_to_label:
      raise CocoFormatError(f"{name}: category_id {cid} is not in 'categories'")
    if len(bbox) != 4 or not all(
        isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
        for v in bbox):
      raise CocoFormatError(f"{name}: bbox must be 4 finite numbers [x, y, w, h], got {bbox!r}")
    stats["area_missing"] += "area" not in ann
    stats["iscrowd_missing"] += "iscrowd" not in ann
    crowd = ann.get("iscrowd", 0)
    if crowd not in (0, 1):
      raise CocoFormatError(f"{name}: iscrowd must be 0 or 1, got {crowd!r}")
    per_image[image_index[iid]].append((*bbox, cat_to_label[cid], crowd))

  boxes, labels, iscrowd = [], [], []
  for k in range(num_images):
    rows = np.array(per_image[k], np.float64).reshape(-1, 6)
    x, y, w, h = rows[:, 0], rows[:, 1], rows[:, 2], rows[:, 3]
    positive = (w > 0) & (h > 0)  # zero/negative size: dropped (DETR's ConvertCocoPolysToMask)
    stats["nonpositive_size_dropped"] += int((~positive).sum())
    xyxy = np.stack([x, y, x + w, y + h], axis=1)[positive]
    clipped, keep, changed = clip_boxes_xyxy(xyxy, *sizes[k])
    stats["clipped"] += int((changed & keep).sum())
    stats["outside_dropped"] += int((~keep).sum())
    boxes.append(clipped[keep])
    labels.append(rows[positive, 4][keep].astype(np.int32))
    iscrowd.append(rows[positive, 5][keep].astype(bool))
    stats["boxes"] += int(keep.sum())
    stats["crowd_boxes"] += int(iscrowd[-1].sum())
    stats["images_without_boxes"] += int(not keep.any())

  if check_files:
    missing = [(f, i) for f, i in zip(file_names, image_index)
               if not os.path.isfile(os.path.join(image_dir, f))]
    if missing:
      raise CocoFormatError(
          f"{ann_file}: {len(missing)} image file(s) missing under {image_dir}, first: "
          f"{missing[0][0]!r} (image id {missing[0][1]})")
  logging.info("%s: %s", ann_file, stats)
  return CocoIndex(ann_file=ann_file, image_dir=image_dir,
                   image_ids=np.array(list(image_index), np.int64), file_names=file_names,
                   sizes=np.array(sizes, np.int32).reshape(-1, 2), boxes=boxes, labels=labels,
                   iscrowd=iscrowd, category_ids=category_ids,
                   category_names=[categories[int(c)] for c in category_ids], stats=stats)


def _high_bit_depth_to_uint8(pil):
  """uint8 [H, W] of a 16-bit / 32-bit integer or float single-channel PIL image, or None for
  other modes (which `convert("RGB")` handles; for these it clips every value above 255).

  I;16*: 16-bit data, reduced by keeping the high byte (v >> 8), as Pillow's and libpng's
    decoders do for 16-bit colour PNGs, so a 16-bit scene gives the same 8-bit values whether
    it is stored as grayscale or colour (v / 257 would differ from those by up to 1).
  I, F: no bit depth is recorded, so the smallest standard range holding every pixel is taken
    as full scale: [0, 1] (F only: float images in [0, 1]) -> x 255 rounded; [0, 255] -> as is
    (rounded); otherwise 16-bit [0, 65535] -> >> 8 (values outside are clipped). NaN -> 0.
  """
  mode = pil.mode
  if mode.startswith("I;16"):
    return (np.asarray(pil).astype(np.uint32) >> 8).astype(np.uint8)
  if mode not in ("I", "F"):
    return None
  values = np.nan_to_num(np.asarray(pil, np.float64), nan=0.0, posinf=65535.0, neginf=0.0)
  values = np.clip(values, 0.0, 65535.0)
  top = values.max(initial=0.0)
  if mode == "F" and top <= 1.0:
    return np.round(values * 255.0).astype(np.uint8)
  if top <= 255.0:
    return np.round(values).astype(np.uint8)
  return (np.round(values).astype(np.uint32) >> 8).astype(np.uint8)


def pil_to_rgb(pil):
  """uint8 RGB [H, W, 3] of a loaded PIL image of any mode (see `decode_image`)."""
  gray = _high_bit_depth_to_uint8(pil)
  return (np.repeat(gray[..., None], 3, axis=-1) if gray is not None
          else np.asarray(pil.convert("RGB")))


def decode_image(path, image_id=None, expected_size=None):
  """Decodes an image file to uint8 RGB [H, W, 3].

  The one image decoder of training, evaluation and prediction (CocoSource, ImageFilesSource).
  Grayscale, palette, RGBA, CMYK... are converted by Pillow; 16-bit and 32-bit single-channel
  images (modes I;16, I, F) are scaled to 8 bits by `_high_bit_depth_to_uint8` (Pillow's
  convert would clip them to white).

  Args:
    path: image file.
    image_id: for error messages.
    expected_size: (h, w) the annotations were made for, checked if given.

  Raises:
    CocoFormatError: missing, unreadable or corrupt file, or a size different from the json's.
  """
  try:
    with Image.open(path) as pil:
      pil.load()
      image = pil_to_rgb(pil)
  except (OSError, SyntaxError, ValueError) as e:
    which = f" (id {image_id})" if image_id is not None else ""
    raise CocoFormatError(f"{path}: cannot decode image{which}: {e}") from None
  if expected_size is not None and tuple(image.shape[:2]) != tuple(expected_size):
    raise CocoFormatError(f"{path}: image (id {image_id}) is {image.shape[0]}x{image.shape[1]} "
                          f"(h x w) but the annotations say {expected_size[0]}x"
                          f"{expected_size[1]}")
  return image


def write_filled_gt_json(ann_file, path):
  """Copy of a COCO json with the annotation fields pycocotools' COCOeval reads filled in.

  COCOeval reads every annotation's "area" (size ranges) and "iscrowd" (ignore flag) and raises
  KeyError when one lacks them. Missing "area" becomes the bbox area w * h (as detectron2 does
  for annotations without segmentation), missing "iscrowd" 0 (the loader's default). Nothing
  else changes. Written to a temporary name and renamed, so readers never see half a file.

  Returns:
    `path`.
  """
  data = _read_json(ann_file)
  for ann in data.get("annotations", []):
    if "area" not in ann:
      _, _, w, h = ann["bbox"]
      ann["area"] = float(w) * float(h)
    ann.setdefault("iscrowd", 0)
  fs.write_text_atomic(path, json.dumps(data))
  return path


class CocoSource:
  """Random-access source over a validated COCO json (grain RandomAccessDataSource protocol).

  `gt_json` is the json itself for pycocotools, or None when some annotation lacks "area" or
  "iscrowd" (COCOeval would raise KeyError after training): then `write_gt_json` writes a
  filled copy (`write_filled_gt_json`) and `gt_cache_name` names it per file version.
  """

  def __init__(self, ann_file, image_dir, *, require_annotations=True, check_files=True):
    self.index = load_coco_index(ann_file, image_dir, require_annotations=require_annotations,
                           check_files=check_files)
    self.category_ids = self.index.category_ids
    self.category_names = self.index.category_names
    self.image_ids = self.index.image_ids
    stats = self.index.stats
    self.gt_json = None if stats["area_missing"] or stats["iscrowd_missing"] else ann_file
    if self.gt_json is None:
      logging.warning("%s: %d annotation(s) lack 'area', %d lack 'iscrowd'; evaluation uses a "
                      "copy with area = w * h and iscrowd = 0.", ann_file, stats["area_missing"],
                      stats["iscrowd_missing"])

  def gt_cache_name(self):
    """File name of the filled ground truth: the json's name plus its version (mtime, size)."""
    st = os.stat(self.index.ann_file)
    stem = os.path.splitext(os.path.basename(self.index.ann_file))[0]
    return f"{stem}-{st.st_mtime_ns:x}-{st.st_size:x}-filled-gt.json"

  def write_gt_json(self, path):
    return write_filled_gt_json(self.index.ann_file, path)

  def __len__(self):
    return len(self.index.file_names)

  def image_sizes(self):
    """int32 [N, 2] (h, w) of every image, known without decoding."""
    return self.index.sizes

  def __getitem__(self, i):
    idx = self.index
    path = os.path.join(idx.image_dir, idx.file_names[i])
    image = decode_image(path, int(idx.image_ids[i]), idx.sizes[i])
    return {"image": image, "image_id": np.int64(idx.image_ids[i]), "boxes": idx.boxes[i],
            "labels": idx.labels[i], "iscrowd": idx.iscrowd[i],
            "orig_size": idx.sizes[i].astype(np.int32)}


class TfdsCocoSource:
  """Random-access source over TFDS `coco/2017` (needs tensorflow to build the dataset info).

  TFDS stores boxes as normalised (ymin, xmin, ymax, xmax) and labels as 0..79 in the order of
  COCO_CATEGORY_IDS; both are converted to the example dict of CocoSource.
  """

  def __init__(self, split, *, name="coco/2017", data_dir=None):
    import tensorflow_datasets as tfds  # only this source needs it
    self._split = f"{name}:{split}"
    try:
      self._ds = tfds.data_source(name, split=split, data_dir=data_dir)
      names = tfds.builder(name, data_dir=data_dir).info.features["objects"]["label"].names
    except NotImplementedError as e:  # a build in a format without random access (TFRecord)
      where = data_dir or "~/tensorflow_datasets"
      raise CocoFormatError(
          f"tfds {name} in {where} is stored in a format tfds.data_source cannot read at random "
          f"(TFRecord; it needs ArrayRecord): rebuild it with `tfds build {name} "
          f"--data_dir={where} --file_format=array_record` (or set data.tfds_data_dir to an "
          "ArrayRecord build)") from e
    except Exception as e:  # tfds raises many types; all mean the same to the user
      raise CocoFormatError(f"tfds {self._split} (data_dir={data_dir}): cannot open: {e}") from e
    if len(names) != len(COCO_CATEGORY_IDS):
      raise CocoFormatError(f"tfds {self._split}: expected 80 labels, found {len(names)}")
    self.category_ids = COCO_CATEGORY_IDS
    self.category_names = list(names)
    self.gt_json = None  # build one with write_gt_json for pycocotools

  def __len__(self):
    return len(self._ds)

  def image_sizes(self):
    return None  # unknown without decoding every image

  def __getitem__(self, i):
    ex = self._ds[i]
    image = np.asarray(ex["image"], np.uint8)
    if image.ndim == 2 or image.shape[-1] == 1:
      image = np.repeat(image.reshape(*image.shape[:2], 1), 3, axis=-1)
    h, w = image.shape[:2]
    obj = ex["objects"]
    bbox = np.asarray(obj["bbox"], np.float32).reshape(-1, 4)
    labels = np.asarray(obj["label"], np.int64).reshape(-1)
    crowd = np.asarray(obj["is_crowd"], bool).reshape(-1)
    image_id = int(ex["image/id"])
    if not len(bbox) == len(labels) == len(crowd):
      raise CocoFormatError(f"tfds {self._split}[{i}] (image id {image_id}): objects have "
                            f"{len(bbox)} boxes, {len(labels)} labels, {len(crowd)} is_crowd")
    if ((labels < 0) | (labels >= len(COCO_CATEGORY_IDS))).any():
      raise CocoFormatError(f"tfds {self._split}[{i}] (image id {image_id}): label out of "
                            f"range: {labels.tolist()}")
    xyxy = bbox[:, [1, 0, 3, 2]] * np.array([w, h, w, h], np.float32)
    clipped, keep, _ = clip_boxes_xyxy(xyxy, h, w)
    return {"image": image, "image_id": np.int64(image_id), "boxes": clipped[keep],
            "labels": labels[keep].astype(np.int32), "iscrowd": crowd[keep],
            "orig_size": np.array([h, w], np.int32)}

  def write_gt_json(self, path):
    """Writes a COCO ground-truth json of this split for pycocotools; returns `path`.

    Areas are box areas, not the segmentation areas of the official json, which moves a few
    boxes between the small / medium / large buckets: prefer the official instances json for
    reported numbers.
    """
    images, anns = [], []
    for i in range(len(self)):
      ex = self[i]
      h, w = (int(v) for v in ex["orig_size"])
      images.append({"id": int(ex["image_id"]), "height": h, "width": w,
                     "file_name": f"{int(ex['image_id']):012d}.jpg"})
      for box, label, crowd in zip(ex["boxes"].tolist(), ex["labels"].tolist(),
                                   ex["iscrowd"].tolist()):
        bw, bh = box[2] - box[0], box[3] - box[1]
        anns.append({"id": len(anns) + 1, "image_id": int(ex["image_id"]),
                     "category_id": int(self.category_ids[label]),
                     "bbox": [box[0], box[1], bw, bh], "area": bw * bh, "iscrowd": int(crowd)})
    cats = [{"id": int(c), "name": n} for c, n in zip(self.category_ids, self.category_names)]
    fs.write_text_atomic(path, json.dumps({"images": images, "annotations": anns,
                                           "categories": cats}))
    return path


def labels_to_category_ids(labels, category_ids):
  """Maps contiguous labels (int [...]) to COCO category ids via `category_ids` [C]."""
  return np.asarray(category_ids)[np.asarray(labels)]


def category_ids_to_labels(cat_ids, category_ids):
  """Maps COCO category ids (int [...]) to contiguous labels; unknown ids raise ValueError."""
  lookup = {int(c): i for i, c in enumerate(np.asarray(category_ids))}
  try:
    return np.vectorize(lookup.__getitem__, otypes=[np.int32])(np.asarray(cat_ids))
  except KeyError as e:
    raise ValueError(f"unknown category id {e.args[0]}; known: {sorted(lookup)}") from None
