"""DINO on your own COCO-format dataset: the four paths are the only fields you must set.

  sized-detr --config=coco_custom:cpu \\
      --config.data.train_ann=DIR/annotations/train.json --config.data.train_images=DIR/images \\
      --config.data.val_ann=DIR/annotations/val.json --config.data.val_images=DIR/images
  sized-detr --config=coco_custom:sized_l1 ... \\
      --config.model.pretrained_backbone=weights/r50_imagenet.npz    # GPU: DINO-4scale R50

`arg`: comma-separated tokens of `TOKENS` (their meanings: `sized-detr --list-configs`, one table for every config). `cpu` is the default run's tiny
DINO (the synthetic config's model and optimiser, 2000 steps of 4 images) at a 160-192 px
shorter side in one 192x192 bucket; without it, DINO-4scale R50 at DINO's 480-800 px / max 1333
(the dino_r50 config, 16 images per step).

Derived when the config is finalised (`config_lib.finalize`, before anything is compiled;
config.json records the results):
  * `model.num_classes`: the number of categories of `data.train_ann` (labels are the
    categories in id order); `model.dn_labelbook_size`: num_classes. Setting them is allowed;
    a label book smaller than num_classes is an error naming both;
  * the sizes from `data.size` (cpu: 192; else 800): scales, eval size, crop sizes and buckets
    (`pipeline.resolve_sizes`); cpu keeps the longer side at `size` too (square cap);
  * the schedule from fractions of `total_steps` (lr drop at 7/8 (cpu) or 11/12, warm-up
    2.5% (cpu)), so `--config.total_steps=N` scales it;
  * `name`: the dataset's folder (e.g. `pets` for pets/annotations/train.json) + the tokens;
    the default workdir is runs/<name>-<time>.
"""
from ml_collections import config_dict

from sized_detr_jax import config_lib
from sized_detr_jax import configs
from sized_detr_jax.data import pipeline

TOKENS = ("cpu", "sized_l1", "plain")


def get_config(arg=None):
  tokens = config_lib.parse_tokens(arg, TOKENS, "coco_custom")
  if "cpu" in tokens:
    config = configs.get("synthetic")
    config.total_steps = 2000  # the measured schedule (README: own COCO data on the CPU)
    config.ema_momentum, config.eval_ema = None, False  # measured without the EMA
    config.data = pipeline.coco_data_config(
        batch_size=4, eval_batch_size=16, max_boxes=32, size=192, scale_step=16,
        min_scale_fraction=0.8, random_crop=False)
    # Square cap: every view fits one size x size bucket (one compile on CPU).
    config.data.max_size = config.data.get_ref("size").identity()
  else:
    config = configs.get("dino_r50")
  config.data.update(dict(train_ann="", train_images="", val_ann="", val_images=""))
  config.model.num_classes = config_dict.placeholder(int)
  config.model.dn_labelbook_size = config_dict.placeholder(int)
  config.name = "{dataset}_dino" + "".join(f"_{t}" for t in tokens)
  configs.apply_box_loss_tokens(config.criterion, tokens)
  return config
