"""ImageFilesSource and draw_detections (the pieces of run.py --mode=predict)."""
import numpy as np
import pytest
from PIL import Image

from sized_detr_jax import visualize
from sized_detr_jax.data import coco
from sized_detr_jax.data import image_files


def test_image_files_source_and_errors(tmp_path):
  Image.fromarray(np.full((20, 30, 3), 7, np.uint8)).save(tmp_path / "a.png")
  Image.fromarray(np.full((10, 12), 200, np.uint8)).save(tmp_path / "b.png")  # grayscale
  source = image_files.ImageFilesSource([tmp_path / "a.png", tmp_path / "b.png"])
  assert len(source) == 2
  np.testing.assert_array_equal(source.image_sizes(), [[20, 30], [10, 12]])
  ex = source[1]
  assert ex["image"].shape == (10, 12, 3) and ex["image"].dtype == np.uint8
  assert ex["image_id"] == 1 and ex["boxes"].shape == (0, 4)
  with pytest.raises(coco.CocoFormatError, match="missing.png"):
    image_files.ImageFilesSource([tmp_path / "missing.png"])
  with pytest.raises(ValueError, match="no image files"):
    image_files.ImageFilesSource([])


def test_draw_detections_draws_only_confident_boxes():
  image = np.zeros((40, 40, 3), np.uint8)
  boxes = np.array([[5, 5, 20, 20], [25, 25, 35, 35]], np.float32)
  out = np.asarray(visualize.draw_detections(image, boxes, np.array([0.9, 0.1]), np.array([0, 1]),
                                             ["a", "b"], min_score=0.5))
  assert out.shape == image.shape
  assert out[12, 5].any() and out[5, 12].any()  # edges of the confident box
  assert not out[30, 25].any()  # the low-score box is not drawn
  assert not out[12, 12].any()  # boxes are outlines
