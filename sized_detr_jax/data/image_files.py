"""Sources over plain images without annotations (files, or decoded arrays), for prediction."""
import os

import numpy as np
from PIL import Image

from sized_detr_jax.data import coco

# File name endings taken as images when a folder is listed (case-insensitive).
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp")


def images_in(folder: str) -> list[str]:
  """Names of the image files in `folder` (by `IMAGE_SUFFIXES`; not recursive), sorted."""
  return sorted(n for n in os.listdir(folder) if n.lower().endswith(IMAGE_SUFFIXES))


class ImageFilesSource:
  """Random-access source of image files, in the same example format as `coco.CocoSource`.

  Image ids are the positions 0..N-1 in `paths`; every example has no boxes.
  """

  def __init__(self, paths):
    self.paths = list(paths)
    if not self.paths:
      raise ValueError("no image files given (--image)")
    sizes = []
    for path in self.paths:
      try:
        with Image.open(path) as pil:
          sizes.append((pil.height, pil.width))
      except (OSError, SyntaxError, ValueError) as e:
        raise coco.CocoFormatError(f"{path}: cannot read image: {e}") from None
    self._sizes = np.asarray(sizes, np.int32)
    self.image_ids = np.arange(len(self.paths), dtype=np.int64)

  def __len__(self):
    return len(self.paths)

  def image_sizes(self):
    return self._sizes

  def __getitem__(self, i):
    return _example(coco.decode_image(self.paths[i], i, self._sizes[i]), i)


class DecodedImagesSource:
  """Random-access source over decoded uint8 RGB [H, W, 3] arrays (no annotations), in the
  example format of `coco.CocoSource`; image ids are the positions 0..N-1."""

  def __init__(self, images):
    self.images = list(images)
    self.image_ids = np.arange(len(self.images), dtype=np.int64)

  def __len__(self):
    return len(self.images)

  def image_sizes(self):
    return np.asarray([image.shape[:2] for image in self.images], np.int32).reshape(-1, 2)

  def __getitem__(self, i):
    return _example(self.images[i], i)


def _example(image, i):
  """The example dict of image i (uint8 [H, W, 3]): no boxes."""
  return {"image": image, "image_id": np.int64(i), "boxes": np.zeros((0, 4), np.float32),
          "labels": np.zeros((0,), np.int32), "iscrowd": np.zeros((0,), bool),
          "orig_size": np.asarray(image.shape[:2], np.int32)}
