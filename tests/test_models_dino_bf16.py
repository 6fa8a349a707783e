"""bfloat16 compute vs float32 on the smoke DINO: the training loss stays within 3%.

The model with `model.dtype="bfloat16"` (the `bf16` token of experiments/dino_r50.py) runs its
convolutions, matmuls and MSDA in bfloat16 on float32 params, and hands float32 logits and boxes
to the criterion, whose sigmoid/focal terms, box losses and matching cost run in float32. Both
models share one set of params, one batch and one denoising key; the loss is the trainer's
`dino_criterion` total (matching included, no mesh).

Tolerance: bfloat16 keeps 8 significant bits (2^-9 = 0.2% per rounding); the errors add up over
~40 bf16 conv/matmul layers and, mostly, move discrete choices (the encoder's top-k query
selection, the Hungarian matches) that shift single terms by a few percent. Over 12 random
parameter draws (6 seeds x weight scales 0.5 and 1) the total loss differed by 0.0-1.6%
(median 0.4%); the test allows 3%.
"""
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sized_detr_jax import config_lib
from sized_detr_jax import criterion
from sized_detr_jax.models import dino
from sized_detr_jax.models.testing import random_params

CONFIG = pathlib.Path(__file__).parents[1] / "experiments" / "dino_r50.py"
SIZE = 64
TOLERANCE = 0.03


def _batch(batch):
  rng = np.random.default_rng(0)
  images = jnp.asarray(rng.normal(size=(batch, SIZE, SIZE, 3)), jnp.float32)
  mask = jnp.ones((batch, SIZE, SIZE), bool).at[1, :, 48:].set(False)  # image 1 is 64x48
  boxes = np.array([[0.3, 0.4, 0.2, 0.3], [0.6, 0.6, 0.4, 0.3], [0.5, 0.5, 0.1, 0.1],
                    [0.2, 0.7, 0.15, 0.2]], np.float32)
  targets = {"boxes": jnp.asarray(np.tile(boxes, (batch, 1, 1))),
             "labels": jnp.asarray(np.tile([1, 3, 0, 2], (batch, 1)), jnp.int32),
             "valid": jnp.asarray(np.tile([True, True, False, True], (batch, 1))),
             "orig_size": jnp.full((batch, 2), SIZE, jnp.int32)}
  return images, mask, targets


@pytest.mark.slow
def test_bf16_train_loss_close_to_float32():
  config = config_lib.load_config_module(str(CONFIG)).get_config("smoke,bf16")
  assert config.model.dtype == "bfloat16"
  images, mask, targets = _batch(2)
  criterion_config = criterion.CriterionConfig.from_config(config.criterion)
  models = {"bfloat16": dino.build_dino(config.model),
            "float32": dino.build_dino(dict(config.model, dtype="float32"))}
  shapes = jax.eval_shape(models["float32"].init, jax.random.key(0), images, mask)["params"]
  params = random_params(shapes, seed=5, scale=0.5)  # the draw with the largest gap above
  losses = {}
  for name, model in models.items():
    def loss(p, model=model):
      out = model.apply({"params": p}, images, mask, targets, train=True,
                        rngs={"dn": jax.random.key(3)})
      for leaf in jax.tree.leaves({k: v for k, v in out.items() if k != "dn_meta"}):
        assert leaf.dtype == jnp.float32  # what the criterion sees
      return criterion.dino_criterion(out, targets, criterion_config)["loss"]
    losses[name] = float(jax.jit(loss)(params))
  assert np.isfinite(losses["bfloat16"]) and losses["float32"] > 0
  gap = abs(losses["bfloat16"] - losses["float32"]) / losses["float32"]
  assert 0 < gap < TOLERANCE, losses  # > 0: the bf16 path really ran
