"""The tiny Co-DINO (experiments/co_dino.py:smoke) end to end: training outputs and losses,
finite gradients reaching every auxiliary head, positive-query slot layout, a 4-device sharded
loss + gradient equal to the single-device one, inference = plain DINO on params["dino"],
optimiser labels and config variants."""
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sized_detr_jax import co_dino
from sized_detr_jax import config_lib
from sized_detr_jax import criterion as criterion_lib
from sized_detr_jax.co_dino import config as co_config
from sized_detr_jax.co_dino import criterion as co_criterion
from sized_detr_jax.models import dino as dino_lib
from sized_detr_jax.models.testing import random_params

CONFIG = str(pathlib.Path(__file__).parents[1] / "experiments" / "co_dino.py")
SIZE = 64
BATCH = 4


def _batch():
  images = jax.random.normal(jax.random.PRNGKey(0), (BATCH, SIZE, SIZE, 3))
  mask = np.ones((BATCH, SIZE, SIZE), bool)
  mask[1, :, 48:] = False  # 64 x 48
  mask[2, 40:, :] = False  # 40 x 64
  boxes = np.array([[0.3, 0.4, 0.2, 0.3], [0.6, 0.6, 0.4, 0.3], [0.5, 0.5, 0.1, 0.1]], np.float32)
  valid = np.array([[True, False, True], [True, True, True], [False, True, False],
                    [False, False, False]])  # image 3 has no ground truth
  targets = {"boxes": np.tile(boxes, (BATCH, 1, 1)), "labels": np.tile([1, 3, 0], (BATCH, 1)),
             "valid": valid, "orig_size": np.array([[64, 64], [64, 48], [40, 64], [64, 64]])}
  targets = {k: jnp.asarray(v, jnp.int32 if v.dtype.kind == "i" else None)
             for k, v in targets.items()}
  return images, jnp.asarray(mask), targets


@pytest.fixture(scope="module")
def setup():
  config = config_lib.load_config(CONFIG, "smoke")
  # Slot counts per image (4 groups of 1): the same on 1 and on 4 devices (by default they
  # follow the device shards, as Co-DETR's per-GPU count).
  config.co_dino.pos_query_groups = BATCH
  method = co_dino.build(config)
  model, labels_fn = method.model, method.param_labels
  images, mask, targets = _batch()
  shapes = jax.eval_shape(model.init, {"params": jax.random.PRNGKey(0),
                                       "dn": jax.random.PRNGKey(0)}, images, mask)["params"]
  params = random_params(shapes, seed=1)

  crit = criterion_lib.CriterionConfig.from_config(config.criterion)
  weights = co_config.CoDINOConfig.from_config(config.co_dino,
                                               num_decoder_layers=config.model.dec_layers).loss

  def loss_fn(params, images, mask, targets):
    out = model.apply({"params": params}, images, mask, targets=targets, train=True,
                      rngs={"dn": jax.random.PRNGKey(3), "dropout": jax.random.PRNGKey(4)})
    losses = co_criterion.co_dino_criterion(out, targets, crit, weights)
    return losses["loss"], (losses, out)

  grad_fn = jax.jit(jax.grad(loss_fn, has_aux=True))
  grads, (losses, outputs) = grad_fn(params, images, mask, targets)
  return dict(config=config, model=model, labels_fn=labels_fn, params=params, grad_fn=grad_fn,
              batch=(images, mask, targets), grads=grads, losses=losses, outputs=outputs)


@pytest.mark.slow
def test_training_losses_and_gradients_finite(setup):
  losses, grads = setup["losses"], setup["grads"]
  for name in ("loss_atss_cls", "loss_atss_giou", "loss_atss_centerness", "loss_rpn_cls",
               "loss_rpn_bbox", "loss_roi_cls", "loss_roi_giou", "loss_ce_pos_roi",
               "loss_bbox_pos_atss", "loss_giou_pos_atss_aux_0", "loss_bbox_dn", "loss_ce"):
    assert np.isfinite(losses[name]) and float(losses[name]) > 0, name
  assert all(np.all(np.isfinite(g)) for g in jax.tree.leaves(grads))
  # Every auxiliary module and the shared encoder/decoder receive gradient.
  for key in ("atss_head", "rpn_head", "roi_head", "downsample", "query_proj_0", "query_proj_1",
              "query_norm_1"):
    norm = sum(float(jnp.sum(jnp.square(g))) for g in jax.tree.leaves(grads[key]))
    assert norm > 0, key
  for key in ("encoder_layers_0", "decoder_layers_1"):
    assert sum(float(jnp.sum(jnp.abs(g))) for g in jax.tree.leaves(
        grads["dino"]["transformer"][key])) > 0


@pytest.mark.slow
def test_positive_query_slots(setup):
  config, outputs = setup["config"], setup["outputs"]
  _, _, targets = setup["batch"]
  n = config.co_dino.num_pos_queries
  layers = config.model.dec_layers
  extra = outputs["extra_outputs"]
  for name in ("roi", "atss"):
    assert extra[name]["pred_boxes"].shape == (layers, BATCH, n, 4)
  gt_boxes, gt_labels, gt_valid = (np.asarray(targets[k]) for k in ("boxes", "labels", "valid"))
  for name in ("roi", "atss"):
    q = jax.tree.map(np.asarray, outputs["co_outputs"]["pos_queries"][name])
    assert np.all(q["valid"] | ~q["positive"])
    num_pos = q["positive"].sum(1)
    used = np.clip(num_pos, config.co_dino.min_pos_queries, n)  # one image per group
    # Positives first, then padding negatives up to the group's slot count, then nothing.
    slots = np.broadcast_to(np.arange(n), (BATCH, n))
    np.testing.assert_array_equal(q["valid"], slots < used[:, None])
    np.testing.assert_array_equal(q["positive"], slots < num_pos[:, None])
    assert num_pos[3] == 0 and num_pos[:3].min() > 0  # image 3 has no ground truth
    np.testing.assert_array_equal(q["labels"][~q["positive"]], -1)
    for i, j in zip(*np.nonzero(q["positive"])):
      match = np.flatnonzero(gt_valid[i] & np.all(np.isclose(gt_boxes[i], q["boxes"][i, j]), -1))
      assert len(match) == 1 and gt_labels[i, match[0]] == q["labels"][i, j]


@pytest.mark.slow
def test_four_devices_equal_one_device(setup):
  mesh = jax.make_mesh((4,), ("data",), axis_types=(jax.sharding.AxisType.Auto,),
                       devices=jax.devices()[:4])
  shard = lambda x: jax.device_put(x, jax.NamedSharding(mesh, jax.P("data")))
  images, mask, targets = setup["batch"]
  params = jax.device_put(setup["params"], jax.NamedSharding(mesh, jax.P()))
  with jax.set_mesh(mesh):  # the trainer's form: host matching per device shard
    grads, (losses, _) = setup["grad_fn"](params, shard(images), shard(mask),
                                          jax.tree.map(shard, targets))
  for k, v in setup["losses"].items():
    np.testing.assert_allclose(losses[k], v, rtol=1e-5, atol=1e-6, err_msg=k)
  for (path, g1), g4 in zip(jax.tree_util.tree_leaves_with_path(setup["grads"]),
                            jax.tree.leaves(grads)):
    np.testing.assert_allclose(g4, g1, rtol=1e-4, atol=1e-5,
                               err_msg=jax.tree_util.keystr(path))


@pytest.mark.slow
def test_inference_is_plain_dino_on_params_dino(setup):
  config, model, params = setup["config"], setup["model"], setup["params"]
  images, mask, _ = setup["batch"]
  plain = dino_lib.build_dino(config.model)
  dino_shapes = jax.eval_shape(plain.init, {"params": jax.random.PRNGKey(0),
                                            "dn": jax.random.PRNGKey(0)}, images, mask)["params"]
  assert (jax.tree.structure(dino_shapes) == jax.tree.structure(params["dino"]))
  assert jax.tree.map(lambda s: s.shape, dino_shapes) == jax.tree.map(jnp.shape, params["dino"])
  co_out = jax.eval_shape(lambda p: model.apply({"params": p}, images, mask), params)
  dino_out = jax.eval_shape(lambda p: plain.apply({"params": p}, images, mask), params["dino"])
  assert jax.tree.structure(co_out) == jax.tree.structure(dino_out)
  assert "co_outputs" not in co_out and "extra_outputs" not in co_out


@pytest.mark.slow
def test_param_labels(setup):
  params, labels_fn = setup["params"], setup["labels_fn"]
  labels = labels_fn(params)
  assert labels["dino"] == dino_lib.param_labels(params["dino"])
  aux = [v for k, v in labels.items() if k != "dino"]
  assert set(jax.tree.leaves(aux)) == {"default"}
  assert "frozen" in jax.tree.leaves(labels["dino"])


def test_configs():
  base = config_lib.load_config(CONFIG)
  assert base.method == "co_dino"
  assert (base.model.num_feature_levels, base.model.num_backbone_levels) == (5, 4)
  assert base.model.num_queries == 900 and base.model.dn_box_noise_scale == 1.0
  assert base.optimizer.lr == 2e-4 and base.optimizer.lr_backbone_mult == 0.1
  assert tuple(base.co_dino.heads) == ("rpn_roi", "atss")
  assert base.co_dino.num_pos_queries == 300 and base.criterion.bbox_loss == "l1"
  sized = config_lib.load_config(CONFIG, "sized_l1")
  assert sized.criterion.bbox_loss == "sized_l1" and sized.co_dino == base.co_dino
  assert tuple(config_lib.load_config(CONFIG, "synthetic,no_aux").co_dino.heads) == ()
  with pytest.raises(ValueError, match="bogus"):
    config_lib.load_config(CONFIG, "bogus")
  bad = config_lib.load_config(CONFIG, "smoke")
  bad.co_dino.rpn_nms_pree = 3
  with pytest.raises(ValueError, match="rpn_nms_pree"):
    co_dino.build(bad)
