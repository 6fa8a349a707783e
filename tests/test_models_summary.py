"""Parameter counts of the configured detector vs the PyTorch reference."""
import pathlib

from sized_detr_jax import config_lib
from sized_detr_jax import summary
from sized_detr_jax.models import dino

CONFIG = pathlib.Path(__file__).parents[1] / "experiments" / "dino_r50.py"

dino_r50 = config_lib.load_config_module(str(CONFIG))


def test_full_dino_4scale_r50_matches_reference_count(capsys):
  counts = summary.summarize(dino_r50.get_config("coco91"))
  # IDEA-Research/DINO DINO_4scale R50 (PyTorch model.parameters(); BN stats are buffers).
  assert counts["params"] == 46_893_182
  assert counts["trainable"] == 46_670_782  # conv1 + layer1 frozen
  assert counts["frozen_bn_statistics"] == 4 * 26_560  # 4 values per BN channel
  assert sum(counts["modules"].values()) == counts["params"]
  assert "params: 46893182" in capsys.readouterr().out.splitlines()


def test_per_layer_heads_count():
  config = dino_r50.get_config("coco91")
  counts = summary.count_params(dino.build_dino(dict(config.model, share_decoder_heads=False)))
  # 5 more copies of the class Linear (256 -> 91) and the box MLP (256 -> 256 -> 256 -> 4).
  per_layer = (256 * 91 + 91) + 2 * (256 * 256 + 256) + (256 * 4 + 4)
  assert counts["params"] == 46_893_182 + 5 * per_layer


def test_default_80_classes():
  counts = summary.count_params(dino.build_dino(dino_r50.get_config().model))
  # 11 fewer classes in two (256 -> C) heads and 11 fewer label_enc rows.
  assert counts["params"] == 46_893_182 - 11 * 257 * 2 - 11 * 256


def test_tiny_is_small():
  counts = summary.count_params(dino.build_dino(dino_r50.get_config("tiny").model))
  assert 50_000 < counts["params"] < 1_000_000
