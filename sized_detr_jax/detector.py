"""A trained detector from its run folder alone: `Detector.load(workdir)`, then `predict`.

  from sized_detr_jax import Detector
  detector = Detector.load("runs/my_run")              # newest complete checkpoint
  for det in detector.predict("photos/", score_threshold=0.3):
    print(det.source, det.boxes, det.scores, det.names)

`load` reads WORKDIR/config.json (the model), WORKDIR/inference.json (classes, evaluation
preprocessing and postprocess, which params; see `inference_spec`) and, from the checkpoint,
only the detector's params (orbax partial restore: no optimiser state, no training data).
`predict` preprocesses as the run's evaluation does (`pipeline.make_eval_batch_fn`: resize,
pad to the smallest bucket holding the image), groups images by bucket into batches of the
evaluation batch size (one compiled function per bucket, reused) and returns per image its
boxes in original-image pixels.
"""
from __future__ import annotations

import dataclasses
import glob
import json
import os
from typing import Any, Iterator, Optional, Sequence

from etils import epath
import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from PIL import Image

from sized_detr_jax import evaluate
from sized_detr_jax import inference_spec
from sized_detr_jax.data import coco
from sized_detr_jax.data import image_files
from sized_detr_jax.data import pipeline
from sized_detr_jax.data import transforms
from sized_detr_jax.models import dino


@dataclasses.dataclass(frozen=True)
class Detections:
  """One image's detections, by descending score.

  Attributes:
    source: the input: its path, or "<array k>" / "<PIL k>" for the k-th in-memory image.
    image_size: (h, w) of the original image ((0, 0) when it could not be read).
    boxes: float32 [K, 4] absolute (x0, y0, x1, y1) in original-image pixels.
    scores: float32 [K] in [0, 1], descending.
    labels: int32 [K] contiguous class indices (0..C-1).
    category_ids: int64 [K] the training data's COCO category ids.
    names: the K category names.
    error: None, or why the image could not be read (then K = 0).
  """
  source: str
  image_size: tuple
  boxes: np.ndarray
  scores: np.ndarray
  labels: np.ndarray
  category_ids: np.ndarray
  names: tuple
  error: Optional[str] = None

  def __len__(self) -> int:
    return len(self.scores)


@dataclasses.dataclass(frozen=True)
class _Input:
  """A not yet decoded input: `load()` -> uint8 RGB [H, W, 3] (raises on a bad image)."""
  source: str
  value: Any

  def load(self) -> np.ndarray:
    value = self.value
    if isinstance(value, Image.Image):
      value.load()
      return coco.pil_to_rgb(value)
    if isinstance(value, np.ndarray):
      return _array_to_rgb(value, self.source)
    return coco.decode_image(value)


def _array_to_rgb(array, source):
  if array.dtype != np.uint8 or not (array.ndim == 2 or (array.ndim == 3 and
                                                         array.shape[-1] in (1, 3))):
    raise ValueError(f"{source}: expected a uint8 [H, W, 3] or [H, W] array, got {array.dtype} "
                     f"{array.shape}")
  if array.ndim == 2 or array.shape[-1] == 1:
    return np.repeat(array.reshape(array.shape[:2])[..., None], 3, axis=-1)
  return np.ascontiguousarray(array)


def expand_images(images) -> list:
  """The inputs of `Detector.predict` as a flat list of `_Input`s (nothing decoded).

  A str / PathLike is a file, a folder (its image files, sorted by name, not recursive) or a
  glob pattern (sorted matches); PIL images and numpy arrays are taken as they are; a list or
  tuple may mix all of these.

  Raises:
    FileNotFoundError: a path that is no file, no folder and matches nothing.
  """
  if isinstance(images, (str, os.PathLike, Image.Image, np.ndarray)):
    images = [images]
  inputs, arrays = [], 0
  for item in images:
    if isinstance(item, _Input):  # already expanded
      inputs.append(item)
      continue
    if isinstance(item, (Image.Image, np.ndarray)):
      kind = "PIL" if isinstance(item, Image.Image) else "array"
      inputs.append(_Input(f"<{kind} {arrays}>", item))
      arrays += 1
      continue
    path = os.fspath(item)
    if os.path.isdir(path):
      names = image_files.images_in(path)
      inputs += [_Input(os.path.join(path, n), os.path.join(path, n)) for n in names]
    elif os.path.exists(path):
      inputs.append(_Input(path, path))
    elif glob.has_magic(path):
      matches = sorted(m for m in glob.glob(path) if os.path.isfile(m))
      if not matches:
        raise FileNotFoundError(f"no file matches {path}")
      inputs += [_Input(m, m) for m in matches]
    else:
      raise FileNotFoundError(f"{path}: no such file or folder")
  return inputs


def _step_dirs(workdir):
  """Complete checkpoint step folders of a run, newest first: [(step, path)]."""
  folder = os.path.join(workdir, "checkpoints")
  names = os.listdir(folder) if os.path.isdir(folder) else ()
  steps = sorted((int(n) for n in names if n.isdigit()
                  and os.path.isdir(os.path.join(folder, n, "state"))), reverse=True)
  return [(s, os.path.join(folder, str(s))) for s in steps]


def _subtree(tree, path):
  for key in path:
    tree = tree[key]
  return tree


def _state_tree_metadata(step_dir):
  """The checkpoint's state tree of orbax leaf metadata (shapes, dtypes; nothing is read)."""
  handler = ocp.PyTreeCheckpointHandler()
  try:
    return handler.metadata(epath.Path(step_dir) / "state").tree
  finally:
    handler.close()


def restore_params(step_dir: str, collection: str, subtree: Sequence[str]):
  """(params, model_state) of the detector from one checkpoint step folder, as numpy.

  Reads only `state/<collection>/<subtree...>` and `state/model_state` (orbax partial
  restore): no optimiser state, no other params.

  Raises:
    KeyError: the checkpoint has no such collection / subtree (e.g. no EMA params).
  """
  tree = _state_tree_metadata(step_dir)
  if tree.get(collection) is None:
    raise KeyError(f"{step_dir} holds no {collection}")
  wanted = {collection: _nest(subtree, _subtree(tree[collection], subtree)),
            "model_state": tree.get("model_state") or {}}
  wanted = {k: v for k, v in wanted.items() if v}
  args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), wanted)
  handler = ocp.PyTreeCheckpointHandler()
  try:
    restored = handler.restore(epath.Path(step_dir) / "state", args=ocp.args.PyTreeRestore(
        item=wanted, restore_args=args, partial_restore=True))
  finally:
    handler.close()
  # Other variable collections (none in DINO today) nest like the params in wrapped methods.
  model_state = {name: _subtree(tree, subtree)
                 for name, tree in (restored.get("model_state") or {}).items()}
  return _subtree(restored[collection], subtree), model_state


def _nest(path, tree):
  for key in reversed(path):
    tree = {key: tree}
  return tree


def read_config(workdir: str) -> ml_collections.ConfigDict:
  """WORKDIR/config.json (the finalised config the run trained with)."""
  path = os.path.join(workdir, "config.json")
  try:
    with open(path) as f:
      return ml_collections.ConfigDict(json.load(f))
  except FileNotFoundError:
    raise FileNotFoundError(f"{path} not found: --workdir must be the folder of a training "
                            "run") from None


def _missing_spec_message(workdir):
  return (f"{workdir}/inference.json is missing (the run predates it): pass the class names "
          "in label order, Detector.load(workdir, categories=['name', ...]) or "
          "`--categories=name,...` on the command line, to predict with it")


def _spec_without_file(config, categories, has_ema, wrapped):
  """The spec of an old run from its config and the given category names (ids 1..C) or
  {"id", "name"} dicts."""
  cats = [c if isinstance(c, dict) else {"id": k + 1, "name": str(c)}
          for k, c in enumerate(categories)]
  if len(cats) != int(config.model.num_classes):
    raise ValueError(f"categories: {len(cats)} given but the model has "
                     f"{config.model.num_classes} classes")
  return inference_spec.build(config, [c["id"] for c in cats], [c["name"] for c in cats],
                              has_ema=has_ema, detector_subtree=["dino"] if wrapped else [])


def eval_data_config(preprocess: dict, batch_size: int) -> ml_collections.ConfigDict:
  """A `config.data` whose evaluation batches follow an inference.json `preprocess`."""
  data = pipeline.default_data_config()
  size, max_size = int(preprocess["eval_size"]), int(preprocess["eval_max_size"])
  data.update(dict(size=size, scales=(size,), max_size=max_size, eval_size=size,
                   eval_max_size=max_size, max_boxes=1, eval_batch_size=int(batch_size),
                   buckets=tuple(tuple(b) for b in preprocess["buckets"]),
                   pad_multiple=int(preprocess["pad_multiple"])))
  return pipeline.resolve_data_config(data)


class Detector:
  """A trained detector: `Detector.load(workdir)`, then `predict(images)`.

  Attributes:
    workdir, step: the run and the checkpoint's step.
    spec: the run's inference.json dict (`inference_spec`).
    categories: [{"id", "name"}] in label order.
    params_used: "ema_params" or "params" (the collection restored).
    batch_size: images per compiled batch.
  """

  def __init__(self, model, params, model_state, spec, *, step, params_used, workdir="",
               batch_size=None):
    self.model, self.params, self.model_state = model, params, model_state
    self.spec, self.step, self.params_used, self.workdir = spec, step, params_used, workdir
    self.categories = spec["categories"]
    self.batch_size = int(batch_size or spec["preprocess"]["eval_batch_size"])
    self.data_config = eval_data_config(spec["preprocess"], self.batch_size)
    self.buckets = pipeline.buckets_from_config(self.data_config)
    self._augment = pipeline.augment_config(self.data_config)
    self.postprocess = inference_spec.postprocess_at(spec, step)
    self._names = np.asarray([c["name"] for c in self.categories], object)
    self._ids = np.asarray([c["id"] for c in self.categories], np.int64)
    self._fn = jax.jit(lambda params, model_state, batch: evaluate.detect(
        model, inference_spec.make_postprocess(self.postprocess), params, model_state, batch))

  @classmethod
  def load(cls, workdir: str, step: Optional[int] = None, use_ema: Optional[bool] = None, *,
           categories: Optional[Sequence[Any]] = None,
           batch_size: Optional[int] = None) -> "Detector":
    """The detector of a training run, from WORKDIR alone.

    Args:
      workdir: the run's folder (config.json, inference.json, checkpoints/).
      step: the checkpoint step; None: the newest complete one (an unreadable newest one is
        skipped with a warning).
      use_ema: True: the EMA / teacher params, False: the trained / student params; None: what
        the run's evaluation used (inference.json).
      categories: only for runs without inference.json: the class names in label order (ids
        1..C), or {"id", "name"} dicts.
      batch_size: images per batch (default: the run's evaluation batch size).

    Raises:
      FileNotFoundError: no config.json / checkpoint (or `step` is not there), or no
        inference.json and no `categories` (one line naming what to pass).
    """
    workdir = os.path.abspath(os.fspath(workdir))
    config = read_config(workdir)
    steps = _step_dirs(workdir)
    if step is not None:
      steps = [(s, d) for s, d in steps if s == int(step)]
    if not steps:
      have = [s for s, _ in _step_dirs(workdir)]
      raise FileNotFoundError(f"{workdir}/checkpoints: no complete checkpoint"
                              + (f" of step {step} (steps: {have})" if step is not None else ""))
    try:
      spec = inference_spec.read(workdir)
    except inference_spec.MissingSpecError:
      if categories is None:
        raise inference_spec.MissingSpecError(_missing_spec_message(workdir)) from None
      spec = None
    errors = []
    for s, step_dir in steps:
      try:
        run_spec = spec or _spec_without_file(config, categories, _has(step_dir, "ema_params"),
                                              _has(step_dir, "params", "dino"))
        collection = run_spec["params"]["collection"]
        if use_ema is not None:
          collection = "ema_params" if use_ema else "params"
        params, model_state = restore_params(step_dir, collection,
                                             run_spec["params"]["subtree"])
      except KeyError as e:
        raise ValueError(f"use_ema={use_ema}: {e.args[0]} (the run keeps no EMA; "
                         "use_ema=False)") from None
      except Exception as e:  # pylint: disable=broad-except
        if step is not None or isinstance(e, MemoryError):
          raise
        errors.append(f"step {s}: {type(e).__name__}: {' '.join(str(e).split())[:200]}")
        continue
      if errors:
        print(f"Detector.load: skipped unreadable checkpoint(s) {'; '.join(errors)}")
      model = dino.build_dino(config.model)
      return cls(model, params, model_state, run_spec, step=s, params_used=collection,
                 workdir=workdir, batch_size=batch_size)
    raise ValueError(f"{workdir}: no readable checkpoint ({'; '.join(errors)})")

  @classmethod
  def initialised(cls, config, *, step: int = 0, batch_size: Optional[int] = None,
                  seed: int = 0) -> "Detector":
    """An untrained detector of a config (random init; classes named "class_<k>", ids k + 1),
    with the inference.json a training run of it writes: for benchmarks and tests."""
    from sized_detr_jax import config_lib  # pylint: disable=g-import-not-at-top
    config = config_lib.finalize(config)
    model = dino.build_dino(config.model)
    num = int(config.model.num_classes)
    spec = inference_spec.build(config, list(range(1, num + 1)),
                                [f"class_{k}" for k in range(num)], has_ema=False,
                                detector_subtree=[])
    key = jax.random.PRNGKey(seed)
    h, w = spec["preprocess"]["buckets"][0]  # enough encoder tokens for the queries
    variables = jax.jit(lambda: model.init(
        {"params": key, "dropout": key, "dn": key}, jax.numpy.zeros((1, h, w, 3)),
        jax.numpy.ones((1, h, w), bool), train=False))()
    variables = jax.tree.map(np.asarray, dict(variables))
    params = variables.pop("params")
    return cls(model, params, variables, spec, step=step, params_used="params",
               batch_size=batch_size)

  # ------------------------------------------------------------------------------ predicting
  def bucket_of(self, image_size) -> tuple:
    """The padded (h, w) an image of `image_size` (h, w) is predicted in."""
    view = transforms.plan_eval_view(*image_size, self._augment).size
    return pipeline.choose_bucket(self.buckets, [view])

  def _run_batch(self, images):
    """Detections of up to batch_size decoded images (one bucket)."""
    source = image_files.DecodedImagesSource(images)
    batch = pipeline.make_eval_batch_fn(source, self.data_config, with_image_id=False)(0)
    return jax.device_get(self._fn(self.params, self.model_state, batch))

  def _detections(self, source, out, k, score_threshold, max_detections):
    scores = np.asarray(out["scores"][k], np.float32)
    keep = scores >= score_threshold
    if "valid" in out:
      keep &= np.asarray(out["valid"][k], bool)
    index = np.nonzero(keep)[0]
    index = index[np.argsort(-scores[index], kind="stable")][:max_detections]
    labels = np.asarray(out["labels"][k], np.int32)[index]
    h, w = (int(v) for v in out["orig_size"][k])
    return Detections(source, (h, w), np.asarray(out["boxes_xyxy"][k], np.float32)[index],
                      scores[index], labels, self._ids[labels], tuple(self._names[labels]))

  def predict_iter(self, images, score_threshold: float = 0.001,
                   max_detections: Optional[int] = None, *,
                   return_images: bool = False) -> Iterator[tuple]:
    """`(position, Detections)` per input (`(position, Detections, uint8 image or None)` with
    `return_images`), streamed with bounded memory.

    Images are decoded one at a time and queued per bucket; a full queue (batch_size images)
    is predicted at once, the partial ones at the end. So results come in completion order
    (`position` is the input's place in `expand_images(images)`), and at most
    len(buckets) x batch_size decoded images are held. An unreadable image gives a
    `Detections` with `error` set and no boxes, never an exception.
    """
    inputs = expand_images(images)
    queues = {}
    for position, item in enumerate(inputs):
      try:
        image = item.load()
      except (OSError, ValueError, SyntaxError) as e:  # CocoFormatError is a ValueError
        yield (position, self._failed(item.source, e)) + ((None,) if return_images else ())
        continue
      queue = queues.setdefault(self.bucket_of(image.shape[:2]), [])
      queue.append((position, item.source, image))
      if len(queue) == self.batch_size:
        yield from self._flush(queue, score_threshold, max_detections, return_images)
    for queue in queues.values():
      if queue:
        yield from self._flush(queue, score_threshold, max_detections, return_images)

  def _failed(self, source, error):
    message = " ".join(str(error).split())
    return Detections(source, (0, 0), np.zeros((0, 4), np.float32), np.zeros(0, np.float32),
                      np.zeros(0, np.int32), np.zeros(0, np.int64), (),
                      error=message if source in message else f"{source}: {message}")

  def _flush(self, queue, score_threshold, max_detections, return_images):
    out = self._run_batch([image for _, _, image in queue])
    out["orig_size"] = [image.shape[:2] for _, _, image in queue]
    results = [(position, self._detections(source, out, k, score_threshold, max_detections))
               + ((image,) if return_images else ())
               for k, (position, source, image) in enumerate(queue)]
    queue.clear()
    yield from results

  def coco_results(self, detections: Detections, image_id: int) -> list:
    """One image's detections as COCO results dicts (`{"image_id", "category_id", "bbox"
    [x, y, w, h], "score"}`, rounded as the evaluation's `evaluate.detections_to_coco`)."""
    boxes = detections.boxes.astype(np.float64).reshape(-1, 4)
    xywh = np.concatenate([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], axis=-1)
    return evaluate.detections_to_coco([image_id], detections.scores[None],
                                       detections.labels[None], xywh[None], self._ids,
                                       min_score=-np.inf)

  def predict(self, images, score_threshold: float = 0.001,
              max_detections: Optional[int] = None) -> list:
    """Detections of every input, in input order.

    Args:
      images: a path (file, folder, glob), a PIL image, a uint8 [H, W, 3] / [H, W] array, or
        a list mixing them (see `expand_images`); any size.
      score_threshold: keep detections scoring at least this (the evaluation keeps >= 0.001).
      max_detections: keep at most this many per image (highest scores); None: all the
        postprocess gives (its `num_select`).

    Returns:
      list of `Detections`, one per input image (unreadable ones with `error` set).
    """
    results = dict(self.predict_iter(images, score_threshold, max_detections))
    return [results[k] for k in range(len(results))]


def _has(step_dir, *path):
  """Whether a checkpoint's state has params at `path` (metadata only)."""
  tree = _state_tree_metadata(step_dir)
  for key in path:
    if not isinstance(tree, dict) or tree.get(key) is None:
      return False
    tree = tree[key]
  return True
