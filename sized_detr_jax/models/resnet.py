"""ResNet backbone (torchvision v1.5 bottlenecks) with frozen BatchNorm, multi-scale outputs.

As DETR/DINO use it (IDEA-Research/DINO `models/dino/backbone.py`): every BatchNorm is a
`FrozenBatchNorm2d` (statistics *and* affine parameters fixed), the stem (conv1, bn1) and
`layer1` are not trained, and the features of layer2/3/4 (strides 8/16/32) are returned.

Frozen BatchNorm values live in the `params` collection (names scale/bias/mean/var, like the
PyTorch buffers weight/bias/running_mean/running_var) so checkpoints and EMA trees carry them,
but they are read through `stop_gradient`; the stem + layer1 output is `stop_gradient`-ed too,
so those parameters get exactly zero gradient. Use `dino.param_labels` to also exclude them
from weight decay.

`blocks=(3, 4, 6, 3), width=64` is ResNet-50; `blocks=(1, 1, 1, 1), width=8` is the tiny
variant used by tests and CPU runs.

`norm="group_norm"` is for training from scratch (no ImageNet weights, e.g. the embedded
synthetic dataset): every FrozenBatchNorm becomes a trainable GroupNorm and nothing is frozen;
pair it with `optimizer.train_all_backbone=True` so the optimiser updates the stem and layer1.
"""
from typing import Any, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from sized_detr_jax.models.position_encoding import downsample_mask

BN_EPS = 1e-5
EXPANSION = 4
_conv_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")  # torchvision


class FrozenBatchNorm(nn.Module):
  """`x * scale * rsqrt(var + eps) + (bias - mean * scale * rsqrt(var + eps))`, no gradients."""
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    c = x.shape[-1]
    read = lambda name, init: jax.lax.stop_gradient(self.param(name, init, (c,), jnp.float32))
    scale = read("scale", nn.initializers.ones)
    bias = read("bias", nn.initializers.zeros)
    mean = read("mean", nn.initializers.zeros)
    var = read("var", nn.initializers.ones)
    # Fold in float32 as DETR's FrozenBatchNorm2d does, then apply in the compute dtype.
    mult = scale * jax.lax.rsqrt(var + BN_EPS)
    shift = bias - mean * mult
    return x * mult.astype(self.dtype) + shift.astype(self.dtype)


NORMS = ("frozen_bn", "group_norm")


def _norm(kind, dtype, name):
  """FrozenBatchNorm (DINO) or a trainable GroupNorm (from-scratch training)."""
  if kind == "frozen_bn":
    return FrozenBatchNorm(dtype, name=name)
  if kind == "group_norm":
    return lambda x: nn.GroupNorm(num_groups=min(32, x.shape[-1] // 4), dtype=dtype,
                                  param_dtype=jnp.float32, name=name)(x)
  raise ValueError(f"ResNet: norm must be one of {NORMS}, got {kind!r}")


def _conv(features, kernel, stride, name, dtype):
  pad = (kernel - 1) // 2
  return nn.Conv(features, (kernel, kernel), strides=(stride, stride),
                 padding=((pad, pad), (pad, pad)), use_bias=False, kernel_init=_conv_init,
                 dtype=dtype, param_dtype=jnp.float32, name=name)


def _apply_mask(x, mask):
  """Zero padded positions (padding-invariant mode) so the next conv sees zero padding."""
  if mask is None:
    return x
  m = downsample_mask(mask, x.shape[1:3])
  return x * m[..., None].astype(x.dtype)


class Bottleneck(nn.Module):
  """torchvision Bottleneck (stride on the 3x3 conv, "v1.5")."""
  width: int
  stride: int
  downsample: bool
  dtype: Any = jnp.float32
  norm: str = "frozen_bn"

  @nn.compact
  def __call__(self, x, mask=None):
    out = _conv(self.width, 1, 1, "conv1", self.dtype)(x)
    out = _apply_mask(nn.relu(_norm(self.norm, self.dtype, "bn1")(out)), mask)
    out = _conv(self.width, 3, self.stride, "conv2", self.dtype)(out)
    out = _apply_mask(nn.relu(_norm(self.norm, self.dtype, "bn2")(out)), mask)
    out = _conv(self.width * EXPANSION, 1, 1, "conv3", self.dtype)(out)
    out = _norm(self.norm, self.dtype, "bn3")(out)
    if self.downsample:
      x = _conv(self.width * EXPANSION, 1, self.stride, "downsample_conv", self.dtype)(x)
      x = _norm(self.norm, self.dtype, "downsample_bn")(x)
    return _apply_mask(nn.relu(out + x), mask)


class ResNet(nn.Module):
  """ResNet trunk returning the layer2/3/4 (or layer1-4) feature maps.

  Attributes:
    blocks: bottleneck count per stage, (3, 4, 6, 3) for ResNet-50.
    width: stem / layer1 width (64 for ResNet-50); stage i has width * 2**i.
    dtype: compute dtype (parameters stay float32).
    norm: "frozen_bn" (DINO: frozen BN, stem + layer1 frozen) or "group_norm" (trainable
      GroupNorm everywhere, nothing frozen; for training from scratch).
  """
  blocks: Sequence[int] = (3, 4, 6, 3)
  width: int = 64
  dtype: Any = jnp.float32
  norm: str = "frozen_bn"
  num_levels: int = 3

  @property
  def num_channels(self):
    """Channels of the returned maps (strides 8, 16, 32; with num_levels=4 also 4 first)."""
    return tuple(self.width * 2 ** i * EXPANSION for i in range(4 - self.num_levels, 4))

  @nn.compact
  def __call__(self, images, pixel_mask: Optional[jax.Array] = None):
    """Runs the trunk.

    Args:
      images: [B, H, W, 3] float, ImageNet-normalised.
      pixel_mask: optional [B, H, W] bool (True = real pixel). When given, every activation is
        zeroed on padding so features of real pixels do not depend on how much padding follows
        (padding-invariant mode; PyTorch DINO does not do this).

    Returns:
      List of `num_levels` maps [B, H/s, W/s, C_s] for strides s = 8, 16, 32 (ceil division),
      preceded by s = 4 (layer1, frozen: no gradient) when num_levels = 4 (Co-DINO 5-scale).
    """
    if len(self.blocks) != 4:
      raise ValueError(f"ResNet: blocks must have 4 stages, got {self.blocks}")
    if self.num_levels not in (3, 4):
      raise ValueError(f"ResNet: num_levels must be 3 or 4, got {self.num_levels}")
    x = _apply_mask(images.astype(self.dtype), pixel_mask)
    x = nn.Conv(self.width, (7, 7), strides=(2, 2), padding=((3, 3), (3, 3)), use_bias=False,
                kernel_init=_conv_init, dtype=self.dtype, param_dtype=jnp.float32,
                name="conv1")(x)
    x = _apply_mask(nn.relu(_norm(self.norm, self.dtype, "bn1")(x)), pixel_mask)
    # Activations are >= 0 after ReLU, so max-pool's -inf padding and zeroed padding agree.
    x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
    features = []
    for stage, num_blocks in enumerate(self.blocks):
      for block in range(num_blocks):
        stride = 2 if (stage > 0 and block == 0) else 1
        x = Bottleneck(self.width * 2 ** stage, stride, downsample=(block == 0),
                       dtype=self.dtype, norm=self.norm,
                       name=f"layer{stage + 1}_{block}")(x, pixel_mask)
      if stage == 0 and self.norm == "frozen_bn":
        # Stem and layer1 are frozen in DINO (backbone.py: only layer2-4 train).
        x = jax.lax.stop_gradient(x)
      features.append(x)
    return features[4 - self.num_levels:]
