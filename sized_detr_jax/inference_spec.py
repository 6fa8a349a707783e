"""What inference needs from a training run: `WORKDIR/inference.json`, beside config.json.

Training writes it when it starts (`from_run`); `detector.Detector` and `export` read it, so a
trained run predicts without its dataset. The file (format 1):

  {"format": 1, "method": "dino" | "semi_detr" | "co_dino",
   "categories": [{"id": 1, "name": "circle"}, ...],    # contiguous label k -> categories[k]
   "preprocess": {"eval_size": 800, "eval_max_size": 1333, "buckets": [[800, 1344], ...],
                  "pad_multiple": 32, "eval_batch_size": 16,
                  "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]},
   "postprocess": [{"from_step": 0, "kind": "topk", "num_select": 300}, ...],
   "params": {"collection": "ema_params" | "params", "subtree": ["dino"] | []}}

* preprocess: the evaluation resize (shorter side to `eval_size`, longer side capped at
  `eval_max_size`, bilinear), zero padding to the smallest bucket holding the view, and the
  normalisation (x / 255 - mean) / std of RGB.
* postprocess: per training stage, the evaluation's postprocess; the one of a checkpoint after
  s completed steps is the last entry with from_step <= s. Kinds: "topk" (`dino.postprocess`),
  "nms" (class-wise NMS, `semi.method.nms_postprocess`: Semi-DETR before its switch),
  "soft_nms" (`soft_nms.co_dino_postprocess`: Co-DINO with `model.soft_nms_iou`).
* params: the checkpoint collection evaluation reads (`evaluate.eval_params`: the EMA/teacher
  params when `config.eval_ema` and the run keeps them, else the trained/student params) and
  the path of the detector inside it (["dino"] for methods that wrap a DINO).
"""
import json
from typing import Any, Callable, Optional, Sequence

from sized_detr_jax import fs
from sized_detr_jax.data import pipeline
from sized_detr_jax.data import transforms

FILE_NAME = "inference.json"
FORMAT = 1
POSTPROCESS_KINDS = ("topk", "nms", "soft_nms")


class MissingSpecError(FileNotFoundError):
  """A run without inference.json (trained before it existed)."""


def postprocess_stages(config) -> list:
  """The evaluation postprocess of every training stage of a finalised config."""
  method = config.get("method", "dino")
  num_select = int(config.model.get("num_select", 300))
  topk = {"kind": "topk", "num_select": num_select}
  if method == "co_dino" and config.model.get("soft_nms_iou"):
    return [{"from_step": 0, "kind": "soft_nms", "num_select": num_select,
             "iou_threshold": float(config.model.soft_nms_iou)}]
  if method == "semi_detr":
    from sized_detr_jax.semi import config as semi_config  # pylint: disable=g-import-not-at-top
    semi = semi_config.SemiConfig.from_config(config.get("semi"))
    stages = [{"from_step": 0, "kind": "nms", "num_select": num_select,
               "iou_threshold": float(semi.nms_iou)}]
    if semi.switch_step is not None and semi.switch_step >= 0:  # SemiConfig.stage_at
      stages.append({"from_step": int(semi.switch_step), **topk})
    return stages
  return [{"from_step": 0, **topk}]


def build(config, category_ids: Sequence[int], category_names: Sequence[str], *,
          has_ema: bool, detector_subtree: Sequence[str]) -> dict:
  """The inference.json dict of a run.

  Args:
    config: the finalised config (`config_lib.finalize`).
    category_ids, category_names: [C] COCO ids and names of the contiguous labels 0..C-1.
    has_ema: whether the checkpoints hold `ema_params`.
    detector_subtree: path of the DINO params inside the params tree ([] or ["dino"]).
  """
  if len(category_ids) != len(category_names):
    raise ValueError(f"{len(category_ids)} category ids but {len(category_names)} names")
  data = pipeline.resolve_data_config(config.data)
  use_ema = bool(config.get("eval_ema")) and has_ema  # as evaluate.eval_params
  return {
      "format": FORMAT,
      "method": config.get("method", "dino"),
      "categories": [{"id": int(i), "name": str(n)} for i, n in zip(category_ids,
                                                                      category_names)],
      "preprocess": {"eval_size": int(data.eval_size), "eval_max_size": int(data.eval_max_size),
                     "buckets": [[int(h), int(w)] for h, w in
                                 pipeline.buckets_from_config(data)],
                     "pad_multiple": int(data.pad_multiple),
                     "eval_batch_size": int(data.eval_batch_size),
                     "mean": [float(v) for v in transforms.IMAGENET_MEAN],
                     "std": [float(v) for v in transforms.IMAGENET_STD]},
      "postprocess": postprocess_stages(config),
      "params": {"collection": "ema_params" if use_ema else "params",
                 "subtree": list(detector_subtree)},
  }


def from_run(config, data_info: dict, params: Any, ema_params: Optional[Any]) -> dict:
  """`build` for a training run: its data's categories, its params tree and EMA params."""
  wrapped = isinstance(params, dict) and "dino" in params
  return build(config, data_info["category_ids"], data_info["category_names"],
               has_ema=ema_params is not None, detector_subtree=["dino"] if wrapped else [])


def write(workdir: str, spec: dict) -> str:
  """Writes WORKDIR/inference.json atomically; returns its path."""
  path = str(fs.path(workdir) / FILE_NAME)
  fs.write_text_atomic(path, json.dumps(spec, indent=1))
  return path


def read(workdir: str) -> dict:
  """WORKDIR/inference.json, checked.

  Raises:
    MissingSpecError: no inference.json (a run trained before it was written).
    ValueError: an unreadable file or an unknown format, naming the file.
  """
  path = fs.path(workdir) / FILE_NAME
  if not path.exists():
    raise MissingSpecError(str(path))
  try:
    spec = json.loads(path.read_text())
  except (OSError, ValueError) as e:
    raise ValueError(f"{path}: cannot read it ({e})") from None
  if spec.get("format") != FORMAT:
    raise ValueError(f"{path}: format {spec.get('format')!r}, this code reads format {FORMAT}")
  for entry in spec["postprocess"]:
    if entry["kind"] not in POSTPROCESS_KINDS:
      raise ValueError(f"{path}: postprocess kind {entry['kind']!r} is not one of "
                       f"{POSTPROCESS_KINDS}")
  return spec


def postprocess_at(spec: dict, step: int) -> dict:
  """The postprocess entry of a checkpoint after `step` completed steps."""
  entries = [e for e in spec["postprocess"] if e["from_step"] <= step]
  return max(entries, key=lambda e: e["from_step"]) if entries else spec["postprocess"][0]


def make_postprocess(entry: dict) -> Callable[..., Any]:
  """`fn(outputs, batch) -> {"scores", "labels", "boxes_xyxy", "boxes_xywh"[, "valid"]}` of a
  postprocess entry (the `method.Method.postprocess` contract: [B, K] and [B, K, 4] in the
  pixels of `batch["orig_size"]`), built from the methods' own postprocess functions."""
  num_select = int(entry["num_select"])
  if entry["kind"] == "topk":
    from sized_detr_jax import dino_method  # pylint: disable=g-import-not-at-top
    return dino_method.topk_postprocess(num_select)
  if entry["kind"] == "nms":
    from sized_detr_jax.semi import method as semi_method  # pylint: disable=g-import-not-at-top
    return lambda outputs, batch: semi_method.nms_postprocess(
        outputs, batch, num_select=num_select, iou_threshold=float(entry["iou_threshold"]))
  from sized_detr_jax import soft_nms  # pylint: disable=g-import-not-at-top
  return lambda outputs, batch: soft_nms.co_dino_postprocess(
      outputs, batch["orig_size"], num_select=num_select,
      iou_threshold=float(entry["iou_threshold"]))
