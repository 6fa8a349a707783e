"""Input-pipeline throughput at COCO resolution on this machine's CPU.

python -m sized_detr_jax.benchmarks.pipeline [--num-images 64] [--batches 8] [--threads 1 2]

Writes a COCO-like dataset (synthetic scenes as JPEG, sides 400-640 px like COCO's 640 x 480)
to a temporary folder, then times the labeled training pipeline (DINO augmentation: flip,
multi-scale 480-800 / max 1333 or resize-crop-resize, ImageNet normalisation, padding into
(800, 1344)-class buckets), the unlabeled weak + strong pipeline and the eval pipeline, in
images per second after one warm-up batch.
"""
import argparse
import os
import tempfile
import time

from sized_detr_jax.data import pipeline
from sized_detr_jax.data import synthetic


def _rate(it, batches, images_per_batch):
  next(it)  # warm-up: thread pool start, first decode
  start = time.perf_counter()
  for _ in range(batches):
    next(it)
  return batches * images_per_batch / (time.perf_counter() - start)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--num-images", type=int, default=64)
  parser.add_argument("--batch-size", type=int, default=8)
  parser.add_argument("--batches", type=int, default=8)
  parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
  args = parser.parse_args(argv)
  with tempfile.TemporaryDirectory() as tmp:
    start = time.perf_counter()
    paths = synthetic.make_synthetic_dataset(tmp, args.num_images, 0, num_val=args.batch_size * (args.batches + 1),
                                             num_unlabeled=args.num_images,
                                             image_size_range=(400, 640))
    print(f"wrote {args.num_images} COCO-sized images in {time.perf_counter() - start:.1f}s "
          f"(cpus: {os.cpu_count()})")
    for threads in args.threads:
      cfg = pipeline.coco_data_config(
          train_ann=paths["train"]["ann_file"], train_images=paths["train"]["image_dir"],
          val_ann=paths["val"]["ann_file"], val_images=paths["val"]["image_dir"],
          unlabeled_ann=paths["unlabeled"]["ann_file"],
          unlabeled_images=paths["unlabeled"]["image_dir"], batch_size=args.batch_size,
          unlabeled_batch_size=args.batch_size, eval_batch_size=args.batch_size,
          num_threads=threads, prefetch=2 * threads)
      train = _rate(pipeline.build_train_iterator(cfg, seed=0), args.batches, args.batch_size)
      unl = _rate(pipeline.build_unlabeled_iterator(cfg, seed=0), args.batches,
                  args.batch_size)
      evr = _rate(pipeline.build_eval_iterator(cfg)[0], args.batches, args.batch_size)
      print(f"COCO scale, threads={threads}: train {train:.1f} img/s, unlabeled weak+strong "
            f"{unl:.1f} img/s, eval {evr:.1f} img/s (batch {args.batch_size}, buckets "
            f"{pipeline.buckets_from_config(cfg)})")
    # The default config: the synthetic dataset at its native ~160-256 px scale.
    cfg = pipeline.default_data_config()
    cfg.update(dict(root=os.path.join(tmp, "native"), synthetic_num_images=args.num_images,
                    batch_size=args.batch_size, unlabeled_batch_size=args.batch_size,
                    num_threads=max(args.threads)))
    train = _rate(pipeline.build_train_iterator(cfg, seed=0), args.batches, args.batch_size)
    unl = _rate(pipeline.build_unlabeled_iterator(cfg, seed=0), args.batches, args.batch_size)
    print(f"default synthetic config, threads={max(args.threads)}: train {train:.1f} img/s, "
          f"unlabeled weak+strong {unl:.1f} img/s (buckets {pipeline.buckets_from_config(cfg)})")


if __name__ == "__main__":
  main()
