"""Host-side augmentation: DETR training views, eval resize, Semi-DETR weak / strong views.

Every view is split in two steps:

1. a *geometry plan* (`Geometry`), drawn from a numpy Generator using only the image size: the
   list of crop / resize / flip / affine ops, the output size, and the 3x3 matrix `matrix` that
   maps original-image pixel coordinates (x, y, 1) to view pixel coordinates. Because the plan
   needs no pixels, every process can compute the output size of every example of a global batch
   and all agree on the padded shape bucket without communicating;
2. `apply_geometry` runs the ops on the pixels (PIL), `transform_boxes` maps boxes with the
   matrix, and `apply_strong_view` runs a strong view (geometry, colour op, erasing).

Coordinates are continuous pixels (pixel i covers [i, i+1)), so a resize by s maps x to s * x
and a flip maps x to W - x exactly, as DETR's datasets/transforms.py (hflip, resize) does to
boxes. Boxes under a rotation or shear become the enclosing box of their four mapped corners,
clipped to the view, as Soft Teacher's geometric augmentation does. Weak-view boxes map to the
strong view with `strong.matrix @ inv(weak.matrix)` (`map_boxes_between_views`); this is exact
whenever the weak view is axis aligned (resize / flip / crop), which it is.

Randomness: every function takes an explicit numpy Generator; the pipeline seeds them from
(seed, step, example slot), never the global numpy state.
"""
from __future__ import annotations

import dataclasses

import numpy as np
from PIL import Image, ImageEnhance, ImageFilter, ImageOps

IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32)
ERASE_FILL = 125  # Semi-DETR / Soft Teacher's erasing and affine fill value
COLOR_OPS = ("identity", "autocontrast", "equalize", "solarize", "color", "contrast",
             "brightness", "sharpness", "posterize")


@dataclasses.dataclass(frozen=True)
class AugmentConfig:
  """Augmentation settings.

  Attributes:
    scales: shorter-side sizes drawn uniformly for training views (DINO: 480..800 step 32).
    max_size: cap on the longer side after resizing (DINO: 1333).
    random_crop: DETR's RandomSelect: with probability 1/2 resize to one of `crop_scales`
      (no cap), crop a random (w, h) in [crop_size[0], crop_size[1]], then resize to `scales`.
    crop_scales: shorter sides of the pre-crop resize (DINO: 400, 500, 600).
    crop_size: (min, max) side of the random crop (DINO: 384, 600).
    hflip_prob: horizontal flip probability.
    eval_size, eval_max_size: eval resize of the shorter side, and its cap (800, 1333).
    labeled_color_op: apply one random colour op to labeled training views (Semi-DETR's
      supervised pipeline does; plain DINO does not).
    strong_translate, strong_rotate, strong_shear: strong-view geometric ranges, as a
      fraction of the side, degrees, and the shears' "degrees" (Semi-DETR: 0.1, 30, 30; see
      `strong_affine`); one op is drawn per view.
    erase_patches: (min, max) number of erasing patches, inclusive (Semi-DETR: 1..4).
    erase_max_size: max ratio of an erasing patch's sides to the view's sides (0.2; one ratio
      for both sides: the patch has the view's aspect).
    blur_prob: Gaussian blur probability on strong views (Semi-DETR: none; the issue's spec
      mentions blur, so it is available).
  """
  scales: tuple = tuple(range(480, 801, 32))
  max_size: int = 1333
  random_crop: bool = True
  crop_scales: tuple = (400, 500, 600)
  crop_size: tuple = (384, 600)
  hflip_prob: float = 0.5
  eval_size: int = 800
  eval_max_size: int = 1333
  labeled_color_op: bool = False
  strong_translate: float = 0.1
  strong_rotate: float = 30.0
  strong_shear: float = 30.0
  erase_patches: tuple = (1, 4)
  erase_max_size: float = 0.2
  blur_prob: float = 0.0


@dataclasses.dataclass(frozen=True)
class Geometry:
  """A planned geometric view.

  Attributes:
    ops: ops in order: ("crop", x0, y0, w, h), ("resize", h, w), ("hflip",), ("affine", A,
      *record) with A a 3x3 float64 matrix acting on the current pixel coordinates (strong
      views record (kind, params), see `strong_affine`).
    size: (h, w) of the view.
    matrix: float64 [3, 3], original pixel (x, y, 1) -> view pixel coordinates.
  """
  ops: tuple
  size: tuple
  matrix: np.ndarray


def resize_output_size(h, w, size, max_size=None):
  """DETR's get_size_with_aspect_ratio: shorter side to `size`, longer side capped.

  As facebookresearch/detr datasets/transforms.py resize.get_size_with_aspect_ratio, except
  that the longer side is clamped to max_size where DETR's rounding overshoots it.

  Returns:
    (out_h, out_w) ints.
  """
  if max_size is not None:
    short, long = float(min(h, w)), float(max(h, w))
    if long / short * size > max_size:
      size = int(round(max_size * short / long))
  if (w <= h and w == size) or (h <= w and h == size):
    return h, w
  if w < h:
    oh, ow = int(size * h / w), size
  else:
    oh, ow = size, int(size * w / h)
  if max_size is not None:
    # DETR's rounding can overshoot the cap by a pixel or two; clamp so that a padded bucket
    # of side max_size always holds the view.
    oh, ow = min(oh, max_size), min(ow, max_size)
  return oh, ow


class _Planner:
  """Accumulates ops and the composed matrix while planning a view."""

  def __init__(self, h, w):
    self.h, self.w = int(h), int(w)
    self.ops = []
    self.matrix = np.eye(3)

  def _then(self, op, mat, h, w):
    self.ops.append(op)
    self.matrix = mat @ self.matrix
    self.h, self.w = int(h), int(w)

  def resize(self, size, max_size=None):
    oh, ow = resize_output_size(self.h, self.w, size, max_size)
    if (oh, ow) != (self.h, self.w):
      self._then(("resize", oh, ow), np.diag([ow / self.w, oh / self.h, 1.0]), oh, ow)

  def hflip(self):
    self._then(("hflip",), np.array([[-1.0, 0, self.w], [0, 1, 0], [0, 0, 1]]), self.h, self.w)

  def crop(self, x0, y0, cw, ch):
    self._then(("crop", x0, y0, cw, ch), np.array([[1.0, 0, -x0], [0, 1, -y0], [0, 0, 1]]),
               ch, cw)

  def affine(self, mat, *record):
    self._then(("affine", mat) + tuple(record), mat, self.h, self.w)

  def geometry(self):
    return Geometry(tuple(self.ops), (self.h, self.w), self.matrix)


def _random_size_crop(rng, planner, min_size, max_size):
  """DETR's RandomSizeCrop: side in [min_size, min(side, max_size)], random position."""
  cw = int(rng.integers(min(min_size, planner.w), min(planner.w, max_size) + 1))
  ch = int(rng.integers(min(min_size, planner.h), min(planner.h, max_size) + 1))
  y0 = int(rng.integers(0, planner.h - ch + 1))
  x0 = int(rng.integers(0, planner.w - cw + 1))
  planner.crop(x0, y0, cw, ch)


def plan_train_view(rng, h, w, cfg):
  """DINO's training geometry: flip, then multi-scale resize or resize-crop-resize.

  As IDEA-Research/DINO datasets/coco.py make_coco_transforms('train'): RandomHorizontalFlip,
  then RandomSelect(RandomResize(scales, max_size), [RandomResize(crop_scales),
  RandomSizeCrop(*crop_size), RandomResize(scales, max_size)]).
  """
  p = _Planner(h, w)
  if rng.random() < cfg.hflip_prob:
    p.hflip()
  if cfg.random_crop and rng.random() < 0.5:
    p.resize(int(rng.choice(cfg.crop_scales)))
    _random_size_crop(rng, p, *cfg.crop_size)
  p.resize(int(rng.choice(cfg.scales)), cfg.max_size)
  return p.geometry()


def plan_eval_view(h, w, cfg):
  """Eval geometry: resize the shorter side to eval_size, longer side capped."""
  p = _Planner(h, w)
  p.resize(cfg.eval_size, cfg.eval_max_size)
  return p.geometry()


STRONG_AFFINES = ("translate_x", "translate_y", "rotate", "shear_xy")


def strong_affine(kind, h, w, params):
  """The 3x3 matrix (view pixel -> view pixel) of one of Semi-DETR's strong geometric ops.

  As the ops of Semi-DETR's strong pipeline (detr_ssod/datasets/pipelines/rand_aug.py, matrices
  as its geo_utils.py records them for the box mapping; mmcv's warps):
    * "translate_x" / "translate_y": RandTranslate, params (fraction,): shift by fraction * w
      (or h) pixels;
    * "rotate": RandRotate, params (degrees,): cv2.getRotationMatrix2D(centre, -degrees, 1),
      i.e. [[cos a, -sin a], [sin a, cos a]] about the centre (clockwise on screen for a > 0),
      the centre being (w / 2, h / 2) in continuous pixels, which is where cv2 rotates the
      image (the reference's box matrix uses ((w - 1) / 2, (h - 1) / 2), half a pixel off its
      own image);
    * "shear_xy": RandShear(x) then RandShear(y), params (x degrees, y degrees): horizontal
      factor m_x = tanh(-x * pi / 180), vertical m_y = tanh(y * pi / 180) (the reference's
      `np.tanh`, not tan: |m| <= 0.48 at 30 degrees), both about the origin (mmcv.imshear has
      no centring): [[1, 0, 0], [m_y, 1, 0]] @ [[1, m_x, 0], [0, 1, 0]]. The pixels are
      warped once with the product (the reference warps twice, losing what the first shear
      moves out of the view) and boxes are the enclosing box of their corners under the
      product, as the reference maps pseudo boxes between views (it boxes its strong-view
      ground truth, unused for unlabeled images, after each shear).

  Returns:
    float64 [3, 3].
  """
  mat = np.eye(3)
  if kind == "translate_x":
    mat[0, 2] = params[0] * w
  elif kind == "translate_y":
    mat[1, 2] = params[0] * h
  elif kind == "rotate":
    a = np.deg2rad(params[0])
    cx, cy = w / 2.0, h / 2.0
    c, s = np.cos(a), np.sin(a)
    mat = np.array([[c, -s, (1 - c) * cx + s * cy], [s, c, -s * cx + (1 - c) * cy], [0, 0, 1]])
  elif kind == "shear_xy":
    shear_x = np.array([[1.0, np.tanh(np.deg2rad(-params[0])), 0], [0, 1, 0], [0, 0, 1]])
    shear_y = np.array([[1.0, 0, 0], [np.tanh(np.deg2rad(params[1])), 1, 0], [0, 0, 1]])
    mat = shear_y @ shear_x
  else:
    raise ValueError(f"strong_affine: kind must be one of {STRONG_AFFINES}, got {kind!r}")
  return mat


def plan_semi_view(rng, h, w, cfg, *, strong):
  """Semi-DETR's unlabeled view geometry: resize, flip; strong views add one geometric op.

  As Semi-DETR's strong / weak pipelines (configs/detr_ssod/base_dino_detr_ssod_coco.py):
  RandResize(scales, max_size), RandFlip, and for the strong view one of (uniformly, OneOf)
  translate x by U(-t, t) * w, translate y by U(-t, t) * h, rotate by U(-r, r) degrees, or
  shear x then shear y by U(-s, s) "degrees" each (`strong_affine`), the view size kept. The
  op is recorded as ("affine", A, kind, params). Its pixels: `apply_strong_view`.
  """
  p = _Planner(h, w)
  p.resize(int(rng.choice(cfg.scales)), cfg.max_size)
  if rng.random() < cfg.hflip_prob:
    p.hflip()
  if strong:
    kind = STRONG_AFFINES[int(rng.integers(len(STRONG_AFFINES)))]
    if kind in ("translate_x", "translate_y"):
      params = (float(rng.uniform(-cfg.strong_translate, cfg.strong_translate)),)
    elif kind == "rotate":
      params = (float(rng.uniform(-cfg.strong_rotate, cfg.strong_rotate)),)
    else:
      params = tuple(float(rng.uniform(-cfg.strong_shear, cfg.strong_shear)) for _ in range(2))
    p.affine(strong_affine(kind, p.h, p.w, params), kind, params)
  return p.geometry()


def _run_ops(image, ops):
  """Runs planned geometry ops on a uint8 [H, W, 3] image (PIL)."""
  pil = Image.fromarray(image)
  for op in ops:
    if op[0] == "resize":
      pil = pil.resize((op[2], op[1]), Image.BILINEAR)
    elif op[0] == "hflip":
      pil = pil.transpose(Image.FLIP_LEFT_RIGHT)
    elif op[0] == "crop":
      _, x0, y0, cw, ch = op[:5]
      pil = pil.crop((x0, y0, x0 + cw, y0 + ch))
    else:
      # PIL samples output pixel centre c at input inv(A) (c) in continuous coordinates.
      inv = np.linalg.inv(op[1])
      pil = pil.transform(pil.size, Image.AFFINE, data=tuple(inv[:2].ravel()),
                          resample=Image.BILINEAR, fillcolor=(ERASE_FILL,) * 3)
  return np.asarray(pil)


def apply_geometry(image, geometry):
  """Runs a planned geometry on an image.

  Args:
    image: uint8 [H, W, 3].
    geometry: Geometry planned for this image's size.

  Returns:
    uint8 [h, w, 3] with (h, w) = geometry.size.
  """
  out = _run_ops(image, geometry.ops)
  assert out.shape[:2] == tuple(geometry.size), (out.shape, geometry.size)
  return out


def transform_boxes(boxes, matrix, size):
  """Maps absolute xyxy boxes with a 3x3 matrix: enclosing box of the corners, clipped.

  Args:
    boxes: float [N, 4] absolute (x0, y0, x1, y1) pixels in the source image.
    matrix: [3, 3] source pixel -> destination pixel coordinates.
    size: (h, w) of the destination image, for clipping.

  Returns:
    (boxes float32 [N, 4] absolute xyxy in the destination, keep bool [N]: positive width and
    height after clipping; DETR drops the others).
  """
  boxes = np.asarray(boxes, np.float64).reshape(-1, 4)
  x0, y0, x1, y1 = boxes.T
  corners = np.stack([np.stack([x0, y0], -1), np.stack([x1, y0], -1),
                      np.stack([x0, y1], -1), np.stack([x1, y1], -1)], axis=1)  # [N, 4, 2]
  mapped = corners @ matrix[:2, :2].T + matrix[:2, 2]
  out = np.concatenate([mapped.min(axis=1), mapped.max(axis=1)], axis=-1)
  h, w = size
  out = np.clip(out, 0.0, [w, h, w, h])
  keep = (out[:, 2] > out[:, 0]) & (out[:, 3] > out[:, 1])
  return out.astype(np.float32), keep


def map_boxes_between_views(boxes_cxcywh, src_matrix, dst_matrix, src_size, dst_size, xp=np):
  """Maps normalised cxcywh boxes from one view of an image to another (e.g. weak -> strong).

  Uses dst_matrix @ inv(src_matrix) on the boxes' corners (enclosing box, clipped), as
  Semi-DETR maps teacher pseudo-boxes to the student view. Works under jit with xp=jax.numpy.

  Args:
    boxes_cxcywh: [..., N, 4] normalised (cx, cy, w, h) relative to the source view.
    src_matrix, dst_matrix: [..., 3, 3] original -> view pixel matrices of both views.
    src_size, dst_size: [..., 2] (h, w) of both views.
    xp: array namespace (numpy or jax.numpy).

  Returns:
    [..., N, 4] normalised (cx, cy, w, h) relative to the destination view.
  """
  rel = dst_matrix @ xp.linalg.inv(src_matrix)  # [..., 3, 3]
  sh, sw = src_size[..., 0:1], src_size[..., 1:2]  # [..., 1]
  dh, dw = dst_size[..., 0:1], dst_size[..., 1:2]
  cx, cy = boxes_cxcywh[..., 0] * sw, boxes_cxcywh[..., 1] * sh
  hw, hh = boxes_cxcywh[..., 2] * sw / 2, boxes_cxcywh[..., 3] * sh / 2
  xs = xp.stack([cx - hw, cx + hw, cx - hw, cx + hw], axis=-1)  # [..., N, 4 corners]
  ys = xp.stack([cy - hh, cy - hh, cy + hh, cy + hh], axis=-1)
  r = rel[..., None, :, :]  # broadcast over boxes
  mx = r[..., 0, 0:1] * xs + r[..., 0, 1:2] * ys + r[..., 0, 2:3]
  my = r[..., 1, 0:1] * xs + r[..., 1, 1:2] * ys + r[..., 1, 2:3]
  x0 = xp.clip(mx.min(-1), 0, dw)
  x1 = xp.clip(mx.max(-1), 0, dw)
  y0 = xp.clip(my.min(-1), 0, dh)
  y1 = xp.clip(my.max(-1), 0, dh)
  return xp.stack([(x0 + x1) / 2 / dw, (y0 + y1) / 2 / dh, (x1 - x0) / dw, (y1 - y0) / dh],
                  axis=-1)


def random_color_op(rng, image):
  """One of Soft Teacher's 9 colour ops at a random level 1..9 (uint8 [H, W, 3] in and out).

  Levels map to magnitudes m = level / 10; enhance factors are 1 +- 0.9 m, solarize threshold
  256 (1 - m), posterize keeps 8 - round(4 m) bits.
  """
  op = COLOR_OPS[int(rng.integers(len(COLOR_OPS)))]
  m = int(rng.integers(1, 10)) / 10.0
  sign = 1.0 if rng.random() < 0.5 else -1.0
  if op == "identity":
    return image
  pil = Image.fromarray(image)
  if op == "autocontrast":
    pil = ImageOps.autocontrast(pil)
  elif op == "equalize":
    pil = ImageOps.equalize(pil)
  elif op == "solarize":
    pil = ImageOps.solarize(pil, threshold=int(256 * (1 - m)))
  elif op == "posterize":
    pil = ImageOps.posterize(pil, 8 - int(round(4 * m)))
  else:
    enhancer = {"color": ImageEnhance.Color, "contrast": ImageEnhance.Contrast,
                "brightness": ImageEnhance.Brightness, "sharpness": ImageEnhance.Sharpness}[op]
    pil = enhancer(pil).enhance(1.0 + sign * 0.9 * m)
  return np.asarray(pil)


def plan_erase(rng, h, w, cfg):
  """Semi-DETR's RandErase patches (n_iterations=(1, 5), size=[0, 0.2], squared=True).

  As detr_ssod/datasets/pipelines/rand_aug.py RandErase: n ~ randint(lo, hi + 1) patches; each
  draws one ratio r ~ U(0, erase_max_size) for both sides, so the patch has the image's aspect
  (int(r * h) x int(r * w) pixels; "squared" means one ratio, not a square), and its top-left
  corner px ~ randint(0, w - pw), py ~ randint(0, h - ph) (exclusive upper bounds, as
  np.random.randint).

  Args:
    rng: numpy Generator.
    h, w: view size.
    cfg: AugmentConfig (`erase_patches` inclusive (min, max) count, `erase_max_size`).

  Returns:
    list of (x0, y0, x1, y1) int pixel patches (x1 - x0 = int(r * w), possibly 0).
  """
  patches = []
  for _ in range(int(rng.integers(cfg.erase_patches[0], cfg.erase_patches[1] + 1))):
    r = float(rng.uniform(0.0, cfg.erase_max_size))
    ph, pw = int(r * h), int(r * w)
    px = int(rng.integers(0, max(w - pw, 1)))
    py = int(rng.integers(0, max(h - ph, 1)))
    patches.append((px, py, px + pw, py + ph))
  return patches


def erase(image, patches):
  """A copy of uint8 [H, W, 3] `image` with every (x0, y0, x1, y1) patch set to ERASE_FILL."""
  image = np.array(image)  # writable copy
  for x0, y0, x1, y1 in patches:
    image[y0:y1, x0:x1] = ERASE_FILL
  return image


def apply_strong_view(rng, image, geometry, cfg):
  """The pixels of a strong view: Semi-DETR's strong pipeline on an original image.

  Resize and flip (the geometry's ops before its affine op), then one colour op and the
  geometric op in random order (ShuffledSequential: each order with probability 1/2), then
  optional blur (`blur_prob`, not in Semi-DETR) and the erasing patches (`plan_erase`, always
  last, boxes unchanged).

  Args:
    rng: numpy Generator for the photometric draws (order, colour op, blur, patches).
    image: uint8 [H, W, 3] original image.
    geometry: the strong view's `plan_semi_view(..., strong=True)` for this image.
    cfg: AugmentConfig.

  Returns:
    uint8 [h, w, 3] with (h, w) = geometry.size.
  """
  ops = geometry.ops
  split = next((i for i, op in enumerate(ops) if op[0] == "affine"), len(ops))
  color_first = rng.random() < 0.5
  out = _run_ops(image, ops[:split])
  if color_first:
    out = random_color_op(rng, out)
  out = _run_ops(out, ops[split:])
  if not color_first:
    out = random_color_op(rng, out)
  if cfg.blur_prob > 0 and rng.random() < cfg.blur_prob:
    radius = float(rng.uniform(0.1, 2.0))
    out = np.asarray(Image.fromarray(out).filter(ImageFilter.GaussianBlur(radius)))
  out = erase(out, plan_erase(rng, *out.shape[:2], cfg))
  assert out.shape[:2] == tuple(geometry.size), (out.shape, geometry.size)
  return out


_NORM_SCALE = (1.0 / (255.0 * IMAGENET_STD)).astype(np.float32)
_NORM_OFFSET = (IMAGENET_MEAN / IMAGENET_STD).astype(np.float32)


def normalize_image(image, out=None):
  """uint8 [H, W, 3] RGB -> float32 ImageNet-normalised (x / 255 - mean) / std [H, W, 3].

  Args:
    image: uint8 [H, W, 3].
    out: optional float32 [H, W, 3] destination (e.g. a slice of the padded batch).
  """
  # In-place ops on a contiguous temporary: mixed-dtype ufuncs into a strided `out` are ~2x
  # slower (numpy's buffered casting), and this is the pipeline's hottest loop.
  tmp = image.astype(np.float32)
  tmp *= _NORM_SCALE
  tmp -= _NORM_OFFSET
  if out is None:
    return tmp
  out[...] = tmp
  return out


def normalize_image_jax(image, pixel_mask):
  """On-device normalisation of a uint8 batch (config.data.host_normalize=False).

  Args:
    image: uint8 [B, H, W, 3] RGB, padded.
    pixel_mask: bool [B, H, W], True on real pixels.

  Returns:
    float32 [B, H, W, 3], equal to the host path: normalised, zero in padding.
  """
  import jax.numpy as jnp  # host-side users of this module need no jax
  out = image.astype(jnp.float32) * _NORM_SCALE - _NORM_OFFSET
  return jnp.where(pixel_mask[..., None], out, 0.0)
