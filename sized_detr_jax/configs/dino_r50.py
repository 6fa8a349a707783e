"""DINO-4scale R50 (IDEA-Research/DINO config/DINO/DINO_4scale.py), the paper's detector.

Launch:
  sized-detr --config=dino_r50 --workdir=DIR          (or: python run.py --config=dino_r50 ...)
  sized-detr --config=dino_r50:tiny --mode=summary
  sized-detr --config=dino_r50:sized_l1 --workdir=DIR

`arg`: comma-separated tokens of `TOKENS` (their meanings: `sized-detr --list-configs`, one
table for every config). Here `sized_l1` puts the rescaled Sized L1 in every branch at L1's
coefficient 5.0 (the form that does not collapse; what the study measured: docs/study.md);
`tiny` / `smoke` need images of at least 64x64 (top-Q over encoder tokens); `coco91`
gives the reference parameter count (46,893,182); `invariant` implies
query_selection="valid_only".

Query selection (`model.query_selection`, models/deformable_transformer.py `selection_scores`):
  "dino"        (the default here, also for converted checkpoints) DINO's own rule: encoder
                tokens that cannot give a proposal (padding, anchors with a coordinate outside
                (0.01, 0.99)) keep their constant logit and compete in the top-900, as in
                IDEA-Research/DINO, Semi-DETR and Co-DETR; selected ones start at box (1,1,1,1);
  "valid_only"  they score -inf, so every query starts from a real anchor (and the selection
                does not depend on padding).
"""
import ml_collections
from ml_collections import config_dict

from sized_detr_jax import config_lib
from sized_detr_jax import configs
from sized_detr_jax import criterion
from sized_detr_jax.data import pipeline
from sized_detr_jax.models import dino


def _model_config():
  """The detector: `models.dino.default_model_config()` (DINO-4scale R50 values) and what differs."""
  model = ml_collections.ConfigDict(dino.default_model_config())
  # Contiguous labels 0..79 as the data pipeline gives them (DINO itself indexes COCO category
  # ids, 91 rows: the `coco91` token, for its parameter count and checkpoints).
  model.num_classes = 80
  model.dn_labelbook_size = 80
  return model


# COCO train2017 has 118,287 images: 7,393 steps per epoch at batch 16 (8 GPUs x 2).
STEPS_PER_EPOCH = 7_393


def _optimizer_config():
  """DINO-4scale's AdamW schedule (sized_detr_jax.optim fields): 12 epochs, lr x0.1 after 11.

  The schedule is in fractions of total_steps (config_lib.finalize resolves lr_drop_steps and
  warmup_steps from them: 11/12 x 88,716 = 81,323), so --config.total_steps=N scales it.
  """
  return ml_collections.ConfigDict(dict(
      lr=1e-4,
      lr_backbone_mult=0.1,  # DINO lr_backbone 1e-5
      # DINO_4scale.py sets lr_linear_proj_names/mult (0.1) but param_dict_type='default',
      # whose get_param_dict makes two groups only (backbone at lr_backbone, the rest at lr):
      # the x0.1 on sampling_offsets / reference_points applies to 'ddetr_in_mmdet' alone.
      lr_linear_proj_mult=1.0,
      weight_decay=1e-4,
      clip_norm=0.1,
      lr_drop_fractions=(11 / 12,),
      lr_drop_steps=config_dict.placeholder(tuple),
      lr_drop_factor=0.1,
      warmup_fraction=0.0,
      warmup_steps=config_dict.placeholder(int),
  ))


def _shrink(model, smoke):
  model.update(dict(
      num_classes=80 if not smoke else 4,  # smoke trains on the 4-class synthetic data
      hidden_dim=32,
      nheads=4,
      dim_feedforward=64,
      enc_layers=1,
      dec_layers=2,
      num_queries=20 if smoke else 30,
      backbone_blocks=(1, 1, 1, 1),
      backbone_width=8,
      gn_groups=8,
      dn_number=10,
      dn_labelbook_size=80 if not smoke else 4,
      num_select=20 if smoke else 30,
  ))


TOKENS = ("tiny", "smoke", "sized_l1", "plain", "bf16", "pallas", "invariant", "coco91")


def get_config(arg=None):
  """ConfigDict with model, criterion and optimizer sections (data: see the lead's pipeline)."""
  tokens = config_lib.parse_tokens(arg, TOKENS, "dino_r50")
  config = ml_collections.ConfigDict()
  config_lib.add_trainer_fields(config, name="dino_r50" + "".join(f"_{t}" for t in tokens),
                                total_steps=12 * STEPS_PER_EPOCH, log_every=100,
                                checkpoint_every=STEPS_PER_EPOCH // 2)
  config.model = _model_config()
  config.criterion = criterion.default_criterion_config()  # DINO-4scale's values
  config.optimizer = _optimizer_config()
  # COCO 2017 at DINO's augmentation, 16 images per step; point train_ann/val_ann and the
  # image folders at your copy (docs/custom_data.md).
  config.data = pipeline.coco_data_config(batch_size=16, eval_batch_size=16)
  if "tiny" in tokens or "smoke" in tokens:
    _shrink(config.model, smoke="smoke" in tokens)
  if "smoke" in tokens:  # end to end in a minute or two on the embedded synthetic data
    config.data = configs.get("synthetic", "smoke").data
    config.total_steps = 4
    config.optimizer.lr_drop_fractions = ()
    config.log_every = 2
    config.checkpoint_every = 2
  configs.apply_box_loss_tokens(config.criterion, tokens)
  if "bf16" in tokens:
    config.model.dtype = "bfloat16"
  if "pallas" in tokens:
    config.model.msda_implementation = "pallas"
  if "invariant" in tokens:
    config.model.padding_invariant = True
    config.model.query_selection = "valid_only"  # DINO's rule depends on the padding
  if "coco91" in tokens:
    config.model.num_classes = 91
    config.model.dn_labelbook_size = 91
  return config
