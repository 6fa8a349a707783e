"""ResNet backbone: frozen BN formula, shapes, frozen gradients, padding-invariant mode, size."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sized_detr_jax.models import resnet
from sized_detr_jax.models.testing import random_params

TINY = dict(blocks=(1, 1, 1, 1), width=8)


@pytest.fixture(scope="module")
def tiny():
  model = resnet.ResNet(**TINY)
  shapes = jax.eval_shape(model.init, jax.random.PRNGKey(1), jnp.zeros((1, 64, 64, 3)))
  return model, random_params(shapes["params"])


def test_frozen_bn_formula():
  x = np.random.default_rng(0).normal(size=(2, 3, 3, 4))
  p = {"scale": np.array([1., 2., .5, 1.]), "bias": np.array([0., 1., -1., .3]),
       "mean": np.array([.1, -.2, .3, 0.]), "var": np.array([1., 4., .25, 2.])}
  got = resnet.FrozenBatchNorm().apply({"params": p}, jnp.asarray(x, jnp.float32))
  want = (x - p["mean"]) / np.sqrt(p["var"] + 1e-5) * p["scale"] + p["bias"]
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)


def test_tiny_shapes_and_frozen_gradients(tiny):
  model, params = tiny
  images = jax.random.normal(jax.random.PRNGKey(2), (1, 64, 64, 3))
  feats = jax.jit(model.apply)({"params": params}, images)
  assert [f.shape for f in feats] == [(1, 8, 8, 64), (1, 4, 4, 128), (1, 2, 2, 256)]
  assert model.num_channels == (64, 128, 256)

  def loss(p):
    return sum(jnp.sum(f ** 2) for f in model.apply({"params": p}, images))

  grads = jax.jit(jax.grad(loss))(params)
  for path, g in jax.tree_util.tree_flatten_with_path(grads)[0]:
    keys = [k.key for k in path]
    frozen = keys[0] in ("conv1", "bn1", "layer1_0") or keys[-1] in ("mean", "var", "scale",
                                                                     "bias")
    if frozen:
      assert not np.any(np.asarray(g)), keys
  assert np.any(np.asarray(grads["layer2_0"]["conv2"]["kernel"]))


def test_padding_invariant_mode(tiny):
  model, params = tiny
  image = jax.random.normal(jax.random.PRNGKey(3), (1, 64, 64, 3))
  padded = jnp.zeros((1, 128, 128, 3)).at[:, :64, :64].set(image)
  mask_small = jnp.ones((1, 64, 64), bool)
  mask_big = jnp.zeros((1, 128, 128), bool).at[:, :64, :64].set(True)
  # Garbage in the padding must not matter either.
  padded = jnp.where(mask_big[..., None], padded, 7.0)
  apply = jax.jit(model.apply)
  a = apply({"params": params}, image, mask_small)
  b = apply({"params": params}, padded, mask_big)
  for fa, fb in zip(a, b):
    h, w = fa.shape[1:3]
    np.testing.assert_allclose(np.asarray(fb[:, :h, :w]), np.asarray(fa), atol=1e-4, rtol=1e-4)


def test_resnet50_conv_parameter_count():
  shapes = jax.eval_shape(resnet.ResNet().init, jax.random.PRNGKey(0),
                          jnp.zeros((1, 64, 64, 3)))["params"]
  leaves = jax.tree_util.tree_flatten_with_path(shapes)[0]
  conv = sum(int(np.prod(l.shape)) for p, l in leaves if p[-1].key == "kernel")
  bn_channels = sum(int(np.prod(l.shape)) for p, l in leaves if p[-1].key == "scale")
  # torchvision resnet50: 25,557,032 params incl. fc (2048*1000 + 1000) and BN affine (2/ch).
  assert conv + 2 * bn_channels == 25_557_032 - 2_049_000


@pytest.mark.slow
def test_group_norm_variant_trains_everything():
  """norm="group_norm" (from scratch): GroupNorm statistics and a gradient reaching the stem."""
  model = resnet.ResNet(**TINY, norm="group_norm")
  images = jax.random.normal(jax.random.PRNGKey(2), (1, 64, 64, 3))
  params = model.init(jax.random.PRNGKey(1), images)["params"]
  assert "mean" not in params["bn1"] and "scale" in params["bn1"]

  # The stem output after its GroupNorm has per-group mean 0 and variance 1 (numpy reference).
  def stem(p, x):
    x = nn.Conv(8, (7, 7), strides=(2, 2), padding=((3, 3), (3, 3)), use_bias=False).apply(
        {"params": p["conv1"]}, x)
    return x
  x = np.asarray(stem(params, images), np.float64)
  groups = x.reshape(1, 32, 32, 2, 4)  # 8 channels -> min(32, 8 // 4) = 2 groups of 4
  ref = (groups - groups.mean(axis=(1, 2, 4), keepdims=True)) / np.sqrt(
      groups.var(axis=(1, 2, 4), keepdims=True) + 1e-6)
  got = nn.GroupNorm(num_groups=2).apply({"params": params["bn1"]}, jnp.asarray(x, jnp.float32))
  np.testing.assert_allclose(np.asarray(got), ref.reshape(x.shape), atol=1e-4)

  grads = jax.grad(lambda p: sum(jnp.sum(f ** 2) for f in model.apply({"params": p}, images)))(params)
  assert np.abs(np.asarray(grads["conv1"]["kernel"])).sum() > 0
  assert np.abs(np.asarray(grads["layer1_0"]["conv1"]["kernel"])).sum() > 0
  with pytest.raises(ValueError, match="norm must be one of"):
    resnet.ResNet(**TINY, norm="batch").init(jax.random.PRNGKey(1), images)
