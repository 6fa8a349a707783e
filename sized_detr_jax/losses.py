"""Per-element detection losses: Sized L1, L1, GIoU, sigmoid focal, task-aligned focal and quality
focal loss, and the box-loss registry `BOX_LOSSES` that every criterion and matching cost dispatches on.

Every function is pure jnp, safe under `jit`, `vmap` and `grad`, works on any leading batch
shape, and returns *unreduced* values: the caller picks the normaliser (DINO divides by the
number of ground-truth boxes in the global batch). Padded entries are excluded by a boolean
`valid` mask (they come back as exact zeros, with zero gradient), never by Python lists.

Boxes are normalised `(cx, cy, w, h)` (cxcywh), as the DETR family predicts them.

The Sized L1 loss ("Unbiased Regression Loss for DETRs", section 3.4) weights the L1 error of
each coordinate by the inverse size of the *ground-truth* box:

    L_sized(b_hat, b) = (|cx_hat - cx| + |w_hat - w|) / w  +  (|cy_hat - cy| + |h_hat - h|) / h

so a 2-pixel error on a 10-pixel box costs as much as a 20-pixel error on a 100-pixel box; plain
L1 (`|cx_hat - cx| + |cy_hat - cy| + |w_hat - w| + |h_hat - h|`) charges the big box ten times more.
With `rescale=True` the x/w part is multiplied by the mean ground-truth width and the y/h part by
the mean ground-truth height ("adjust the weight term by the average dimensions of the boxes prior
to normalization"), so the loss keeps L1's overall magnitude and L1's loss weight (5.0 in DINO)
still fits.
"""
from collections.abc import Hashable, Sequence

import chex
import jax
import jax.numpy as jnp

from sized_detr_jax import box_ops

# Smallest target width/height used as a divisor in Sized L1 (normalised units: 1e-4 is 0.13 px
# on a 1333-px side). Real COCO boxes are far larger; the clamp only keeps degenerate or padded
# targets finite.
SIZED_L1_EPS = 1e-4
# A mesh axis name, a tuple of them (inside shard_map), or None (under jit: global arrays).
AxisName = Hashable | Sequence[Hashable] | None


def _masked(values, valid):
  """Zero out entries where `valid` is False (value and gradient)."""
  return jnp.where(valid, values, jnp.zeros_like(values))


def _check_boxes(pred, target, valid):
  """Trace-time shape checks of a (pred, target, valid) triple; `valid` may broadcast."""
  chex.assert_axis_dimension(pred, -1, 4)
  chex.assert_axis_dimension(target, -1, 4)
  chex.assert_rank(valid, {pred.ndim - 1, target.ndim - 1})


def global_sum(x: jax.Array, axis_name: AxisName = None) -> jax.Array:
  """Sum of every element, `psum`-ed over `axis_name` when given (inside shard_map)."""
  total = jnp.sum(x)
  return total if axis_name is None else jax.lax.psum(total, axis_name)


def l1_loss(pred: jax.Array, target: jax.Array, valid: jax.Array) -> jax.Array:
  """L1 box loss summed over the 4 coordinates.

  Args:
    pred: [..., 4] predicted boxes, normalised cxcywh.
    target: [..., 4] ground-truth boxes, normalised cxcywh.
    valid: [...] bool, False for padded pairs.

  Returns:
    [...] `sum_j |pred_j - target_j|`, 0 where `valid` is False.
  """
  _check_boxes(pred, target, valid)
  return _masked(jnp.sum(jnp.abs(pred - target), axis=-1), valid)


def mean_target_size(target: jax.Array, valid: jax.Array, *,
                     axis_name: AxisName = None) -> tuple[jax.Array, jax.Array]:
  """Mean width and height of the valid targets: ([], []) scalars.

  Inside `jax.jit` the mean runs over the global (possibly sharded) array. Inside `shard_map`
  pass the mesh axis name(s) of the batch so the per-shard sums and counts are `psum`-ed.
  With no valid target the means are 0 (the count is clamped at 1).
  """
  v = valid.astype(target.dtype)
  sums = jnp.stack([jnp.sum(target[..., 2] * v), jnp.sum(target[..., 3] * v), jnp.sum(v)])
  if axis_name is not None:
    sums = jax.lax.psum(sums, axis_name)
  count = jnp.maximum(sums[2], 1.0)
  return sums[0] / count, sums[1] / count


def sized_l1_loss(pred: jax.Array, target: jax.Array, valid: jax.Array, *, rescale: bool = False,
                  eps: float = SIZED_L1_EPS, axis_name: AxisName = None) -> jax.Array:
  """Sized L1 loss: L1 with each target's x/w errors divided by its width, y/h by its height.

  Per box (normalised cxcywh; `w_t`, `h_t` the target's width and height clamped below by eps):

      (|dcx| + |dw|) / w_t + (|dcy| + |dh|) / h_t

  It is invariant to scaling all boxes (pred and target) by the same factor.

  Args:
    pred: [..., 4] predicted boxes, normalised cxcywh.
    target: [..., 4] ground-truth boxes, normalised cxcywh.
    valid: [...] bool, False for padded pairs (their loss and gradient are exactly 0).
    rescale: multiply the x/w terms by the mean target width and the y/h terms by the mean
      target height over all valid boxes in `target` (every leading dim), which restores L1's
      scale. Under `jax.jit` this mean is global even when the batch is sharded.
    eps: lower clamp for target width and height (keeps zero-size targets finite, gradients
      included).
    axis_name: only for use inside `shard_map` with `rescale=True`: the mesh axis name (or
      tuple of names) that shards the batch; the sums and counts behind the mean are `psum`-ed
      over it so every shard uses the global mean, e.g.
      `shard_map(partial(sized_l1_loss, rescale=True, axis_name="data"), mesh=mesh,
      in_specs=P("data"), out_specs=P("data"))`. Without it each shard uses its own mean.

  Returns:
    [...] per-box loss, 0 where `valid` is False.
  """
  _check_boxes(pred, target, valid)
  abs_err = jnp.abs(pred - target)
  w_t = jnp.maximum(target[..., 2], eps)
  h_t = jnp.maximum(target[..., 3], eps)
  x_part = (abs_err[..., 0] + abs_err[..., 2]) / w_t
  y_part = (abs_err[..., 1] + abs_err[..., 3]) / h_t
  if rescale:
    mean_w, mean_h = mean_target_size(target, valid, axis_name=axis_name)
    x_part = x_part * mean_w
    y_part = y_part * mean_h
  return _masked(x_part + y_part, valid)


def giou_loss(pred: jax.Array, target: jax.Array, valid: jax.Array) -> jax.Array:
  """GIoU loss `1 - GIoU(pred, target)` of paired boxes.

  Args:
    pred: [..., 4] predicted boxes, normalised cxcywh.
    target: [..., 4] ground-truth boxes, normalised cxcywh.
    valid: [...] bool, False for padded pairs.

  Returns:
    [...] values in [0, 2], 0 where `valid` is False; finite (values and gradients) for
    zero-area boxes.
  """
  _check_boxes(pred, target, valid)
  giou = box_ops.elementwise_generalized_box_iou(
      box_ops.box_cxcywh_to_xyxy(pred), box_ops.box_cxcywh_to_xyxy(target))
  return _masked(1.0 - giou, valid)


def sigmoid_focal_loss(logits, targets, *, alpha=0.25, gamma=2.0):
  """Elementwise sigmoid focal loss (Lin et al. 2017), as used by DINO's classifier.

      p = sigmoid(x);  ce = -t log p - (1 - t) log(1 - p)
      p_t = p t + (1 - p)(1 - t);  loss = alpha_t * ce * (1 - p_t)^gamma
      alpha_t = alpha t + (1 - alpha)(1 - t)   (no alpha weighting if alpha < 0)

  Args:
    logits: [...] raw scores (e.g. [B, Q, C]).
    targets: [...] same shape, in [0, 1] (one-hot labels; soft values are accepted).
    alpha: positive-class weight; negative disables it.
    gamma: focusing exponent.

  Returns:
    [...] per-element loss (same shape as `logits`), unreduced. DINO sums it and divides by the
    number of boxes.
  """
  chex.assert_rank(targets, logits.ndim)
  targets = targets.astype(logits.dtype)
  log_p = jax.nn.log_sigmoid(logits)
  log_not_p = jax.nn.log_sigmoid(-logits)
  ce = -(targets * log_p + (1.0 - targets) * log_not_p)
  p = jnp.exp(log_p)
  p_t = p * targets + (1.0 - p) * (1.0 - targets)
  loss = ce * (1.0 - p_t) ** gamma
  if alpha >= 0:
    loss = (alpha * targets + (1.0 - alpha) * (1.0 - targets)) * loss
  return loss


def task_aligned_focal_loss(logits, soft_targets, *, gamma=2.0):
  """Task-aligned focal loss `BCE(p, y) * |y - p|^gamma`, elementwise (unreduced).

  Semi-DETR's detr_od/models/losses/task_aligned_focal_loss.py `task_aigned_focal_loss` (a
  quality focal loss with the normalised alignment as the soft label); the caller sums it and
  divides by the (global) sum of soft targets, clamped at >= 1.

  Args:
    logits: [..., C] class logits.
    soft_targets: [..., C] in [0, 1] (see `matching.task_aligned_class_targets`).
    gamma: modulating exponent (2).

  Returns:
    [..., C] per-element loss.
  """
  chex.assert_equal_shape([logits, soft_targets])
  soft_targets = soft_targets.astype(logits.dtype)
  bce = -(soft_targets * jax.nn.log_sigmoid(logits)
          + (1.0 - soft_targets) * jax.nn.log_sigmoid(-logits))
  return bce * jnp.abs(soft_targets - jax.nn.sigmoid(logits))**gamma


def quality_focal_loss(logits, labels, scores, valid=None, *, beta=2.0):
  """Elementwise quality focal loss (Li et al. 2020, GFL), Co-DINO's main-head classifier.

  mmdet's `QualityFocalLoss(use_sigmoid=True, beta=2.0)` (mmdet/models/losses/gfocal_loss.py
  `quality_focal_loss`), as Co-DETR's `CoDINOHead.loss_single` calls it: with p = sigmoid(x),
  every (query, class) element is a negative supervised towards 0,

      loss = BCE(x, 0) * p^beta,

  except the matched class of a positive query, supervised towards its quality score s,

      loss = BCE(x, s) * |s - p|^beta,

  i.e. `task_aligned_focal_loss(x, t, gamma=beta)` with the soft target t = s at (query, label),
  0 elsewhere. The modulating factor is not detached (as in mmdet); `scores` are constants
  (stop_gradient): Co-DETR computes them as the IoU of the *detached* predicted box with its
  ground truth (`bbox_overlaps(pred.detach(), gt, is_aligned=True)`), 0 for negatives.

  Args:
    logits: [..., C] raw class scores (e.g. [B, Q, C]).
    labels: [...] int class index of the matched ground truth, background where < 0 or >= C;
      or [..., C] one-hot (bool or 0/1 float; an all-zero row is background).
    scores: [...] quality target of each query (read only at positives), in [0, 1].
    valid: optional [...] bool, False for slots that take no loss (e.g. padded denoising
      slots): their loss and gradient are exactly 0.
    beta: modulating exponent (2.0).

  Returns:
    [..., C] per-element loss, unreduced. Co-DETR sums it and divides by `avg_factor` = the
    number of positives (matched queries), averaged over devices and clamped at 1.
  """
  if labels.ndim == logits.ndim:
    onehot = labels.astype(logits.dtype)
  elif labels.ndim == logits.ndim - 1:
    onehot = jax.nn.one_hot(labels, logits.shape[-1], dtype=logits.dtype)  # out of range -> 0
  else:
    raise ValueError(f"quality_focal_loss: labels must be [...] or [..., C] for logits "
                     f"{logits.shape}, got {labels.shape}")
  soft = onehot * jax.lax.stop_gradient(scores).astype(logits.dtype)[..., None]
  loss = task_aligned_focal_loss(logits, soft, gamma=beta)
  if valid is not None:
    loss = _masked(loss, valid[..., None])
  return loss


# ---------------------------------------------------------------------------------------------
# The box-loss registry: `config.criterion.bbox_loss` / `matcher_box_cost` name an entry. Every
# entry is `fn(pred [..., 4], target [..., 4], valid [...], *, rescale, axis_name) -> [...]`.


def _l1_entry(pred, target, valid, *, rescale=False, axis_name=None):
  del rescale, axis_name  # L1 has no size normalisation to rescale
  return l1_loss(pred, target, valid)


BOX_LOSSES = {"l1": _l1_entry, "sized_l1": sized_l1_loss}


def box_loss(name: str, pred: jax.Array, target: jax.Array, valid: jax.Array, *,
             rescale: bool = False, axis_name: AxisName = None) -> jax.Array:
  """The registered box regression loss `name`, per box: [..., 4] x [..., 4] -> [...].

  Args:
    name: a `BOX_LOSSES` key ("l1" or "sized_l1").
    pred, target, valid: as `l1_loss` (normalised cxcywh; `valid` broadcasts).
    rescale, axis_name: Sized L1's mean-size rescaling (see `sized_l1_loss`); ignored by L1.

  Raises:
    ValueError: unknown name.
  """
  if name not in BOX_LOSSES:
    raise ValueError(f"box loss must be one of {tuple(BOX_LOSSES)}, got {name!r}")
  return BOX_LOSSES[name](pred, target, valid, rescale=rescale, axis_name=axis_name)
