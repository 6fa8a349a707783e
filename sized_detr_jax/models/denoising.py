"""Contrastive denoising (CDN) queries and the decoder self-attention mask, static shapes.

DINO (IDEA-Research/DINO `models/dino/dn_components.py prepare_for_cdn`) feeds the decoder,
before the matching queries, `groups` copies of the ground truth: in each group one *positive*
query per box (box corners moved by less than `box_noise_scale * size / 2`) and one *negative*
query per box (moved by between 1x and 2x that), with labels flipped to a random class with
probability `label_noise_ratio / 2`. Matching queries may not see denoising queries and groups
may not see each other.

The reference pads every image of the batch to the batch's largest box count and picks
`groups = dn_number // max_count` per batch, which changes the number of queries every step.
Here the number of denoising slots `D` is fixed at trace time (see `dn_slot_count`) and the
groups are laid out *per image* inside them: an image with `n` boxes uses slots
`[0, 2 * n * groups)` as consecutive groups `[n positives, n negatives]`, and
`groups = dn_number // n` (or a fixed `dn_groups` from the config). The remaining slots are
marked invalid: they see no other denoising slot, nobody sees them, and they get no loss. With
one image per device this is exactly DINO's layout; with more it avoids padding groups to the
batch maximum. (DINO switches to a *fixed* 2 * dn_number groups when dn_number < 50; here that
needs `dn_groups`. All paper configs use dn_number 100.)
"""
import jax
import jax.numpy as jnp

from sized_detr_jax import box_ops
from sized_detr_jax.models.layers import inverse_sigmoid


def dn_slot_count(*, dn_number, max_boxes, dn_groups=0):
  """Static number of denoising slots D.

  Args:
    dn_number: DINO's dn_number (100): the per-image budget of positive queries.
    max_boxes: G, the padded ground-truth count.
    dn_groups: if > 0, a fixed number of groups instead of dn_number // n.

  Returns:
    `2 * dn_groups * max_boxes` for fixed groups, else `2 * max(dn_number, max_boxes)` (enough
    for `dn_number // n` groups of `2n`, and for one group when n > dn_number).
  """
  if dn_groups > 0:
    return 2 * dn_groups * max_boxes
  return 2 * max(dn_number, max_boxes)


def _noisy_boxes(key, boxes, negative, box_noise_scale):
  """DINO box noise: corners move by sign * U[0,1) (+1 for negatives) * scale * size / 2.

  Args:
    key: PRNG key.
    boxes: [B, D, 4] normalised cxcywh.
    negative: [B, D] bool.
    box_noise_scale: float.

  Returns:
    [B, D, 4] normalised cxcywh, corners clipped to [0, 1].
  """
  if box_noise_scale <= 0:
    return boxes
  k_sign, k_part = jax.random.split(key)
  xyxy = box_ops.box_cxcywh_to_xyxy(boxes)
  half = jnp.concatenate([boxes[..., 2:], boxes[..., 2:]], axis=-1) / 2
  sign = jax.random.bernoulli(k_sign, 0.5, boxes.shape).astype(boxes.dtype) * 2 - 1
  part = jax.random.uniform(k_part, boxes.shape, boxes.dtype) + negative[..., None]
  xyxy = jnp.clip(xyxy + sign * part * half * box_noise_scale, 0.0, 1.0)
  return box_ops.box_xyxy_to_cxcywh(xyxy)


def build_denoising_queries(key, boxes, labels, valid, *, num_classes, dn_number,
                            label_noise_ratio, box_noise_scale, dn_groups=0):
  """Noised denoising queries with their known assignment, in fixed-size slots.

  Args:
    key: PRNG key for label and box noise.
    boxes: [B, G, 4] ground truth, normalised cxcywh.
    labels: [B, G] int32 class ids in [0, num_classes).
    valid: [B, G] bool, False on padded ground truth (valid entries may be anywhere).
    num_classes: labels are resampled uniformly in [0, num_classes) when flipped.
    dn_number: per-image budget of positive queries (100 in DINO).
    label_noise_ratio: a label is flipped with probability label_noise_ratio / 2.
    box_noise_scale: DINO's box noise scale (0.4).
    dn_groups: fixed group count if > 0, else `max(1, dn_number // n)` per image.

  Returns:
    dict of:
      labels: [B, D] int32 noised labels (0 on invalid slots),
      boxes_unsigmoid: [B, D, 4] inverse_sigmoid of the noised cxcywh boxes (0 on invalid
        slots),
      gt_index: [B, D] int32 ground-truth column each slot reconstructs, -1 on invalid slots,
      positive: [B, D] bool,
      valid: [B, D] bool (positive or negative real slot),
      group: [B, D] int32 group id, a unique negative id on invalid slots (for the mask).
  """
  b, g = valid.shape
  d = dn_slot_count(dn_number=dn_number, max_boxes=g, dn_groups=dn_groups)
  count = jnp.sum(valid, axis=1).astype(jnp.int32)  # [B]
  if dn_groups > 0:
    groups = jnp.full((b,), dn_groups, jnp.int32)
  else:
    groups = jnp.maximum(dn_number // jnp.maximum(count, 1), 1)
  slot = jnp.arange(d, dtype=jnp.int32)[None, :]  # [1, D]
  per_group = jnp.maximum(2 * count, 1)[:, None]  # [B, 1]
  group = slot // per_group  # [B, D]
  within = slot % per_group
  rank = within % jnp.maximum(count, 1)[:, None]  # which valid box, in column order
  slot_valid = (count[:, None] > 0) & (group < groups[:, None])
  positive = slot_valid & (within < count[:, None])
  # Columns of the valid boxes first, in their original order (valid need not be leading).
  order = jnp.argsort(~valid, axis=1, stable=True).astype(jnp.int32)  # [B, G]
  gt_index = jnp.where(slot_valid, jnp.take_along_axis(order, rank, axis=1), -1)
  safe_index = jnp.maximum(gt_index, 0)
  gt_boxes = jnp.take_along_axis(boxes, safe_index[..., None], axis=1)  # [B, D, 4]
  gt_labels = jnp.take_along_axis(labels, safe_index, axis=1)  # [B, D]

  k_flip, k_label, k_box = jax.random.split(key, 3)
  flip = jax.random.uniform(k_flip, (b, d)) < label_noise_ratio * 0.5
  random_labels = jax.random.randint(k_label, (b, d), 0, num_classes, jnp.int32)
  noised_labels = jnp.where(flip, random_labels, gt_labels).astype(jnp.int32)
  noised_boxes = _noisy_boxes(k_box, gt_boxes.astype(jnp.float32), slot_valid & ~positive,
                              box_noise_scale)
  return {
      "labels": jnp.where(slot_valid, noised_labels, 0),
      "boxes_unsigmoid": jnp.where(slot_valid[..., None], inverse_sigmoid(noised_boxes), 0.0),
      "gt_index": gt_index,
      "positive": positive,
      "valid": slot_valid,
      "group": jnp.where(slot_valid, group, -1 - slot),
  }


def denoising_attention_mask(group, num_queries):
  """Decoder self-attention mask over [denoising slots, matching queries]; True = blocked.

  As DINO's `attn_mask`: matching queries do not see denoising slots; a denoising slot sees
  its own group and every matching query.

  Args:
    group: [B, D] int32 group id per slot (unique negative ids for invalid slots).
    num_queries: Q matching queries.

  Returns:
    [B, D + Q, D + Q] bool.
  """
  b, d = group.shape
  t = d + num_queries
  is_dn = jnp.arange(t) < d  # [T]
  group_t = jnp.concatenate([group, jnp.zeros((b, num_queries), group.dtype)], axis=1)
  other_group = group_t[:, :, None] != group_t[:, None, :]  # [B, T, T]
  dn_to_dn_blocked = is_dn[None, :, None] & is_dn[None, None, :] & other_group
  match_to_dn_blocked = ~is_dn[None, :, None] & is_dn[None, None, :]
  return dn_to_dn_blocked | match_to_dn_blocked
