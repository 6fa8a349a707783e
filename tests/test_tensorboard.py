"""TensorBoard (metrics_log.MetricsLog): training values, per-group learning rates, evaluation
metrics and box-loss shares as scalars, and the config as hparams, read back from the event
files with TensorFlow's reader."""
import numpy as np
import pytest
import tb_events

from sized_detr_jax import config_lib
from sized_detr_jax import metrics_log
from sized_detr_jax import optim


def test_eval_metrics_lrs_throughput_and_hparams_read_back(tmp_path):
  config = config_lib.load_config("synthetic", "smoke")
  groups = optim.group_lr_multipliers(config.optimizer)
  log = metrics_log.MetricsLog(str(tmp_path), total_steps=4,
                               hparams=metrics_log.flat_hparams(config),
                               lr_multipliers={g: m for g, m in groups.items() if m})
  log.write(2, {"loss": 3.5, "lr": 1e-3}, images_per_step=4)
  record = log.write(4, {"loss": 2.5, "lr": 5e-4}, images_per_step=4)
  metrics = {"AP": 0.25, "AP50": 0.5, "AP75": 0.2, "APs": -1.0, "APm": 0.3, "APl": 0.4,
             "AR100": 0.6}
  share = {"small": 0.5, "medium": 0.3, "large": 0.2}
  log.write_eval(4, metrics, loss_share=share)
  log.close()
  scalars, hparams = tb_events.read_events(str(tmp_path / "tensorboard"))
  assert scalars["train/loss"] == [(2, 3.5), (4, 2.5)]
  np.testing.assert_allclose([v for _, v in scalars["train/lr"]], [1e-3, 5e-4], rtol=1e-6)
  # Per-group rates: lr x the config's multiplier (backbone 1.0 and linear_proj 0.1 here).
  assert config.optimizer.lr_linear_proj_mult == 0.1
  np.testing.assert_allclose([v for _, v in scalars["lr/linear_proj"]], [1e-4, 5e-5], rtol=1e-6)
  np.testing.assert_allclose([v for _, v in scalars["lr/default"]], [1e-3, 5e-4], rtol=1e-6)
  assert "lr/frozen" not in scalars  # multiplier 0: nothing trains at that rate
  assert scalars["train/img_per_s"] == [(4, pytest.approx(record["img_per_s"], rel=1e-6))]
  for key in ("AP", "AP50", "AP75", "APm", "APl"):
    assert scalars[f"eval/{key}"] == [(4, pytest.approx(metrics[key]))], key
  assert "eval/APs" not in scalars  # COCO's -1: no small ground truth, not a score
  for size, value in share.items():
    assert scalars[f"eval/box_loss_share_{size}"] == [(4, pytest.approx(value))]
  assert hparams["data.batch_size"] == config.data.batch_size == 4
  assert hparams["total_steps"] == config.total_steps
  assert hparams["name"] == config.name and hparams["optimizer.lr"] == pytest.approx(1e-3)


def test_flat_hparams_keeps_scalars_and_writes_the_rest_as_text():
  flat = metrics_log.flat_hparams({"a": {"b": 1, "c": (1, 2)}, "d": None, "e": True})
  assert flat == {"a.b": 1, "a.c": "(1, 2)", "d": "None", "e": True}
