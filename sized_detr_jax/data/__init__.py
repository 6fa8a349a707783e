"""Datasets, augmentation and the static-shape input pipeline.

Modules (import them directly; this package imports nothing so the CLIs start fast):
  synthetic     embedded multi-scale dataset; `python -m sized_detr_jax.data.synthetic`,
                make_synthetic_dataset, ensure_synthetic_dataset
  coco          validated COCO json source, TFDS coco/2017 source, category id <-> label maps
  coco_partial  COCO-partial splits (Soft Teacher format); `python -m ...data.coco_partial`
  transforms    DETR augmentation, eval resize, Semi-DETR weak / strong views with 3x3 matrices
  pipeline      default_data_config, coco_data_config, dataset_info, build_train_iterator,
                build_unlabeled_iterator, build_eval_iterator
"""
