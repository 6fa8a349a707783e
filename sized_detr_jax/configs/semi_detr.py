"""Semi-DETR (DINO-4scale R50 teacher-student) with L1 or Sized L1: the paper's Tables 1, 2, 3, 5.

Launch (COCO paths: docs/custom_data.md; the partial splits come from `python -m
sized_detr_jax.data.coco_partial --ann instances_train2017.json --percent 10 --fold 1 --out DIR`):
  sized-detr --config=semi_detr:p10,fold1,baseline --workdir=DIR \\
      --config.data.train_ann=DIR/instances_train2017.1@10.json \\
      --config.data.unlabeled_ann=DIR/instances_train2017.1@10-unlabeled.json ...
  sized-detr --config=semi_detr:synthetic,sized_both   # CPU, embedded data
  sized-detr --config=semi_detr:smoke                  # end to end, ~2 min

`arg`: comma-separated tokens of `TOKENS`, one row of the paper's tables per combination of a
dataset (p1 | p5 | p10 | full), a fold (fold1 .. fold5) and a box loss (baseline | sized_both |
sized_sup, + plain); their meanings: `sized-detr --list-configs`. The COCO variants follow
Semi-DETR's official recipe (JCZ404/Semi-DETR configs/detr_ssod/
detr_ssod_dino_detr_r50_coco_120k.py), each value with its source in a comment below; the
recipe and its deviations: docs/methods.md.

The synthetic / smoke variants keep the default run's recipe (cls 1, L1 5, lr 1e-3, sampling
offsets x0.1, a fixed 4 + 4 batch, fixed max_pseudo), which their measured figures were
obtained with; the method semantics changed after those figures.

Which Sized L1 form the paper rows use: the rescaled one, which `sized_both` / `sized_sup` run
(e.g. `p10,fold1,sized_sup`). The paper says the
weight term "can" be adjusted by the average box dimensions "to compensate for the potential
change in the scale of the loss", and it keeps Semi-DETR's hyper-parameters (the box weight
stays 10). Without the rescale Sized L1 is L1 divided by the box size (for COCO's mean
normalised side ~0.2, about 5x larger, far more for small boxes) at an unchanged weight, and
on the embedded data it starved classification; with the rescale Sized L1 did not beat L1 there
either (docs/study.md). So these rows run the paper's loss in the form that does not collapse,
not one the study found better; the `plain` token (e.g. `p10,sized_sup,plain`) gives the
ablation.
The per-branch box-loss magnitudes are logged as `sup_loss_bbox` / `unsup_loss_bbox`.
"""
import ml_collections

from sized_detr_jax import config_lib
from sized_detr_jax import configs
from sized_detr_jax.semi import config as semi_config

DATASETS = ("p1", "p5", "p10", "full")
FOLDS = tuple(f"fold{i}" for i in range(1, 6))
BOX_LOSSES = ("baseline", "sized_both", "sized_sup")
TOKENS = DATASETS + FOLDS + BOX_LOSSES + ("plain", "iters120k", "iters300k",
                                          "noswitch", "synthetic", "supervised", "smoke")


def _coco(config, dataset, fold):
  """COCO-partial / COCO-full data and schedule (Semi-DETR's recipe, docs/methods.md)."""
  percent = dataset[1:]
  config.data.update(dict(
      train_ann=(f"data/coco/semi_supervised/instances_train2017.{fold}@{percent}.json"
                 if dataset != "full" else "data/coco/annotations/instances_train2017.json"),
      unlabeled_ann=(f"data/coco/semi_supervised/instances_train2017.{fold}@{percent}"
                     "-unlabeled.json" if dataset != "full"
                     else "data/coco/annotations/image_info_unlabeled2017.json"),
      train_images="data/coco/train2017",
      unlabeled_images="data/coco/train2017" if dataset != "full" else "data/coco/unlabeled2017",
      val_ann="data/coco/annotations/instances_val2017.json", val_images="data/coco/val2017",
      labeled_color_op=True))
  if dataset == "full":
    config.total_steps = 240_000
    # 8 GPUs x 8 images at 1:1 in expectation: the reference's by-probability draw has
    # E[labeled] = 4 of 8 (symmetric clamp), so the fixed 4 + 4 per group has its ratio with
    # one batch shape (by_prob would add up to 7 compiled variants per stage).
    config.data.update(batch_size=32, unlabeled_batch_size=32)
    config.semi.update(unsup_weight=2.0, switch_fraction=0.5)  # at 120k
    config.optimizer.lr_drop_fractions = (0.5, 2 / 3)  # at 120k and 160k
  else:
    config.total_steps = 120_000
    # 8 GPUs x 5 images, each image labeled with probability 1/5, at least one of each kind
    # per GPU: 1.33 labeled : 3.67 unlabeled per GPU in expectation (semi.sampler).
    config.data.update(batch_size=8, unlabeled_batch_size=32)
    config.semi.update(switch_fraction=0.5, batch_sampler="by_prob", sample_ratio=(1, 4),
                       images_per_group=5)  # switch at 60k
    config.optimizer.lr_drop_fractions = ()  # Semi-DETR's steps at 120k/160k are never reached
  config.semi.max_pseudo = 0  # sized from the labeled annotations (the reference has no cap)
  config.criterion.bbox_loss_coef = 10.0  # Semi-DETR's L1 5 + its xy and wh L1 terms 5 each
  config.criterion.cls_loss_coef = 2.0  # loss_cls1 / loss_cls2 loss_weight, every branch
  config.data.random_crop = False  # the labeled view has no resize-crop-resize
  config.optimizer.lr_linear_proj_mult = 1.0  # only the backbone at x0.1


def _synthetic(config, smoke):
  """The default run's tiny DINO and schedule on a 10%-labeled synthetic split."""
  base = configs.get("synthetic", "smoke" if smoke else None)
  # smoke: dino_r50.py's smallest model (compile time dominates a few CPU steps).
  config.model = (configs.get("dino_r50", "smoke").model if smoke
                  else base.model)
  config.criterion = base.criterion
  config.optimizer = base.optimizer
  config.data = base.data
  config.total_steps = base.total_steps
  config.log_every = base.log_every
  config.checkpoint_every = base.checkpoint_every
  config.keep_checkpoints = base.keep_checkpoints
  if smoke:
    config.data.update(root="data_cache/synthetic_semi_smoke", synthetic_num_images=8,
                       synthetic_num_unlabeled=16, synthetic_num_val=8,
                       batch_size=4, unlabeled_batch_size=4)
    config.semi.update(switch_fraction=0.5, max_pseudo=8, nms_candidates=80, max_detections=40)
  else:
    config.data.update(root="data_cache/synthetic_semi10", synthetic_num_images=51,
                       synthetic_num_unlabeled=461, synthetic_num_val=128,
                       batch_size=4, unlabeled_batch_size=4)
    # 300 steps of 4 labeled + 4 unlabeled images (the CPU budget of a 4-run comparison on a
    # shared 2-core machine), switch half-way, constant lr after the warm-up (as measured: the
    # configured drop at 255 fell after the run while lr_schedule shifted drops by the warm-up).
    config.total_steps = 300
    config.log_every, config.checkpoint_every = 25, 150
    config.optimizer.lr_drop_fractions = ()
    config.optimizer.warmup_fraction = 50 / 300  # the default run's 50 warm-up steps
    config.semi.update(switch_fraction=0.5, max_pseudo=16, nms_candidates=120,
                       max_detections=100)
  config.semi.projector_fc_dim = 256


def apply_box_loss_tokens(config, tokens, source):
  """baseline / sized_both / sized_sup (the last given wins) and `plain` on a Semi-DETR config,
  in place: Sized L1 (rescaled unless `plain`) in both branches or the supervised one only.

  Raises:
    ValueError: `plain` without sized_both / sized_sup (`source` names the config).
  """
  box = ([t for t in tokens if t in BOX_LOSSES] or ["baseline"])[-1]
  if box != "baseline":
    config.criterion.bbox_loss = "sized_l1"
    config.semi.sized_l1_branches = "both" if box == "sized_both" else "sup_only"
    config.criterion.sized_l1_rescale = "plain" not in tokens  # the rescaled form by default
  elif "plain" in tokens:
    raise ValueError(f"{source}: token 'plain' needs sized_both or sized_sup")


def get_config(arg=None):
  tokens = config_lib.parse_tokens(arg, TOKENS, "semi_detr")
  pick = lambda options, default: ([t for t in tokens if t in options] or [default])[-1]
  dataset, fold = pick(DATASETS, "p10"), pick(FOLDS, "fold1")
  synthetic = "synthetic" in tokens or "smoke" in tokens

  base = configs.get("dino_r50")
  config = ml_collections.ConfigDict()
  config_lib.add_trainer_fields(config, name="semi_detr_" + "_".join(tokens or ["p10"]),
                                total_steps=120_000, log_every=100, checkpoint_every=5000)
  config.method = "semi_detr"
  config.ema_momentum = 0.999
  config.eval_ema = False  # Semi-DETR evaluates the student
  config.model = base.model
  config.criterion = base.criterion
  config.optimizer = base.optimizer
  config.optimizer.update(lr=1e-4, lr_backbone_mult=0.1, weight_decay=1e-4, clip_norm=0.1,
                          warmup_fraction=0.0)
  config.data = base.data
  config.semi = semi_config.default_semi_config()
  if synthetic:
    _synthetic(config, smoke="smoke" in tokens)
  else:
    _coco(config, dataset, fold)
  if "iters120k" in tokens or "iters300k" in tokens:
    config.total_steps = 120_000 if "iters120k" in tokens else 300_000
    config.semi.switch_fraction = 0.5
  if "noswitch" in tokens:
    config.semi.switch_step = -1
  apply_box_loss_tokens(config, tokens, "semi_detr")
  if "supervised" in tokens:
    config.method = "dino"
    config.ema_momentum = None
  return config
