"""Static-shape, per-process-sharded, prefetched, exactly resumable input pipeline.

Batches (numpy, this process's share of the global batch; the trainer assembles global arrays
with `jax.make_array_from_process_local_data`):

  labeled / eval batch (`data/batch.py` reads it):
    image [b, H, W, 3] f32 ImageNet-normalised, zero in padding (uint8 RGB, zero in padding,
      with config.data.host_normalize=False; normalise with transforms.normalize_image_jax)
    pixel_mask [b, H, W] bool, True on real pixels
    boxes [b, G, 4] f32 normalised (cx, cy, w, h) relative to the unpadded view
    labels [b, G] i32 contiguous, valid [b, G] bool (G = max_boxes; crowd boxes excluded)
    image_id [b] i32 the COCO image id (eval: -1 marks padding examples added to fill the last
      batch). Absent with with_image_id=False: ids >= 2**31 (int64 on the host) do not fit the
      int32 device batch, so the trainer maps image_index back with `image_ids_of` instead.
    image_index [b] i32 the example's position in its source (-1: eval padding)
    orig_size [b, 2] i32 (h, w) of the original image, size [b, 2] i32 (h, w) of the view
  unlabeled batch: {"weak": view, "strong": view}, each view the keys above plus
    matrix [b, 3, 3] f32 mapping original-image pixels (x, y, 1) to view pixels; boxes map
    weak -> strong with transforms.map_boxes_between_views. boxes/labels/valid carry the
    source's annotations if it has any (diagnostics only; none for truly unlabeled data).

(H, W) is one of a few fixed buckets (`config.data.buckets`, or derived from the resize
settings), the smallest that holds every view of the *global* batch. Every process can compute
that without communication because view geometry is planned from the image sizes in the
annotations (transforms.Geometry); sources without known sizes (TFDS) use the largest bucket.

Order and randomness: the global example at position p = step * global_batch + slot is
`permutation(seed, epoch)[p % N]` with epoch = p // N; each process decodes only its slots
[process_index * b, (process_index + 1) * b), so over an epoch the processes read disjoint
shards that cover the data. Augmentation Generators are seeded from (seed, stream, step, global
slot), which includes the process index through the slot, and makes a batch independent of the
process count. A batch is therefore a pure function of its step: the iterator state is just the
next step (`get_state() -> {"step": int64}`), restored exactly with `set_state`.

Prefetch: grain's MapDataset over steps, turned into an iterator with a thread pool
(`num_threads` batches assembled in parallel, `prefetch` batches ahead).
"""
from __future__ import annotations

import functools
import os
import tempfile

from absl import logging
import grain
import ml_collections
from ml_collections import config_dict
import numpy as np

from sized_detr_jax import fs
from sized_detr_jax.data import coco
from sized_detr_jax.data import image_files
from sized_detr_jax.data import synthetic
from sized_detr_jax.data import transforms

# Streams keep the Generators of different uses independent for the same (seed, step, slot).
_LABELED, _UNLABELED, _GEOMETRY, _PHOTOMETRIC, _WEAK, _STRONG = range(6)


# DETR / DINO's resize recipe at size 800: training scales 480..800 in steps of 32 (0.6 x 800
# up to 800), longer side capped at 1333, evaluation at 800 / 1333, random crop: resize to
# 400 / 500 / 600 then crop a side in [384, 600]. `resolve_sizes` scales it to any `size`.
DETR_MAX_SIZE_RATIO = 1333 / 800
DETR_CROP_SCALE_FRACTIONS = (0.5, 0.625, 0.75)
DETR_CROP_SIZE_FRACTIONS = (0.48, 0.75)
# The fields `resolve_sizes` derives (None: follow data.size) and `check_sizes` cross-checks.
SIZE_FIELDS = ("size", "scales", "max_size", "eval_size", "eval_max_size", "crop_scales",
               "crop_size", "buckets")


def default_data_config():
  """config.data defaults: the embedded synthetic dataset at its native (~128-256 px) scale.

  Sizes: `size` is the one knob (the largest training shorter side); the other size fields
  left None follow it (`resolve_sizes`), explicit ones are kept and cross-checked
  (`check_sizes`). Here the scales are explicit and `size` follows them (256).
  """
  return ml_collections.ConfigDict(dict(
      source="synthetic",          # "synthetic" | "coco" | "tfds"
      # synthetic: generated under `root` on first use
      root="data_cache/synthetic", synthetic_num_images=512, synthetic_seed=0,
      synthetic_num_val=0, synthetic_num_unlabeled=0,  # 0: the generator's defaults
      synthetic_size_mix=(),  # (p_small, p_medium, p_large); (): the generator's default
      # coco: instances json + image folder per role ("" = unused)
      train_ann="", train_images="", val_ann="", val_images="",
      # unlabeled_images without unlabeled_ann: every image file in that folder, unannotated.
      unlabeled_ann="", unlabeled_images="",
      # > 0: train on a `labeled_percent` % split of train_ann (fold `split_fold`, as
      # COCO-partial) and use the rest unlabeled (config_lib.finalize writes the two jsons).
      labeled_percent=0.0, split_fold=1, split_dir="data_cache/splits",
      # tfds: coco/2017 splits (needs tensorflow); the unlabeled role may name another dataset
      tfds_name="coco/2017", tfds_data_dir="", tfds_train_split="train",
      tfds_val_split="validation", tfds_unlabeled_name="", tfds_unlabeled_split="",
      gt_cache_dir="",             # where the TFDS eval ground-truth json is written
      # batching (global sizes, divided over processes)
      batch_size=4, unlabeled_batch_size=4, eval_batch_size=4, max_boxes=32,
      # list of (h, w); None: derived from the sizes (resolve_sizes)
      buckets=config_dict.placeholder(tuple),
      pad_multiple=32, num_threads=2, prefetch=4,
      # False: `image` is uint8 (4x less host work and transfer); the trainer must apply
      # transforms.normalize_image_jax inside its jitted step. True: f32 per the contract.
      host_normalize=True,
      # Sizes (resolve_sizes): `size` = the largest training shorter side; None: max(scales).
      # Scales left None are `size` down to min_scale_fraction x size in steps of scale_step.
      size=config_dict.placeholder(int), scale_step=32, min_scale_fraction=0.6,
      # augmentation (transforms.AugmentConfig fields)
      scales=(192, 208, 224, 240, 256), max_size=384, random_crop=True,
      crop_scales=(160, 192, 224), crop_size=(128, 224), hflip_prob=0.5,
      eval_size=224, eval_max_size=384, labeled_color_op=False,
      strong_translate=0.1, strong_rotate=30.0, strong_shear=30.0, erase_patches=(1, 4),
      erase_max_size=0.2, blur_prob=0.0,
  ))


def follow_size(cfg, **explicit):
  """Sets the derived size fields of `cfg` to None (typed placeholders: still overridable on
  the command line), then `explicit`."""
  cfg.update(dict(scales=config_dict.placeholder(tuple), max_size=config_dict.placeholder(int),
                  eval_size=config_dict.placeholder(int),
                  eval_max_size=config_dict.placeholder(int),
                  crop_scales=config_dict.placeholder(tuple),
                  crop_size=config_dict.placeholder(tuple)))
  cfg.update(explicit)
  return cfg


def coco_data_config(**overrides):
  """config.data for COCO at DINO's settings (multi-scale 480-800, max 1333, 100 boxes).

  Only `size=800` is set; scales, max_size (1333), eval sizes, crop sizes and buckets follow it
  (`resolve_sizes`), so `--config.data.size=N` rescales all of them.
  """
  cfg = follow_size(default_data_config(), size=800)
  cfg.update(dict(source="coco", max_boxes=100, batch_size=16, eval_batch_size=16))
  cfg.update(overrides)
  return cfg


def _detr_scales(size, step, min_fraction):
  """Shorter sides from `size` down to `min_fraction * size` in steps of `step`, ascending."""
  lowest = size * min_fraction - 1e-6  # 0.6 * 800 = 480 exactly, despite float rounding
  scales = [size - k * step for k in range(size // step + 1) if size - k * step >= lowest]
  return tuple(s for s in reversed(scales) if s > 0)


def resolve_sizes(data_cfg):
  """The size fields of `data_cfg` with those left None derived (a dict of `SIZE_FIELDS`).

  Rules (DETR's, scaled to `size`; explicit values are kept as given):
    size: the largest training shorter side; None -> max(scales).
    scales: None -> `size` down to `min_scale_fraction` x size in steps of `scale_step`
      (DINO: 480..800 step 32 for 800).
    max_size: None -> round(size x 1333 / 800) (DINO: 1333 for 800).
    eval_size: None -> size. eval_max_size: None -> max_size.
    crop_scales: None -> size x (0.5, 0.625, 0.75); crop_size: None -> size x (0.48, 0.75).
    buckets: None -> derived from the sizes (`derive_buckets`).

  Raises:
    ValueError: neither `size` nor `scales` is set.
  """
  get = lambda k, default=None: data_cfg[k] if k in data_cfg else default
  size, scales = get("size"), get("scales")
  if size is None and not scales:
    raise ValueError("config.data.size (the largest training shorter side, e.g. 800) or "
                     "config.data.scales must be set")
  if scales is None:
    scales = _detr_scales(int(size), int(get("scale_step", 32)),
                          float(get("min_scale_fraction", 0.6)))
  size = max(scales) if size is None else size
  max_size = get("max_size")
  max_size = round(size * DETR_MAX_SIZE_RATIO) if max_size is None else max_size
  eval_size = size if get("eval_size") is None else get("eval_size")
  eval_max_size = max_size if get("eval_max_size") is None else get("eval_max_size")
  crop_scales = get("crop_scales")
  if crop_scales is None:
    crop_scales = tuple(round(size * f) for f in DETR_CROP_SCALE_FRACTIONS)
  crop_size = get("crop_size")
  if crop_size is None:
    crop_size = tuple(round(size * f) for f in DETR_CROP_SIZE_FRACTIONS)
  out = dict(size=size, scales=tuple(scales), max_size=max_size, eval_size=eval_size,
             eval_max_size=eval_max_size, crop_scales=tuple(crop_scales),
             crop_size=tuple(crop_size))
  buckets = get("buckets")
  out["buckets"] = (tuple(tuple(b) for b in buckets) if buckets else
                    derive_buckets(out, get("pad_multiple", 32)))
  return out


def check_sizes(data_cfg):
  """Explicit size fields that contradict each other: one error naming both fields.

  `data_cfg` is resolved (`resolve_sizes`). Contradictions: max(scales) != size, max_size <
  size, eval_max_size < eval_size, and buckets of which none holds a square view of the
  largest shorter side (min(max(size, eval_size), max(max_size, eval_max_size)), rounded up
  to pad_multiple).

  Raises:
    ValueError: "config.data.<a>=... contradicts config.data.<b>=..." and how to fix it.
  """
  d = {k: data_cfg[k] for k in SIZE_FIELDS}
  if max(d["scales"]) != d["size"]:
    raise ValueError(
        f"config.data.scales={tuple(d['scales'])} contradicts config.data.size={d['size']}: "
        "size is the largest training scale; set one of them (scales left unset follow size)")
  if d["max_size"] < d["size"]:
    raise ValueError(
        f"config.data.max_size={d['max_size']} contradicts config.data.size={d['size']}: the "
        "longer-side cap is below the shorter side; raise max_size (unset: size x 1333/800)")
  if d["eval_max_size"] < d["eval_size"]:
    raise ValueError(
        f"config.data.eval_max_size={d['eval_max_size']} contradicts config.data.eval_size="
        f"{d['eval_size']}: the longer-side cap is below the shorter side (unset: max_size)")
  m = data_cfg["pad_multiple"] if "pad_multiple" in data_cfg else 32
  side = _round_up(min(max(d["size"], d["eval_size"]), max(d["max_size"], d["eval_max_size"])),
                   m)
  if not any(_round_up(h, m) >= side and _round_up(w, m) >= side for h, w in d["buckets"]):
    raise ValueError(
        f"config.data.buckets={tuple(tuple(b) for b in d['buckets'])} contradicts "
        f"config.data.size={d['size']} / max_size={d['max_size']}: no bucket holds a "
        f"{side}x{side} view; enlarge the buckets or leave them unset (derived from the sizes)")


def resolve_data_config(data_cfg):
  """config.data over default_data_config(): missing fields get defaults, unknown ones fail,
  size fields left None are derived (`resolve_sizes`).

  Raises:
    ValueError: naming a field that default_data_config does not have (likely a typo).
  """
  resolved = default_data_config()
  given = data_cfg.to_dict() if hasattr(data_cfg, "to_dict") else dict(data_cfg)
  unknown = sorted(set(given) - set(resolved))
  if unknown:
    raise ValueError(f"config.data has unknown field(s) {unknown}; known: {sorted(resolved)}")
  resolved.update(given)
  resolved.update(resolve_sizes(resolved))
  return resolved


def augment_config(data_cfg):
  """transforms.AugmentConfig from config.data."""
  fields = transforms.AugmentConfig.__dataclass_fields__
  return transforms.AugmentConfig(**{
      k: tuple(data_cfg[k]) if isinstance(data_cfg[k], (list, tuple)) else data_cfg[k]
      for k in fields})


def _round_up(v, m):
  return int(-(-int(v) // m) * m)


def derive_buckets(sizes, pad_multiple=32):
  """Padded (h, w) shapes holding every view of the resize settings, sorted by area.

  S = largest shorter side, L = largest longer side (both rounded up to pad_multiple):
  (S, L) holds any landscape view, (L, S) any portrait one, (L, L) a batch mixing both.

  Args:
    sizes: mapping with scales, eval_size, max_size, eval_max_size.
  """
  m = pad_multiple
  short = _round_up(max(max(sizes["scales"]), sizes["eval_size"]), m)
  long = _round_up(max(sizes["max_size"], sizes["eval_max_size"]), m)
  long = max(long, short)
  return tuple(sorted({(short, long), (long, short), (long, long)},
                      key=lambda b: (b[0] * b[1], b)))


def buckets_from_config(data_cfg):
  """Padded (h, w) shapes, sorted by area: explicit `buckets` (rounded up to pad_multiple) or
  derived from the resize settings (`resolve_sizes`, `derive_buckets`)."""
  m = data_cfg.pad_multiple
  if data_cfg.buckets:
    buckets = [(_round_up(h, m), _round_up(w, m)) for h, w in data_cfg.buckets]
  else:
    buckets = resolve_sizes(data_cfg)["buckets"]
  return sorted(set(buckets), key=lambda b: (b[0] * b[1], b))


def choose_bucket(buckets, view_sizes):
  """Smallest bucket holding every (h, w) in view_sizes; the largest if view_sizes is None."""
  if view_sizes is None:
    return buckets[-1]
  need = np.max(np.asarray(view_sizes).reshape(-1, 2), axis=0)
  for bh, bw in buckets:
    if need[0] <= bh and need[1] <= bw:
      return bh, bw
  raise ValueError(f"config.data.buckets {buckets}: no bucket holds a view of "
                   f"{int(need[0])}x{int(need[1])} (h x w); add a larger bucket")


# ----------------------------------------------------------------------------- sources


def _file_stamp(path):
  """(absolute path, mtime ns, size) of a file, or None if it does not exist.

  Cache key of everything parsed from a file: a `stat` per call instead of a parse, and a file
  rewritten in place (a regenerated dataset, an edited json) is parsed again.
  """
  try:
    st = os.stat(path)
  except FileNotFoundError:
    return None
  return os.path.abspath(path), st.st_mtime_ns, st.st_size


@functools.lru_cache(maxsize=16)
def _coco_source_at(ann_file, stamp, image_dir, require_annotations):
  del stamp  # only part of the key
  return coco.CocoSource(ann_file, image_dir, require_annotations=require_annotations)


def _coco_source(ann_file, image_dir, require_annotations):
  """CocoSource of a json, parsed once per version of the file (periodic evaluation asks for
  the sources at every eval)."""
  stamp = _file_stamp(ann_file)
  if stamp is None:  # CocoSource raises the one-line error naming the file
    return coco.CocoSource(ann_file, image_dir, require_annotations=require_annotations)
  return _coco_source_at(ann_file, stamp, image_dir, require_annotations)


@functools.lru_cache(maxsize=16)
def _image_folder_source(folder):
  """An unannotated source of every image file in `folder` (sorted by name; not recursive)."""
  if not os.path.isdir(folder):
    raise ValueError(f"config.data.unlabeled_images={folder}: not a folder")
  paths = [os.path.join(folder, f) for f in image_files.images_in(folder)]
  if not paths:
    raise ValueError(f"config.data.unlabeled_images={folder}: no image files "
                     f"({', '.join(image_files.IMAGE_SUFFIXES)}) in it, and config.data.unlabeled_ann is "
                     "empty")
  return image_files.ImageFilesSource(paths)


@functools.lru_cache(maxsize=16)
def _checked_synthetic(root, num_images, seed, counts, marker_stamp):
  del marker_stamp  # only part of the key: a regenerated dataset is checked again
  return synthetic.ensure_synthetic_dataset(root, num_images=num_images, seed=seed, **dict(counts))


def _synthetic_paths(data_cfg):
  """Paths of the synthetic dataset, generated on first use; its DONE.json marker is read
  once per version (ensure_synthetic_dataset reads it on every call)."""
  root, n, seed = data_cfg.root, data_cfg.synthetic_num_images, data_cfg.synthetic_seed
  # Only non-default counts are passed (and recorded in the marker), so datasets generated
  # before these fields existed still match.
  counts = tuple((k, int(data_cfg[f"synthetic_{k}"])) for k in ("num_val", "num_unlabeled")
                 if data_cfg[f"synthetic_{k}"])
  if data_cfg.get("synthetic_size_mix"):
    counts += (("size_mix", tuple(float(v) for v in data_cfg.synthetic_size_mix)),)
  stamp = _file_stamp(os.path.join(root, "DONE.json"))
  if stamp is None:
    return synthetic.ensure_synthetic_dataset(root, num_images=n, seed=seed, **dict(counts))
  return _checked_synthetic(root, n, seed, counts, stamp)


@functools.lru_cache(maxsize=16)
def _tfds_source(name, split, data_dir):
  return coco.TfdsCocoSource(split, name=name, data_dir=data_dir or None)


def get_source(data_cfg, role):
  """The random-access source of a role ("train", "val" or "unlabeled"); cached.

  Returns:
    a CocoSource / TfdsCocoSource, or None when the role is not configured.
  """
  data_cfg = resolve_data_config(data_cfg)
  if role not in ("train", "val", "unlabeled"):
    raise ValueError(f"unknown data role {role!r}")
  kind = data_cfg.source
  if kind == "synthetic":
    paths = _synthetic_paths(data_cfg)
    return _coco_source(paths[role]["ann_file"], paths[role]["image_dir"], role != "unlabeled")
  if kind == "coco":
    ann, images = data_cfg[f"{role}_ann"], data_cfg[f"{role}_images"]
    if not ann:
      if role == "unlabeled":
        return _image_folder_source(images) if images else None
      raise ValueError(f"config.data.{role}_ann is empty but config.data.source is 'coco'")
    return _coco_source(ann, images, role != "unlabeled")
  if kind == "tfds":
    name = data_cfg.tfds_name
    if role == "unlabeled":
      if not data_cfg.tfds_unlabeled_split:
        return None
      name = data_cfg.tfds_unlabeled_name or name
    return _tfds_source(name, data_cfg[f"tfds_{role}_split"], data_cfg.tfds_data_dir)
  raise ValueError(f"config.data.source must be 'synthetic', 'coco' or 'tfds', got {kind!r}")


def _val_gt_json(data_cfg, val):
  """COCO ground-truth json of the val source for pycocotools (TFDS, or a COCO json lacking
  "area"/"iscrowd": a filled copy, written once per version)."""
  if val.gt_json is not None:
    return val.gt_json
  folder = fs.path(data_cfg.gt_cache_dir or tempfile.gettempdir())
  folder.mkdir(parents=True, exist_ok=True)
  if hasattr(val, "gt_cache_name"):  # a COCO json lacking "area"/"iscrowd": a filled copy
    gt_json = folder / val.gt_cache_name()
  else:
    gt_json = folder / (f"{data_cfg.tfds_name.replace('/', '_')}-"
                        f"{data_cfg.tfds_val_split}-gt.json")
  if not gt_json.exists():
    val.write_gt_json(str(gt_json))  # written whole or not at all (fs.write_text_atomic)
  return str(gt_json)


def dataset_info(data_cfg):
  """What the model, trainer and evaluator need to know about the configured data.

  Returns:
    dict: num_classes, category_ids (int64 [C], label -> COCO id), category_names,
    val_gt_json (COCO json for pycocotools), num_train, num_val, buckets.
  """
  data_cfg = resolve_data_config(data_cfg)
  train, val = get_source(data_cfg, "train"), get_source(data_cfg, "val")
  if list(train.category_ids) != list(val.category_ids):
    raise ValueError("train and val sources have different category ids: "
                     f"{list(train.category_ids)} vs {list(val.category_ids)}")
  return dict(num_classes=len(train.category_ids), category_ids=train.category_ids,
              category_names=list(train.category_names),
              val_gt_json=_val_gt_json(data_cfg, val),
              num_train=len(train), num_val=len(val), buckets=buckets_from_config(data_cfg))


# ----------------------------------------------------------------------------- batches


def _rng(*key):
  return np.random.default_rng([int(k) for k in key])


@functools.lru_cache(maxsize=8)  # ~2 epochs in flight per stream
def _permutation(seed, stream, epoch, n):
  return _rng(seed, stream, epoch).permutation(n)


def _dataset_index(seed, stream, position, n, shuffle):
  """Dataset index at a global stream position (a fresh permutation every epoch)."""
  epoch, offset = divmod(int(position), n)
  return int(_permutation(seed, stream, epoch, n)[offset]) if shuffle else offset


def _targets(boxes_xyxy, labels, size, max_boxes):
  """Pads view boxes to max_boxes: (boxes f32 [G, 4] normalised cxcywh, labels, valid)."""
  n = len(boxes_xyxy)
  if n > max_boxes:
    logging.log_first_n(logging.WARNING, "an image has %d boxes > max_boxes=%d; extra boxes "
                        "are dropped", 5, n, max_boxes)
    n = max_boxes
  h, w = size
  b = np.asarray(boxes_xyxy[:n], np.float32)
  out = np.zeros((max_boxes, 4), np.float32)
  out[:n] = np.stack([(b[:, 0] + b[:, 2]) / (2 * w), (b[:, 1] + b[:, 3]) / (2 * h),
                      (b[:, 2] - b[:, 0]) / w, (b[:, 3] - b[:, 1]) / h], axis=-1)
  lab = np.zeros(max_boxes, np.int32)
  lab[:n] = labels[:n]
  valid = np.zeros(max_boxes, bool)
  valid[:n] = True
  return out, lab, valid


def _empty_view_batch(b, bucket, max_boxes, with_matrix, host_normalize=True,
                      with_image_id=True):
  h, w = bucket
  out = dict(image=np.zeros((b, h, w, 3), np.float32 if host_normalize else np.uint8), pixel_mask=np.zeros((b, h, w), bool),
             boxes=np.zeros((b, max_boxes, 4), np.float32),
             labels=np.zeros((b, max_boxes), np.int32), valid=np.zeros((b, max_boxes), bool),
             image_id=np.zeros((b,), np.int32), image_index=np.zeros((b,), np.int32),
             orig_size=np.zeros((b, 2), np.int32), size=np.zeros((b, 2), np.int32))
  if not with_image_id:
    del out["image_id"]
  if with_matrix:
    out["matrix"] = np.zeros((b, 3, 3), np.float32)
  return out


_INT32 = np.iinfo(np.int32)


def _fill_view(batch, k, example, geometry, pixels, max_boxes, index):
  """Writes one view (already geometrically transformed `pixels`) into slot k of `batch`;
  `index` is the example's position in its source."""
  h, w = geometry.size
  if batch["image"].dtype == np.uint8:
    batch["image"][k, :h, :w] = pixels
  else:
    transforms.normalize_image(pixels, out=batch["image"][k, :h, :w])
  batch["pixel_mask"][k, :h, :w] = True
  # Crowd boxes are not training targets, as DINO's datasets/coco.py ConvertCocoPolysToMask.
  train_boxes = ~example["iscrowd"]
  boxes, keep = transforms.transform_boxes(example["boxes"][train_boxes], geometry.matrix,
                                           geometry.size)
  batch["boxes"][k], batch["labels"][k], batch["valid"][k] = _targets(
      boxes[keep], example["labels"][train_boxes][keep], geometry.size, max_boxes)
  batch["image_index"][k] = index
  if "image_id" in batch:
    image_id = int(example["image_id"])
    if not _INT32.min <= image_id <= _INT32.max:
      raise ValueError(
          f"image id {image_id} (source position {index}) does not fit the int32 batch field "
          "'image_id'; build the batches with with_image_id=False and map 'image_index' back "
          "to the int64 ids with pipeline.image_ids_of(source, image_index)")
    batch["image_id"][k] = image_id
  batch["orig_size"][k] = example["orig_size"]
  batch["size"][k] = geometry.size
  if "matrix" in batch:
    batch["matrix"][k] = geometry.matrix


class _Stream:
  """Shared bookkeeping of a batch stream over one source.

  `layout(step) -> (count, start)`: the step's global example count and the stream position
  of its first example (default: `global_batch` examples from `step * global_batch`); a
  variable layout (Semi-DETR's random labeled / unlabeled split) changes the batch's leading
  size from step to step, each count divisible by `process_count`.
  """

  def __init__(self, source, global_batch, process_index, process_count, layout=None):
    if global_batch % process_count:
      raise ValueError(f"global batch size {global_batch} is not divisible by process_count "
                       f"{process_count}")
    if not 0 <= process_index < process_count:
      raise ValueError(f"process_index {process_index} not in [0, {process_count})")
    if len(source) == 0:
      raise ValueError("the data source is empty")
    self.source = source
    self.global_batch = global_batch
    self.process_index, self.process_count = process_index, process_count
    self.local_batch = global_batch // process_count
    self.first_slot = process_index * self.local_batch
    self.layout = layout or (lambda step: (global_batch, step * global_batch))
    self.sizes = source.image_sizes()

  def local_slots(self):
    return range(self.first_slot, self.first_slot + self.local_batch)

  def step_layout(self, step):
    """(global count, first stream position, this process's slots) of a step."""
    count, start = (int(v) for v in self.layout(step))
    if count % self.process_count:
      raise ValueError(f"step {step}: batch of {count} examples is not divisible by "
                       f"process_count {self.process_count}")
    local = count // self.process_count
    first = self.process_index * local
    return count, start, range(first, first + local)


def make_train_batch_fn(source, data_cfg, *, seed, process_index=0, process_count=1,
                        with_image_id=True, layout=None):
  """step -> this process's labeled training batch (DINO augmentation, shuffled epochs).

  `layout`: optional `step -> (global count, first stream position)` (see `_Stream`); default
  `config.data.batch_size` examples per step.
  """
  data_cfg = resolve_data_config(data_cfg)
  stream = _Stream(source, data_cfg.batch_size, process_index, process_count, layout)
  aug, buckets, n = augment_config(data_cfg), buckets_from_config(data_cfg), len(source)

  def plan(step, slot, size):
    return transforms.plan_train_view(_rng(seed, _LABELED, step, slot, _GEOMETRY), *size, aug)

  def batch_fn(step):
    count, start, slots = stream.step_layout(step)
    indices = [_dataset_index(seed, _LABELED, start + j, n, True) for j in range(count)]
    view_sizes = None
    if stream.sizes is not None:
      view_sizes = [plan(step, j, stream.sizes[i]).size for j, i in enumerate(indices)]
    batch = _empty_view_batch(len(slots), choose_bucket(buckets, view_sizes),
                              data_cfg.max_boxes, with_matrix=False,
                              host_normalize=data_cfg.host_normalize,
                              with_image_id=with_image_id)
    for k, slot in enumerate(slots):
      example = source[indices[slot]]
      geometry = plan(step, slot, example["image"].shape[:2])
      pixels = transforms.apply_geometry(example["image"], geometry)
      if aug.labeled_color_op:
        pixels = transforms.random_color_op(_rng(seed, _LABELED, step, slot, _PHOTOMETRIC),
                                            pixels)
      _fill_view(batch, k, example, geometry, pixels, data_cfg.max_boxes, indices[slot])
    return batch

  return batch_fn


def make_unlabeled_batch_fn(source, data_cfg, *, seed, process_index=0, process_count=1,
                            with_image_id=True, layout=None):
  """step -> this process's unlabeled batch: {"weak": view batch, "strong": view batch}.

  `layout`: as `make_train_batch_fn` (default `config.data.unlabeled_batch_size` per step).
  """
  data_cfg = resolve_data_config(data_cfg)
  stream = _Stream(source, data_cfg.unlabeled_batch_size, process_index, process_count, layout)
  aug, buckets, n = augment_config(data_cfg), buckets_from_config(data_cfg), len(source)

  def plans(step, slot, size):
    return tuple(transforms.plan_semi_view(_rng(seed, _UNLABELED, step, slot, stream_id),
                                           *size, aug, strong=strong)
                 for stream_id, strong in ((_WEAK, False), (_STRONG, True)))

  def batch_fn(step):
    count, start, slots = stream.step_layout(step)
    indices = [_dataset_index(seed, _UNLABELED, start + j, n, True) for j in range(count)]
    bucket = {"weak": None, "strong": None}
    if stream.sizes is not None:
      planned = [plans(step, j, stream.sizes[i]) for j, i in enumerate(indices)]
      bucket = {name: choose_bucket(buckets, [p[v].size for p in planned])
                for v, name in enumerate(("weak", "strong"))}
    batch = {name: _empty_view_batch(len(slots), b or buckets[-1], data_cfg.max_boxes,
                                     with_matrix=True, host_normalize=data_cfg.host_normalize,
                                     with_image_id=with_image_id)
             for name, b in bucket.items()}
    for k, slot in enumerate(slots):
      example = source[indices[slot]]
      weak, strong = plans(step, slot, example["image"].shape[:2])
      _fill_view(batch["weak"], k, example, weak,
                 transforms.apply_geometry(example["image"], weak), data_cfg.max_boxes,
                 indices[slot])
      pixels = transforms.apply_strong_view(_rng(seed, _UNLABELED, step, slot, _PHOTOMETRIC),
                                            example["image"], strong, aug)
      _fill_view(batch["strong"], k, example, strong, pixels, data_cfg.max_boxes, indices[slot])
    return batch

  return batch_fn


def make_eval_batch_fn(source, data_cfg, *, process_index=0, process_count=1,
                       with_image_id=True):
  """step -> this process's eval batch; positions past the end repeat early examples with
  image_id and image_index -1 (so shapes stay static and no image is fully padded)."""
  data_cfg = resolve_data_config(data_cfg)
  stream = _Stream(source, data_cfg.eval_batch_size, process_index, process_count)
  aug, buckets, n = augment_config(data_cfg), buckets_from_config(data_cfg), len(source)

  def batch_fn(step):
    positions = [step * stream.global_batch + j for j in range(stream.global_batch)]
    indices = [p % n for p in positions]
    view_sizes = None
    if stream.sizes is not None:
      view_sizes = [transforms.plan_eval_view(*stream.sizes[i], aug).size for i in indices]
    batch = _empty_view_batch(stream.local_batch, choose_bucket(buckets, view_sizes),
                              data_cfg.max_boxes, with_matrix=False,
                              host_normalize=data_cfg.host_normalize,
                              with_image_id=with_image_id)
    for k, slot in enumerate(stream.local_slots()):
      example = source[indices[slot]]
      geometry = transforms.plan_eval_view(*example["image"].shape[:2], aug)
      _fill_view(batch, k, example, geometry,
                 transforms.apply_geometry(example["image"], geometry), data_cfg.max_boxes,
                 indices[slot])
      if positions[slot] >= n:
        batch["image_index"][k] = -1
        if with_image_id:
          batch["image_id"][k] = -1
    return batch

  return batch_fn


def image_ids_of(source, image_index):
  """int64 COCO image ids of batch `image_index` values (-1, eval padding, stays -1).

  Args:
    source: the batches' source (`image_ids` attribute, else each example's "image_id").
    image_index: int [...] positions in `source` as in the batch's `image_index`.

  Returns:
    int64 array shaped like `image_index`.
  """
  index = np.asarray(image_index, np.int64)
  ids = getattr(source, "image_ids", None)
  if ids is not None:
    ids = np.asarray(ids, np.int64)
    return np.where(index >= 0, ids[np.maximum(index, 0)], -1)
  return np.vectorize(lambda i: int(source[int(i)]["image_id"]) if i >= 0 else -1,
                      otypes=[np.int64])(index)


# ----------------------------------------------------------------------------- iterators


class BatchIterator:
  """Prefetching iterator over `batch_fn(step)` for step = start, start + 1, ...

  State is the next step: `get_state()` returns {"step": np.int64} (checkpoint it with the
  model), `set_state(state)` continues exactly there.
  """

  def __init__(self, batch_fn, *, start_step=0, num_steps=None, num_threads=2, prefetch=4):
    self._batch_fn = batch_fn
    self._num_steps = num_steps
    self._read_options = grain.ReadOptions(num_threads=max(1, num_threads),
                                           prefetch_buffer_size=max(1, prefetch))
    self._start(start_step)

  def _start(self, step):
    self.step = int(step)
    stop = self._num_steps if self._num_steps is not None else np.iinfo(np.int64).max
    ds = grain.MapDataset.range(self.step, max(self.step, stop)).map(self._batch_fn)
    self._it = iter(ds.to_iter_dataset(self._read_options))

  def __iter__(self):
    return self

  def __next__(self):
    batch = next(self._it)
    self.step += 1
    return batch

  def __len__(self):
    if self._num_steps is None:
      raise TypeError("an endless training iterator has no length")
    return self._num_steps

  def get_state(self):
    return {"step": np.int64(self.step)}

  def set_state(self, state):
    self._start(int(state["step"]))


def build_train_iterator(data_cfg, *, seed, process_index=0, process_count=1, start_step=0,
                         with_image_id=True, layout=None):
  """Endless labeled training iterator of this process's batches, starting at `start_step`
  (`layout`: see `make_train_batch_fn`)."""
  data_cfg = resolve_data_config(data_cfg)
  fn = make_train_batch_fn(get_source(data_cfg, "train"), data_cfg, seed=seed,
                           process_index=process_index, process_count=process_count,
                           with_image_id=with_image_id, layout=layout)
  return BatchIterator(fn, start_step=start_step, num_threads=data_cfg.num_threads,
                       prefetch=data_cfg.prefetch)


def build_unlabeled_iterator(data_cfg, *, seed, process_index=0, process_count=1,
                             start_step=0, with_image_id=True, layout=None):
  """Endless weak/strong unlabeled iterator, or None if no unlabeled source is configured
  (`layout`: see `make_unlabeled_batch_fn`)."""
  data_cfg = resolve_data_config(data_cfg)
  source = get_source(data_cfg, "unlabeled")
  if source is None:
    return None
  fn = make_unlabeled_batch_fn(source, data_cfg, seed=seed, process_index=process_index,
                               process_count=process_count, with_image_id=with_image_id,
                               layout=layout)
  return BatchIterator(fn, start_step=start_step, num_threads=data_cfg.num_threads,
                       prefetch=data_cfg.prefetch)


def build_eval_iterator(data_cfg, *, process_index=0, process_count=1, with_image_id=True):
  """One pass over the val source: ceil(N / eval_batch_size) batches (same on all processes).

  Returns:
    (iterator, val_gt_json): predictions for image_id -1 must be discarded.
  """
  data_cfg = resolve_data_config(data_cfg)
  source = get_source(data_cfg, "val")
  fn = make_eval_batch_fn(source, data_cfg, process_index=process_index,
                          process_count=process_count, with_image_id=with_image_id)
  steps = -(-len(source) // data_cfg.eval_batch_size)
  # Only the val source: dataset_info would also open the train source, and this runs at
  # every periodic evaluation.
  return (BatchIterator(fn, num_steps=steps, num_threads=data_cfg.num_threads,
                        prefetch=data_cfg.prefetch), _val_gt_json(data_cfg, source))
