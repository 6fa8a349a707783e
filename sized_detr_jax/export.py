r"""A trained detector as one file: a `jax.export` (StableHLO) inference function plus params.

  python -m sized_detr_jax.export --workdir=runs/my_run --out=detector.npz \
      [--size=HxW] [--batch=N] [--platforms=cpu,cuda,tpu] [--step=S] [--use_ema=true|false]

The .npz holds `exported` (the serialized `jax.export.Exported`, uint8), `meta` (a json string:
categories, the preprocessing, the input shapes, the platforms it was serialized for) and the
params `param_00000`, ... in the order the function takes them. Running it needs only jax and
numpy (docs/inference.md has the loader):

  scores, labels, boxes_xyxy, valid = exported.call(*params, images, view_sizes, orig_sizes)

Inputs: `images` uint8 [N, H, W, 3] RGB, each image resized as the run's evaluation does
(shorter side to `eval_size`, longer side capped at `eval_max_size`, bilinear) and placed at
the top-left of a zero canvas; `view_sizes` int32 [N, 2] (h, w) of the resized images;
`orig_sizes` int32 [N, 2] (h, w) of the original images. Outputs: `scores` float32 [N, K],
`labels` int32 [N, K] (contiguous; meta["categories"][label]), `boxes_xyxy` float32 [N, K, 4]
in original-image pixels, `valid` bool [N, K] (False: padding of the NMS postprocesses). The
normalisation, the model and the run's postprocess are inside the function; it has no host
callback (the Hungarian matching is training-only).
"""
import argparse
import json
import os
import sys
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from sized_detr_jax import detector as detector_lib
from sized_detr_jax import evaluate
from sized_detr_jax import inference_spec

PLATFORMS = ("cpu", "cuda", "tpu")


def inference_function(det: detector_lib.Detector):
  """(fn, flat params): `fn(*flat_params, images, view_sizes, orig_sizes) -> (scores, labels,
  boxes_xyxy, valid)`, the module docstring's contract, for `det`'s model and postprocess."""
  leaves, treedef = jax.tree.flatten({"params": det.params, "model_state": det.model_state})
  postprocess = inference_spec.make_postprocess(det.postprocess)

  def fn(*args):
    variables = jax.tree.unflatten(treedef, args[:len(leaves)])
    images, view_sizes, orig_sizes = args[len(leaves):]
    n, h, w = images.shape[:3]
    rows = jnp.arange(h)[None, :, None] < view_sizes[:, 0, None, None]
    cols = jnp.arange(w)[None, None, :] < view_sizes[:, 1, None, None]
    batch = {"image": images, "pixel_mask": rows & cols, "orig_size": orig_sizes,
             "image_index": jnp.arange(n, dtype=jnp.int32)}
    out = evaluate.detect(det.model, postprocess, variables["params"],
                          variables["model_state"], batch)
    valid = out.get("valid", jnp.ones(out["scores"].shape, bool))
    return out["scores"], out["labels"], out["boxes_xyxy"], valid

  return fn, [np.asarray(x) for x in leaves]


def export(det: detector_lib.Detector, path: str, *, size: Optional[Sequence[int]] = None,
           batch: int = 1, platforms: Sequence[str] = ("cpu",)) -> dict:
  """Serializes `det`'s inference function for `batch` images of `size` (h, w) (default: the
  largest evaluation bucket) into the .npz `path`; returns its meta dict."""
  bad = [p for p in platforms if p not in PLATFORMS]
  if bad or not platforms:
    raise ValueError(f"--platforms: {list(platforms)}; each must be one of {PLATFORMS}")
  h, w = (int(v) for v in (size or det.buckets[-1]))
  _check_canvas(det, h, w)
  fn, params = inference_function(det)
  args = [jax.ShapeDtypeStruct(p.shape, p.dtype) for p in params] + [
      jax.ShapeDtypeStruct((batch, h, w, 3), jnp.uint8),
      jax.ShapeDtypeStruct((batch, 2), jnp.int32), jax.ShapeDtypeStruct((batch, 2), jnp.int32)]
  exported = jax.export.export(jax.jit(fn), platforms=tuple(platforms))(*args)
  pre = det.spec["preprocess"]
  meta = {"format": 1, "categories": det.categories, "platforms": list(platforms),
          "num_params": len(params), "batch": int(batch), "height": h, "width": w,
          "eval_size": pre["eval_size"], "eval_max_size": pre["eval_max_size"],
          "mean": pre["mean"], "std": pre["std"], "postprocess": det.postprocess,
          "workdir": os.path.basename(det.workdir), "step": int(det.step),
          "params": det.params_used}
  arrays = {f"param_{i:05d}": p for i, p in enumerate(params)}
  tmp = f"{path}.{os.getpid()}.tmp.npz"
  np.savez(tmp, exported=np.frombuffer(exported.serialize(), np.uint8),
           meta=np.array(json.dumps(meta)), **arrays)
  os.replace(tmp, path)
  return meta


def _check_canvas(det, h, w):
  """A canvas smaller than the evaluation view of a square image is an error."""
  pre = det.spec["preprocess"]
  side = min(int(pre["eval_size"]), int(pre["eval_max_size"]))
  if h < side or w < side:
    raise ValueError(f"--size={h}x{w} is smaller than the evaluation resize of a square image "
                     f"({side}x{side}: shorter side {pre['eval_size']}, longer side at most "
                     f"{pre['eval_max_size']})")


def _parse_size(text):
  try:
    h, w = (int(v) for v in text.lower().split("x"))
  except ValueError:
    raise argparse.ArgumentTypeError(f"--size={text}: expected HxW, e.g. 800x1344") from None
  return h, w


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(prog="python -m sized_detr_jax.export",
                                   description=__doc__.split("\n\n")[0])
  parser.add_argument("--workdir", required=True, help="the training run")
  parser.add_argument("--out", required=True, help="output .npz file")
  parser.add_argument("--size", type=_parse_size, default=None,
                      help="canvas HxW (default: the largest evaluation bucket)")
  parser.add_argument("--batch", type=int, default=1, help="images per call")
  parser.add_argument("--platforms", default="cpu",
                      help="comma-separated subset of cpu,cuda,tpu (default cpu)")
  parser.add_argument("--step", type=int, default=None, help="checkpoint step (default newest)")
  parser.add_argument("--use_ema", choices=("true", "false"), default=None,
                      help="EMA/teacher or trained/student params (default: the evaluation's)")
  args = parser.parse_args(argv)
  try:
    det = detector_lib.Detector.load(
        args.workdir, step=args.step,
        use_ema=None if args.use_ema is None else args.use_ema == "true")
    meta = export(det, args.out, size=args.size, batch=args.batch,
                  platforms=[p for p in args.platforms.split(",") if p])
  except (ValueError, OSError) as e:
    sys.exit(f"export: {type(e).__name__}: {' '.join(str(e).split())}")
  print(f"export: {args.out}: {meta['batch']} x {meta['height']}x{meta['width']} uint8 images, "
        f"{meta['num_params']} param arrays, step {meta['step']} ({meta['params']}), "
        f"postprocess {meta['postprocess']['kind']}, serialized for {','.join(meta['platforms'])}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
