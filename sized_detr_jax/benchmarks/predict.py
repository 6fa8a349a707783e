r"""Prediction throughput of `Detector.predict` (images per second), untrained weights.

  python -m sized_detr_jax.benchmarks.predict                     # tiny model and R50
  python -m sized_detr_jax.benchmarks.predict --models=tiny --images=64 --batch=16

Models: "tiny" is the default run's DINO (`synthetic` config, 176 px evaluation side in a
192x192 bucket) on 200x240 images; "r50" is DINO-4scale R50 (`dino_r50` config, 800 / 1333
evaluation resize) on 800x1333 images (bucket 800x1344). Each model is built with random
weights (`Detector.initialised`: speed does not depend on them), one untimed `predict` call
compiles it, then `--images` uint8 images go through `predict` (resize, pad, batch, model,
postprocess, host transfer), timed whole. Prints one line per model with img/s, seconds per
image, the compile time and the machine load (`os.getloadavg`).
"""
import argparse
import os
import time

import jax
import numpy as np

from sized_detr_jax import config_lib
from sized_detr_jax import detector as detector_lib
from sized_detr_jax import host_runtime

# name -> (config, tokens, image (h, w), default batch, default image count)
MODELS = {
    "tiny": ("synthetic", None, (200, 240), 16, 64),
    "r50": ("dino_r50", None, (800, 1333), 1, 3),
}


def measure(name: str, *, images: int = 0, batch: int = 0, seed: int = 0) -> dict:
  """{"model", "image", "batch", "images", "compile_s", "seconds", "img_per_s"} of a model."""
  config_name, tokens, (h, w), default_batch, default_images = MODELS[name]
  batch, images = batch or default_batch, images or default_images
  det = detector_lib.Detector.initialised(config_lib.load_config(config_name, tokens),
                                          batch_size=batch, seed=seed)
  rng = np.random.default_rng(seed)
  pool = [rng.integers(0, 256, (h, w, 3), np.uint8) for _ in range(min(images, 8))]
  start = time.perf_counter()
  det.predict(pool[:1])
  compile_s = time.perf_counter() - start
  inputs = [pool[k % len(pool)] for k in range(images)]
  start = time.perf_counter()
  det.predict(inputs)
  seconds = time.perf_counter() - start
  return {"model": name, "image": f"{h}x{w}", "bucket": "x".join(map(str, det.bucket_of((h, w)))),
          "batch": batch, "images": images, "compile_s": compile_s, "seconds": seconds,
          "img_per_s": images / seconds}


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(prog="python -m sized_detr_jax.benchmarks.predict",
                                   description=__doc__.split("\n\n")[0])
  parser.add_argument("--models", default="tiny,r50", help="comma-separated of tiny,r50")
  parser.add_argument("--images", type=int, default=0, help="images timed (default per model)")
  parser.add_argument("--batch", type=int, default=0, help="batch size (default per model)")
  args = parser.parse_args(argv)
  host_runtime.configure()
  print(f"device: {jax.devices()[0].device_kind} x{jax.device_count()}, "
        f"{os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}")
  for name in args.models.split(","):
    r = measure(name, images=args.images, batch=args.batch)
    print(f"{r['model']:5s} {r['image']} (bucket {r['bucket']}) batch {r['batch']}: "
          f"{r['img_per_s']:.2f} img/s ({r['seconds'] / r['images']:.2f} s/img over "
          f"{r['images']} images; compile {r['compile_s']:.0f} s; load "
          f"{os.getloadavg()[0]:.1f})", flush=True)


if __name__ == "__main__":
  main()
