"""What the model reads from a pipeline batch (the batch contract; docs/architecture.md).

A batch dict holds `image [B, H, W, 3]` (float32 ImageNet-normalised, or uint8 when
`config.data.host_normalize=False`), `pixel_mask [B, H, W]` bool (True on real pixels),
`boxes [B, G, 4]` normalised cxcywh, `labels [B, G]` int32, `valid [B, G]` bool, `image_id [B]`,
`orig_size [B, 2]` (h, w) and, for augmented views, `size [B, 2]`.
"""
import jax.numpy as jnp

from sized_detr_jax.data import transforms

TARGET_KEYS = ("boxes", "labels", "valid", "orig_size", "size")


def model_images(batch):
  """Model input images: float ImageNet-normalised (uint8 batches are normalised on device)."""
  if batch["image"].dtype == jnp.uint8:
    return transforms.normalize_image_jax(batch["image"], batch["pixel_mask"])
  return batch["image"]


def model_targets(batch):
  """The batch's target fields (those present among TARGET_KEYS)."""
  return {k: batch[k] for k in TARGET_KEYS if k in batch}
