"""The experiment configs carry the official recipes (values read from the official configs:
JCZ404/Semi-DETR configs/detr_ssod + configs/dino_detr, IDEA-Research/DINO)."""
import pathlib

import pytest

from sized_detr_jax import config_lib

EXPERIMENTS = pathlib.Path(__file__).parents[1] / "experiments"


def _config(name, arg=None):
  return config_lib.load_config(str(EXPERIMENTS / name), arg)


@pytest.mark.parametrize("arg", ["p1", "p10,fold3,sized_both", "full,sized_sup,plain"])
def test_semi_detr_coco_rows_use_semi_detrs_recipe(arg):
  config = _config("semi_detr.py", arg)
  # loss_cls1 / loss_cls2 loss_weight=2.0; L1 5 + xy 5 + wh 5 (effective 10); GIoU 2.
  assert config.criterion.cls_loss_coef == 2.0
  assert config.criterion.bbox_loss_coef == 10.0
  assert config.criterion.giou_loss_coef == 2.0
  # Labeled view: RandResize + RandFlip + one colour op, no crop.
  assert not config.data.random_crop and config.data.labeled_color_op
  # paramwise_cfg custom_keys={'backbone': lr_mult 0.1} only.
  assert config.optimizer.lr == 1e-4
  assert config.optimizer.lr_backbone_mult == 0.1
  assert config.optimizer.lr_linear_proj_mult == 1.0
  assert config.model.query_selection == "dino"
  # SemiBalanceSampler by_prob: 8 groups of 5 at 1:4 (partial); 1:1 in expectation (full).
  if arg.startswith("full"):
    assert config.semi.batch_sampler == "fixed"
    assert config.data.batch_size == config.data.unlabeled_batch_size == 32
  else:
    assert config.semi.batch_sampler == "by_prob"
    assert tuple(config.semi.sample_ratio) == (1, 4) and config.semi.images_per_group == 5
    assert config.data.batch_size + config.data.unlabeled_batch_size == 40
  assert config.semi.max_pseudo == 0  # sized from the labeled annotations
  # The head's encoder targets, consistency set (defaults of every variant).
  assert config.semi.agnostic_interm and config.semi.consistency_queries == "chosen"


def test_semi_detr_plain_token():
  # The paper rows run the rescaled form (the study's); `plain` is the ablation.
  assert _config("semi_detr.py", "p10,sized_sup").criterion.sized_l1_rescale
  assert not _config("semi_detr.py", "p10,sized_sup,plain").criterion.sized_l1_rescale
  for name in ("dino_r50.py", "co_dino.py"):
    assert _config(name, "sized_l1").criterion.sized_l1_rescale
    assert not _config(name, "sized_l1,plain").criterion.sized_l1_rescale
  with pytest.raises(ValueError, match="'plain' needs sized_both or sized_sup"):
    _config("semi_detr.py", "p10,plain")
  with pytest.raises(ValueError, match="unknown variant tokens \\['rescale'\\]"):
    _config("semi_detr.py", "p10,sized_both,rescale")


def test_dino_r50_optimizer_is_dino_4scale():
  """DINO_4scale.py: AdamW lr 1e-4, lr_backbone 1e-5, weight decay 1e-4, clip 0.1, and
  param_dict_type='default' (util/get_param_dicts.py: backbone and the rest, no linear-proj
  group), so sampling offsets train at the full lr."""
  opt = _config("dino_r50.py").optimizer
  assert (opt.lr, opt.lr_backbone_mult, opt.lr_linear_proj_mult) == (1e-4, 0.1, 1.0)
  assert (opt.weight_decay, opt.clip_norm) == (1e-4, 0.1)


def test_query_selection_defaults():
  assert _config("dino_r50.py").model.query_selection == "dino"
  assert _config("dino_r50.py", "tiny,invariant").model.query_selection == "valid_only"
  # The default run keeps the rule of its measured figures.
  assert _config("synthetic.py").model.query_selection == "valid_only"
