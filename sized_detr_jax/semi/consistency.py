"""Semi-DETR's cross-view query consistency: the RoIAlign projector that makes the consistency
queries' content, and the loss between student and teacher decoder embeddings.

As Semi-DETR's detr_ssod/models/dino_detr_ssod.py (Projector, prepare_unsup_cdn, the
`consis_loss.d{layer}` terms of unsup_loss):
  * content of each consistency query = Projector(RoIAlign 7x7 of the teacher's weak-view
    multi-level features (strides 8/16/32/64, no gradient into the teacher) at the weak-view
    pseudo box); the same content feeds the student's and the teacher's consistency queries;
  * Projector = 2 x (conv3x3 no bias + BN + ReLU) -> flatten -> FC 1024 -> BN -> ReLU -> FC 256
    -> ReLU, trainable (not EMA'd);
  * loss per decoder layer = 10 * mean over (query, channel) of the squared difference of the
    L2-normalised (torch F.normalize, eps 1e-12) student and stop-gradient teacher embeddings of
    the consistency queries; the sum over layers is scaled by the unsupervised weight by the
    caller. Stage 1 only (the reference zeroes its weights after the switch).

Normalisation choice: `MaskedBatchNorm`, batch-norm in train mode (batch mean and biased
variance, eps 1e-5, learnable scale and bias, as torch BatchNorm in training) computed over the
valid RoIs only, with no running statistics. Why: the reference's BN always runs in train mode
(the projector is used only while training, so running averages are never read), padded RoI
slots must not enter the statistics (flax BatchNorm would need its `mask` argument and would add
a `batch_stats` collection to thread through the train state for nothing), and GroupNorm would
change the method. Differences: statistics are over the global batch under `jit` (the
reference's BN is per GPU, not synchronised), and the loss mean is over valid consistency
queries (the reference's mean also counts its zero-weight placeholder query of images without
pseudo boxes).
"""
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from sized_detr_jax.models import roi_align
from sized_detr_jax.models.layers import inverse_sigmoid

CONSISTENCY_COEF = 10.0
CONSISTENCY_GROUPS = 5
# Group ids of consistency slots, disjoint from `models.denoising`'s (valid dn groups are in
# [0, D), invalid dn slots -1 - slot), so one `denoising_attention_mask` over the concatenated
# [consistency, denoising] slots applies both sets of rules (for D < 2**20).
_GROUP_BASE = 1 << 20
_BN_EPS = 1e-5
_NORMALIZE_EPS = 1e-12


class MaskedBatchNorm(nn.Module):
  """Train-mode batch norm over the valid rows (and all other leading/spatial positions).

  Attributes:
    eps: variance epsilon (torch's 1e-5).
  """
  eps: float = _BN_EPS

  @nn.compact
  def __call__(self, x, mask):
    """x: [N, ..., F]; mask: [N] bool -> [N, ..., F] normalised over valid rows per feature."""
    features = x.shape[-1]
    scale = self.param("scale", nn.initializers.ones, (features,), jnp.float32)
    bias = self.param("bias", nn.initializers.zeros, (features,), jnp.float32)
    weight = mask.astype(jnp.float32).reshape(mask.shape + (1,) * (x.ndim - 1))
    weight = jnp.broadcast_to(weight, x.shape[:-1] + (1,))
    count = jnp.maximum(jnp.sum(weight), 1.0)
    axes = tuple(range(x.ndim - 1))
    xf = x.astype(jnp.float32)
    mean = jnp.sum(xf * weight, axis=axes) / count
    var = jnp.sum(weight * (xf - mean)**2, axis=axes) / count
    y = (xf - mean) * jax.lax.rsqrt(var + self.eps) * scale + bias
    return y.astype(x.dtype)


class Projector(nn.Module):
  """Semi-DETR's Projector: RoI features -> consistency query content.

  Attributes:
    conv_dim: channels of the two 3x3 convs (256 = the RoI feature channels).
    fc_dim: hidden FC width (1024).
    out_dim: output width (256 = the decoder's hidden dim).
  """
  conv_dim: int = 256
  fc_dim: int = 1024
  out_dim: int = 256

  @nn.compact
  def __call__(self, roi_features, valid):
    """Projects RoI features.

    Args:
      roi_features: [B, N, PH, PW, C] RoIAlign output (NHWC per RoI).
      valid: [B, N] bool, False for padded RoIs (excluded from the batch-norm statistics; their
        output is zero).

    Returns:
      [B, N, out_dim] non-negative (final ReLU) content embeddings.
    """
    b, n = roi_features.shape[:2]
    x = roi_features.reshape((b * n,) + roi_features.shape[2:])
    mask = valid.reshape(b * n)
    for i in range(2):
      x = nn.Conv(self.conv_dim, (3, 3), padding="SAME", use_bias=False, name=f"conv{i + 1}")(x)
      x = nn.relu(MaskedBatchNorm(name=f"bn{i + 1}")(x, mask))
    x = x.reshape(b * n, -1)
    x = nn.Dense(self.fc_dim, name="fc1")(x)
    x = nn.relu(MaskedBatchNorm(name="bn_fc")(x, mask))
    x = nn.relu(nn.Dense(self.out_dim, name="fc2")(x))
    return jnp.where(valid[..., None], x.reshape(b, n, self.out_dim), 0.0)


def roi_features(features: Sequence[jax.Array], boxes_xyxy, *, strides=(8, 16, 32, 64),
                 output_size=7, sampling_ratio=2):
  """RoIAlign of the teacher's weak-view feature maps at the weak-view pseudo boxes.

  The features are `stop_gradient`-ed (the reference extracts them under torch.no_grad), so
  only the projector learns from the consistency loss.

  Args:
    features: sequence of [B, H_l, W_l, C] maps, finest first.
    boxes_xyxy: [B, N, 4] weak-view pixel boxes (pseudo_labels' `weak_boxes_xyxy`).
    strides, output_size, sampling_ratio: see `models.roi_align.multi_level_roi_align`
      (sampling_ratio must be fixed; the reference's adaptive 0 is not static).

  Returns:
    [B, N, 7, 7, C].
  """
  features = [jax.lax.stop_gradient(f) for f in features]
  return roi_align.multi_level_roi_align(features, jax.lax.stop_gradient(boxes_xyxy),
                                         strides=strides, output_size=output_size,
                                         sampling_ratio=sampling_ratio)


def consistency_set(pseudo_targets, mined):
  """The high-recall boxes that get consistency queries: mined by cost or in the final set.

  As Semi-DETR's unsup_loss (`valid_gt_inds` = GMM-mined indices U score >= 0.4 indices).

  Args:
    pseudo_targets: `pseudo_labels.pseudo_targets`' dict (`valid` = final set,
      `initial_valid`).
    mined: [B, M] bool from `gmm.mine_by_cost` over the initial set.

  Returns:
    [B, M] bool.
  """
  return pseudo_targets["valid"] | (mined & pseudo_targets["initial_valid"])


def consistency_queries(boxes_cxcywh, content, valid, *, groups=CONSISTENCY_GROUPS):
  """Un-noised consistency query groups, placed before the denoising slots.

  As Semi-DETR's prepare_unsup_cdn (consistency part): `groups` copies of every box, the
  reference point is the box (clamped to [0, 1], inverse-sigmoided), the content is the
  projector output; group k holds slots [k * M, (k + 1) * M). The student gets the strong-view
  boxes, the teacher the weak-view boxes with the same content (stop-gradient on its side).

  Args:
    boxes_cxcywh: [B, M, 4] normalised cxcywh in the view of the pass.
    content: [B, M, D] projector output (`Projector`).
    valid: [B, M] bool (`consistency_set`).
    groups: number of groups (5).

  Returns:
    dict: `content [B, groups * M, D]`, `boxes_unsigmoid [B, groups * M, 4]` (0 on invalid
    slots), `valid [B, groups * M]` (the loss mask), `group [B, groups * M]` int32 ids
    disjoint from `models.denoising`'s, for `denoising_attention_mask` over
    `concatenate([group, dn group], axis=1)`: a consistency group sees itself and the matching
    queries only; denoising and matching queries do not see it.
  """
  b, m = valid.shape
  tile = lambda x: jnp.concatenate([x] * groups, axis=1)
  slot_valid = tile(valid)
  slot = jnp.arange(groups * m, dtype=jnp.int32)[None, :]
  group = jnp.where(slot_valid, _GROUP_BASE + slot // m, -_GROUP_BASE - slot)
  boxes = inverse_sigmoid(jnp.clip(boxes_cxcywh.astype(jnp.float32), 0.0, 1.0))
  return {"content": jnp.where(slot_valid[..., None], tile(content), 0.0),
          "boxes_unsigmoid": jnp.where(slot_valid[..., None], tile(boxes), 0.0),
          "valid": slot_valid,
          "group": jnp.broadcast_to(group, (b, groups * m)).astype(jnp.int32)}


def _l2_normalize(x):
  """torch.nn.functional.normalize(x, p=2, dim=-1)."""
  norm = jnp.sqrt(jnp.sum(x * x, axis=-1, keepdims=True))
  return x / jnp.maximum(norm, _NORMALIZE_EPS)


def consistency_loss(student_embeddings, teacher_embeddings, valid, *, coef=CONSISTENCY_COEF):
  """Cross-view consistency loss between decoder embeddings of the consistency queries.

  Args:
    student_embeddings: [L, B, N, D] decoder outputs (hidden states) of the consistency queries
      in the student's strong-view pass, every decoder layer.
    teacher_embeddings: [L, B, N, D] the same queries in the teacher's weak-view pass (no
      gradient flows into them).
    valid: [B, N] bool (or float weights), the real consistency queries.
    coef: the reference's factor 10.

  Returns:
    dict: `loss_consistency` (sum over layers) and `loss_consistency_d{l}` per layer, [] f32
    each: coef * sum(valid * (n_s - n_t)^2) / (D * number of valid queries), with n the
    L2-normalised embeddings; 0 when nothing is valid.
  """
  student = _l2_normalize(student_embeddings.astype(jnp.float32))
  teacher = _l2_normalize(jax.lax.stop_gradient(teacher_embeddings).astype(jnp.float32))
  weight = valid.astype(jnp.float32)
  dim = student.shape[-1]
  count = jnp.maximum(jnp.sum(valid.astype(jnp.float32)), 1.0) * dim
  per_layer = coef * jnp.sum(jnp.sum((student - teacher)**2, axis=-1) * weight,
                             axis=(1, 2)) / count  # [L]
  result = {f"loss_consistency_d{l}": per_layer[l] for l in range(per_layer.shape[0])}
  result["loss_consistency"] = jnp.sum(per_layer)
  return result
