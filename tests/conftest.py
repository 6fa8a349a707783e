"""Test set-up: four forced CPU devices so sharding is exercised without accelerators.

The flags must be set before jax is first imported, which is why they live here. Subprocesses
started by tests inherit them through the environment.
"""
import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=4")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# XLA's CPU compile time dominates the suite (a DINO train step takes ~1 min with full
# optimisation on 2 cores); without most optimisations it compiles about 2x faster and the few
# steps the tests run are still fast. Numerics are unchanged up to float rounding.
os.environ.setdefault("JAX_DISABLE_MOST_OPTIMIZATIONS", "1")


import numpy as np  # pylint: disable=g-import-not-at-top,wrong-import-position
import pytest  # pylint: disable=g-import-not-at-top,wrong-import-position


@pytest.fixture
def count_host_calls(monkeypatch):
  """Wrap the host Hungarian solver; returns the list of cost shapes it was called with."""
  from sized_detr_jax import matching  # pylint: disable=g-import-not-at-top
  calls = []
  real = matching._solve_on_host  # pylint: disable=protected-access

  def counting(cost, gt_valid):
    calls.append(np.shape(cost))
    return real(cost, gt_valid)

  monkeypatch.setattr(matching, "_solve_on_host", counting)
  return calls


@pytest.fixture(scope="session")
def trained_smoke_run(tmp_path_factory):
  """A `synthetic:smoke` run trained for 2 steps and evaluated, whose dataset is then moved
  away (inference must not need it). Shared by test_detector.py and test_export.py.

  Returns:
    {"workdir", "data" (the moved dataset folder), "step"}.
  """
  from sized_detr_jax import config_lib  # pylint: disable=g-import-not-at-top
  from sized_detr_jax import train  # pylint: disable=g-import-not-at-top
  root = tmp_path_factory.mktemp("smoke_run")
  config = config_lib.load_config("synthetic", "smoke")
  config.data.root = str(root / "data")
  config.update(total_steps=2, log_every=1, checkpoint_every=2)
  workdir = str(root / "run")
  train.train_and_evaluate(config_lib.finalize(config), workdir)  # as the CLI does
  os.rename(root / "data", root / "data_moved")
  return {"workdir": workdir, "data": str(root / "data_moved"), "step": 2}
