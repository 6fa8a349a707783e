"""`--mode=predict`: a trained run's detections on a folder of images, streamed to files.

  sized-detr --mode=predict --workdir=runs/my_run --images=photos/ [--out=DIR]

Writes, into OUT (default WORKDIR/predictions):
  * detections.json: COCO results ([{"image_id", "category_id", "bbox": [x, y, w, h],
    "score", "file_name"}], scores >= 0.001 as the evaluation keeps; pycocotools' loadRes
    reads it). Image ids are those of an `images_ann` COCO json, matched by file name, else
    the input's position (0, 1, ...) in sorted order;
  * <image>.png: each image with its detections scoring >= min_score drawn (draw=True).
Images stream through `Detector.predict_iter` (bounded memory); the json is written as results
come. Unreadable images are skipped, counted and named in the summary. WORKDIR, OUT and the
json go through `fs` (a gs:// folder works): detections.json streams into a local temporary
file that then replaces (or, on an object store, is copied to) the target.
"""
import io
import json
import os
import pathlib
import sys
import tempfile
import time
from typing import Optional, Sequence

from sized_detr_jax import detector as detector_lib
from sized_detr_jax import fs
from sized_detr_jax import visualize

# Detections kept in detections.json (the evaluation's min_score, evaluate.run_evaluation).
JSON_MIN_SCORE = 0.001


def output_names(paths):
  """Unique PNG names for input images: `<stem>.png`, or `<parent>_<stem>.png` (then the
  position) for inputs whose stems collide (a/x.png and b/x.png)."""
  stems = [os.path.splitext(os.path.basename(str(p)))[0] for p in paths]
  names = []
  for k, (path, stem) in enumerate(zip(paths, stems)):
    if stems.count(stem) > 1:
      parent = os.path.basename(os.path.dirname(os.path.abspath(str(path))))
      stem = f"{parent}_{stem}"
    names.append(stem)
  return [f"{n}.png" if names.count(n) == 1 else f"{n}_{k}.png" for k, n in enumerate(names)]


def image_ids_from_ann(ann_file: str, sources: Sequence[str]) -> list:
  """COCO image ids of `sources` by file name (the json's `file_name`, or its base name), None
  for a source the json does not list."""
  images = json.loads(fs.path(ann_file).read_text()).get("images", [])
  by_name = {}
  for image in images:
    by_name[image["file_name"]] = int(image["id"])
    by_name.setdefault(pathlib.PurePath(image["file_name"]).name, int(image["id"]))
  return [by_name.get(s, by_name.get(pathlib.PurePath(s).name)) for s in sources]


class _Progress:
  """A one-line progress report on stderr (done/total, img/s, ETA), at most every `every` s.

  The rate counts from the first finished batch on, so the compilation (one per bucket,
  mostly before it) does not drag it down."""

  def __init__(self, total, every=2.0, stream=None):
    self.total, self.every, self.stream = total, every, stream or sys.stderr
    self.start, self.first, self.last = time.perf_counter(), None, 0.0

  def update(self, done, final=False):
    now = time.perf_counter()
    if self.first is None:
      self.first = (now, done)
      print(f"predict: first batch in {now - self.start:.1f} s (compiling)", file=self.stream,
            flush=True)
      self.last = now
    if not final and now - self.last < self.every:
      return
    self.last = now
    t0, n0 = self.first
    rate = (done - n0) / (now - t0) if done > n0 else float("nan")
    eta = (self.total - done) / rate if rate > 0 else float("nan")
    print(f"predict: {done}/{self.total} images, {rate:.2f} img/s, ETA {eta:.0f} s",
          end="\n" if final else "\r", file=self.stream, flush=True)


def predict_to_files(workdir: str, images, *, out: Optional[str] = None,
                     images_ann: Optional[str] = None, min_score: float = 0.3,
                     draw: bool = True, step: Optional[int] = None,
                     categories: Optional[Sequence[str]] = None) -> dict:
  """Detect objects in `images` with a trained run; detections.json and PNGs into `out`.

  Args:
    workdir: the training run (`Detector.load`).
    images: paths, folders or globs (`detector.expand_images`).
    out: output folder (default WORKDIR/predictions).
    images_ann: optional COCO json whose image ids the results reuse (by file name).
    min_score: draw detections scoring at least this.
    draw: write the drawn PNGs.
    step, categories: as `Detector.load`.

  Returns:
    {"detections_json", "images", "detections", "skipped": [(source, reason)], "written"}.
  """
  det = detector_lib.Detector.load(workdir, step=step, categories=categories)
  inputs = detector_lib.expand_images(images)
  if not inputs:
    raise FileNotFoundError(f"no image files in {images}")
  skipped = []
  if images_ann:  # images the json does not list are skipped (named in the summary)
    ids = image_ids_from_ann(images_ann, [i.source for i in inputs])
    skipped = [(i.source, f"{i.source}: not listed in --images_ann={images_ann}")
               for i, image_id in zip(inputs, ids) if image_id is None]
    listed = [k for k, image_id in enumerate(ids) if image_id is not None]
    inputs, ids = [inputs[k] for k in listed], [ids[k] for k in listed]
  else:
    ids = list(range(len(inputs)))
  names = output_names([i.source for i in inputs])
  out = fs.path(out or fs.path(workdir) / "predictions")
  out.mkdir(parents=True, exist_ok=True)
  print(f"predict: {len(inputs)} images with {det.workdir} step {det.step} "
        f"({det.params_used}), batches of {det.batch_size}", file=sys.stderr)
  json_path = out / "detections.json"
  tmp = (str(out / f".detections.json.{os.getpid()}.tmp") if fs.is_local(out)
         else tempfile.mkstemp(suffix=".json")[1])
  written, count, done, predicted = [], 0, 0, 0
  progress = _Progress(len(inputs))
  with open(tmp, "w") as f:
    f.write("[")
    for position, dets, image in det.predict_iter(inputs, JSON_MIN_SCORE, return_images=True):
      done += 1
      if dets.error is not None:
        skipped.append((dets.source, dets.error))
      else:
        predicted += 1
        for result in det.coco_results(dets, ids[position]):
          f.write(("," if count else "") + "\n" + json.dumps(
              {**result, "file_name": os.path.basename(dets.source)}))
          count += 1
        if draw:
          path = out / names[position]
          png = io.BytesIO()
          visualize.draw_detections(image, dets.boxes, dets.scores, dets.labels,
                                    [c["name"] for c in det.categories],
                                    min_score=min_score).save(png, format="PNG")
          path.write_bytes(png.getvalue())
          written.append(str(path))
      progress.update(done)
    f.write("\n]\n")
  if fs.is_local(json_path):
    os.replace(tmp, json_path)
  else:
    with open(tmp, "rb") as f:
      json_path.write_bytes(f.read())
    os.remove(tmp)
  progress.update(done, final=True)
  summary = (f"predict: {predicted} images, {count} detections (score >= "
             f"{JSON_MIN_SCORE}) -> {json_path}"
             + (f"; {len(written)} drawn (score >= {min_score}) in {out}" if draw else ""))
  if skipped:
    summary += (f"; skipped {len(skipped)} (unreadable or unlisted): "
                + "; ".join(reason for _, reason in skipped[:5])
                + (f" ... ({len(skipped) - 5} more)" if len(skipped) > 5 else ""))
  print(summary)
  return {"detections_json": str(json_path), "images": predicted, "detections": count,
          "skipped": skipped, "written": written}
