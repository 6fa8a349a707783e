"""Sine position embeddings of padded feature maps and of boxes, and mask down-sampling.

Conventions follow IDEA-Research/DINO `models/dino/position_encoding.py`
(`PositionEmbeddingSineHW`, temperature 20 in DINO-4scale) and `models/dino/utils.py`
(`gen_sineembed_for_position`, temperature 10000). Both interleave sin and cos:
feature `2j` is `sin(v / T^(2j/F))` and feature `2j+1` is `cos(v / T^(2j/F))`.

Masks here are True on *real* pixels (the data contract), the inverse of DINO's.
"""
import math

import jax.numpy as jnp


def downsample_mask(pixel_mask, size):
  """Nearest down-sampling of a pixel mask, as `F.interpolate(mode="nearest")` does in DINO.

  Output cell `i` reads input index `floor(i * H_in / H_out)` (same for columns).

  Args:
    pixel_mask: [B, H, W] bool, True on real pixels.
    size: static (h, w) of the feature map.

  Returns:
    [B, h, w] bool.
  """
  _, in_h, in_w = pixel_mask.shape
  h, w = size
  rows = [min(int(math.floor(i * in_h / h)), in_h - 1) for i in range(h)]
  cols = [min(int(math.floor(j * in_w / w)), in_w - 1) for j in range(w)]
  return pixel_mask[:, jnp.asarray(rows)][:, :, jnp.asarray(cols)]


def _sine(values, num_feats, temperature):
  """[...] -> [..., num_feats] interleaved sin/cos of `values / T^(2*(k//2)/num_feats)`."""
  k = jnp.arange(num_feats, dtype=jnp.float32)
  dim_t = temperature ** (2.0 * jnp.floor(k / 2) / num_feats)
  angles = values[..., None] / dim_t
  return jnp.where(jnp.arange(num_feats) % 2 == 0, jnp.sin(angles), jnp.cos(angles))


def sine_position_embedding(mask, *, num_pos_feats=128, temperature=20.0, eps=1e-6):
  """Normalised sine embedding of a padded feature map (DINO `PositionEmbeddingSineHW`).

  Coordinates are the cumulative count of real pixels along each axis, divided by the count
  in that row/column (so 1 at the last real pixel) and scaled by 2*pi: padding does not change
  the embedding of real pixels.

  Args:
    mask: [B, H, W] bool, True on real pixels.
    num_pos_feats: features per axis (hidden_dim // 2).
    temperature: T in the frequency ladder (20 in DINO-4scale).
    eps: added to the normaliser, as DINO does (keeps fully padded rows at 0).

  Returns:
    [B, H, W, 2 * num_pos_feats] float32, channels (pos_y, pos_x).
  """
  not_pad = mask.astype(jnp.float32)
  y_embed = jnp.cumsum(not_pad, axis=1)
  x_embed = jnp.cumsum(not_pad, axis=2)
  scale = 2 * math.pi
  y_embed = y_embed / (y_embed[:, -1:, :] + eps) * scale
  x_embed = x_embed / (x_embed[:, :, -1:] + eps) * scale
  pos_y = _sine(y_embed, num_pos_feats, temperature)
  pos_x = _sine(x_embed, num_pos_feats, temperature)
  return jnp.concatenate([pos_y, pos_x], axis=-1)


def sine_embedding_of_boxes(boxes, *, num_pos_feats=128, temperature=10000.0):
  """Sine embedding of reference points or boxes (DINO `gen_sineembed_for_position`).

  Args:
    boxes: [..., 2] normalised (x, y) or [..., 4] normalised cxcywh.
    num_pos_feats: features per coordinate (hidden_dim // 2).
    temperature: 10000 as in DINO.

  Returns:
    [..., 2 * num_pos_feats] (order y, x) or [..., 4 * num_pos_feats] (order y, x, w, h),
    float32.
  """
  if boxes.shape[-1] not in (2, 4):
    raise ValueError(f"sine_embedding_of_boxes: last dim must be 2 or 4, got {boxes.shape}")
  scaled = boxes.astype(jnp.float32) * (2 * math.pi)
  parts = [_sine(scaled[..., i], num_pos_feats, temperature) for i in range(boxes.shape[-1])]
  order = [1, 0] if boxes.shape[-1] == 2 else [1, 0, 2, 3]
  return jnp.concatenate([parts[i] for i in order], axis=-1)
