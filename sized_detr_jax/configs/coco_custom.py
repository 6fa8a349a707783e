"""DINO, Co-DINO or Semi-DETR on your own COCO-format dataset: the data paths are the only fields
you must set.

  sized-detr --config=coco_custom:cpu \\
      --config.data.train_ann=DIR/annotations/train.json --config.data.train_images=DIR/images \\
      --config.data.val_ann=DIR/annotations/val.json --config.data.val_images=DIR/images
  sized-detr --config=coco_custom:co_dino,sized_l1 ... \\
      --config.model.pretrained_backbone=weights/r50_imagenet.npz    # GPU: Co-DINO R50
  sized-detr --config=coco_custom:semi_detr,sized_sup,cpu ... \\
      --config.data.unlabeled_images=DIR/unlabeled     # or --config.data.labeled_percent=10

`arg`: comma-separated tokens of `TOKENS` (their meanings: `sized-detr --list-configs`, one
table for every config). The method is DINO, or `co_dino` / `semi_detr`; its box loss is
`sized_l1` / `plain` (DINO, Co-DINO: Co-DINO's main head only) or `sized_both` / `sized_sup`
(Semi-DETR, rescaled unless `plain`). `cpu` takes the method's recipe measured on the embedded
data (the `synthetic` token of its config: tiny model, 160-192 px in one 192x192 bucket, its
steps and optimiser); without it, the method's paper recipe at full size (DINO-4scale R50 /
Co-DINO 5-scale R50 at 480-800 px, max 1333; Semi-DETR's COCO-partial recipe).

Semi-DETR's unlabeled images: `data.unlabeled_images` (a folder; every image file in it, or
with `data.unlabeled_ann` the images of that json), or `data.labeled_percent=P`: a P% split of
the training json (COCO-partial's, fold `data.split_fold`) is labeled and the rest unlabeled.
The `cpu` Semi-DETR recipe is the embedded-data pilot (300 steps, switch at 150); start it
from a supervised run (`--config.init_from=RUN`, e.g. a `coco_custom:cpu` run on the labeled
images), as the project's study did, or the teacher gives few pseudo-labels.

Derived when the config is finalised (`config_lib.finalize`, before anything is compiled;
config.json records the results):
  * `model.num_classes`: the number of categories of `data.train_ann` (labels are the
    categories in id order); `model.dn_labelbook_size`: num_classes. Setting them is allowed;
    a label book smaller than num_classes is an error naming both;
  * the sizes from `data.size`: scales, eval size, crop sizes and buckets
    (`pipeline.resolve_sizes`); `cpu` keeps the longer side at `size` too (square cap);
  * the schedule from fractions of `total_steps` (lr drop, warm-up, Semi-DETR's switch), so
    `--config.total_steps=N` scales it;
  * `name`: the dataset's folder (e.g. `pets` for pets/annotations/train.json) + the tokens;
    the default workdir is runs/<name>-<time>.
"""
from ml_collections import config_dict

from sized_detr_jax import config_lib
from sized_detr_jax import configs
from sized_detr_jax.data import pipeline

TOKENS = ("cpu", "co_dino", "semi_detr", "sized_l1", "plain", "sized_both", "sized_sup")
_SEMI_BOX = ("sized_both", "sized_sup")


def _check_tokens(tokens):
  """Combinations that mean nothing fail here, before any data is read or anything compiled."""
  if "co_dino" in tokens and "semi_detr" in tokens:
    raise ValueError("coco_custom: tokens 'co_dino' and 'semi_detr' exclude each other (one "
                     "method per run)")
  semi_box = [t for t in tokens if t in _SEMI_BOX]
  if semi_box and "semi_detr" not in tokens:
    raise ValueError(f"coco_custom: token {semi_box[0]!r} is Semi-DETR's; add 'semi_detr', or "
                     "use 'sized_l1' / 'plain' for DINO and Co-DINO")
  if "semi_detr" in tokens and "sized_l1" in tokens:
    raise ValueError("coco_custom: with 'semi_detr' the Sized L1 tokens are 'sized_both' (both "
                     "branches) and 'sized_sup' (the supervised branch only), not 'sized_l1'")


def _cpu_data(config):
  """COCO files at the default run's CPU size: 160-192 px, one 192x192 bucket."""
  unlabeled_batch = config.data.get("unlabeled_batch_size", 4)
  config.data = pipeline.coco_data_config(
      batch_size=4, eval_batch_size=16, max_boxes=32, size=192, scale_step=16,
      min_scale_fraction=0.8, random_crop=False)
  config.data.unlabeled_batch_size = unlabeled_batch
  # Square cap: every view fits one size x size bucket (one compile on CPU).
  config.data.max_size = config.data.get_ref("size").identity()


def get_config(arg=None):
  tokens = config_lib.parse_tokens(arg, TOKENS, "coco_custom")
  _check_tokens(tokens)
  cpu = "cpu" in tokens
  if "semi_detr" in tokens:
    method = "semi_detr"
    config = configs.get("semi_detr", "synthetic" if cpu else None)
  elif "co_dino" in tokens:
    method = "co_dino"
    config = configs.get("co_dino", "synthetic" if cpu else None)
  else:
    method = "dino"
    config = configs.get("synthetic" if cpu else "dino_r50")
    if cpu:
      config.total_steps = 2000  # the measured schedule (docs/benchmarks.md, own data)
      config.ema_momentum, config.eval_ema = None, False  # measured without the EMA
  if cpu:
    _cpu_data(config)
  config.data.update(dict(source="coco", train_ann="", train_images="", val_ann="",
                          val_images="", unlabeled_ann="", unlabeled_images=""))
  config.model.num_classes = config_dict.placeholder(int)
  config.model.dn_labelbook_size = config_dict.placeholder(int)
  config.name = "{dataset}_" + method + "".join(f"_{t}" for t in tokens if t != method)
  if method == "semi_detr":
    configs.module("semi_detr").apply_box_loss_tokens(config, tokens, "coco_custom")
  else:
    configs.apply_box_loss_tokens(config.criterion, tokens)
  return config
