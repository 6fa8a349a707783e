"""Drawing detections on images (PNG output) for `run.py --mode=predict`."""
import numpy as np
from PIL import Image, ImageDraw

# Distinct outline colours, cycled by label.
_COLOURS = ((230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48), (145, 30, 180),
            (70, 240, 240), (240, 50, 230), (210, 245, 60), (0, 128, 128), (170, 110, 40))


def draw_detections(image, boxes_xyxy, scores, labels, names, *, min_score=0.3):
  """Returns a PIL image with the detections scoring >= min_score drawn on `image`.

  Args:
    image: uint8 [H, W, 3] RGB, original resolution.
    boxes_xyxy: [K, 4] absolute (x0, y0, x1, y1) pixels of the same image.
    scores: [K] floats; labels: [K] contiguous label ids; names: label id -> category name.
    min_score: detections below are not drawn.
  """
  pil = Image.fromarray(np.asarray(image, np.uint8))
  draw = ImageDraw.Draw(pil)
  for box, score, label in zip(np.asarray(boxes_xyxy), np.asarray(scores), np.asarray(labels)):
    if score < min_score:
      continue
    colour = _COLOURS[int(label) % len(_COLOURS)]
    x0, y0, x1, y1 = [float(v) for v in box]
    draw.rectangle([x0, y0, x1, y1], outline=colour, width=2)
    draw.text((x0 + 2, max(y0 - 11, 0)), f"{names[int(label)]} {score:.2f}", fill=colour)
  return pil
