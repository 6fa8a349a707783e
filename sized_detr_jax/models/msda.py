"""Multi-scale deformable attention (MSDA) sampling core, gather-based, pure JAX.

This is the array function behind Deformable-DETR's `MSDeformAttnFunction` (the CUDA op in
fundamentalvision/Deformable-DETR `models/ops`, reproduced by `ms_deform_attn_core_pytorch`):
for every query, head, level and point, bilinearly sample the value map of that level at a
fractional location and sum the samples weighted by the attention weights.

Sampling follows `torch.nn.functional.grid_sample(align_corners=False, padding_mode="zeros")`:
a normalised location `(x, y)` in [0, 1] maps to the pixel coordinate `(x * W - 0.5, y * H - 0.5)`
(pixel centres at integer coordinates), and each of the 4 bilinear corners that falls outside
the map contributes zero.

The learnable projections (value, offsets, weights, output) live in `MSDeformAttn` in
`deformable_transformer.py`; this file only holds the sampling kernel so a faster kernel
can be registered under `IMPLEMENTATIONS` and chosen by name without touching the modules;
`msda_pallas.py` is such a kernel ("pallas").
"""
from typing import Callable, Dict, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np

SpatialShapes = Tuple[Tuple[int, int], ...]


def check_spatial_shapes(spatial_shapes: Sequence[Sequence[int]], num_tokens: int) -> SpatialShapes:
  """Returns `spatial_shapes` as a hashable tuple of (H, W) ints; checks it covers `num_tokens`."""
  shapes = tuple((int(h), int(w)) for h, w in spatial_shapes)
  total = sum(h * w for h, w in shapes)
  if total != num_tokens:
    raise ValueError(f"msda: spatial_shapes {shapes} cover {total} tokens but value has "
                     f"{num_tokens}")
  return shapes


def _rows(value, index):
  """value [B, heads, N, d] at index [B, heads, Q, K] (in bounds) -> [B, heads, Q, K, d]."""
  b, heads, q, k = index.shape
  rows = jnp.take_along_axis(value, index.reshape(b, heads, q * k)[..., None], axis=2,
                             mode="promise_in_bounds", wrap_negative_indices=False)
  return rows.reshape(b, heads, q, k, -1)


# Scatter-add of [B, heads, M, d] rows into [B, heads, N, d] at [B, heads, M] rows, batched over
# (B, heads): the transpose of `_rows`.
_ADD_ROWS = jax.lax.ScatterDimensionNumbers(
    update_window_dims=(3,), inserted_window_dims=(2,), scatter_dims_to_operand_dims=(2,),
    operand_batching_dims=(0, 1), scatter_indices_batching_dims=(0, 1))


def _add_rows(total, index, updates):
  """total [B, heads, N, d] + updates [B, heads, Q, K, d] scattered to rows index [.., Q, K]."""
  b, heads, q, k = index.shape
  return jax.lax.scatter_add(total, index.reshape(b, heads, q * k, 1),
                             updates.reshape(b, heads, q * k, -1), _ADD_ROWS,
                             mode=jax.lax.GatherScatterMode.PROMISE_IN_BOUNDS)


@jax.custom_vjp
def _weighted_rows(value, index, weights):
  """sum_{l, k} weights[b, h, l, q, k] * value[b, h, index[b, h, l, q, k]] -> [B, heads, Q, d].

  Args:
    value: [B, heads, S, d] values of all levels.
    index: [B, heads, L, Q, K] int32 rows of value (level start included), all in bounds.
    weights: [B, heads, L, Q, K] weights, value's dtype.

  Each level is a gather, multiply and sum over K. The backward saves only the three inputs
  and gathers the samples again (the forward's [B, heads, Q, K, d] samples die with the
  forward: plain autodiff kept every layer's until its backward, 24 x 86 MiB for DINO-4scale
  R50 at 320x416, batch 2); the re-gather goes through an optimization barrier with the
  output cotangent so that XLA does not merge it with the forward's gather where barriers are
  kept (GPU/TPU). The value gradient (a scatter-add of L*Q*K rows into S, several hits per
  row) accumulates the levels into one float32 buffer and is rounded to value's dtype once: a
  bfloat16 scatter-add rounds after every hit (tests/test_models_msda_pallas.py: 1.1% relative
  error of the value gradient at ~110 hits per row, against 0.28% this way).
  """
  out = None
  for level in range(index.shape[2]):
    sampled = jnp.sum(_rows(value, index[:, :, level]) * weights[:, :, level, ..., None], axis=3)
    out = sampled if out is None else out + sampled
  return out


def _weighted_rows_fwd(value, index, weights):
  return _weighted_rows(value, index, weights), (value, index, weights)


def _weighted_rows_bwd(residuals, cotangent):
  value, index, weights, cotangent = jax.lax.optimization_barrier((*residuals, cotangent))
  f32 = jnp.promote_types(value.dtype, jnp.float32)
  ct = cotangent.astype(f32)[:, :, :, None, :]  # [B, heads, Q, 1, d]
  grad_value = jnp.zeros(value.shape, f32)
  grad_weights = []
  for level in range(index.shape[2]):
    level_index = index[:, :, level]
    grad_weights.append(jnp.sum(_rows(value, level_index).astype(f32) * ct, axis=-1))
    grad_value = _add_rows(grad_value, level_index,
                           weights[:, :, level].astype(f32)[..., None] * ct)
  grad_weights = jnp.stack(grad_weights, axis=2)
  return grad_value.astype(value.dtype), None, grad_weights.astype(weights.dtype)


_weighted_rows.defvjp(_weighted_rows_fwd, _weighted_rows_bwd)


def _corners(loc_l, weight_l, height, width, start):
  """Bilinear corners of one level's sampling points.

  Args:
    loc_l: [B, heads, Q, P, 2] float32 normalised (x, y) sampling locations.
    weight_l: [B, heads, Q, P] attention weights.
    height, width: static ints, the level's map size.
    start: static int, the level's first row in the flattened value.

  Returns:
    index [B, heads, Q, P*4] int32 rows (start included; out-of-map corners read a clipped,
    valid row) and weights [B, heads, Q, P*4] float32: attention weight x bilinear weight, 0
    for out-of-map corners (grid_sample's zeros padding, zero gradient too).
  """
  b, heads, q, p, _ = loc_l.shape
  # grid_sample(align_corners=False): pixel centre i sits at normalised (i + 0.5) / size.
  x = loc_l[..., 0] * width - 0.5
  y = loc_l[..., 1] * height - 0.5
  x0 = jnp.floor(x)
  y0 = jnp.floor(y)
  fx = x - x0
  fy = y - y0
  x0 = x0.astype(jnp.int32)
  y0 = y0.astype(jnp.int32)
  corners = []
  corner_weights = []
  for dy, wy in ((0, 1.0 - fy), (1, fy)):
    for dx, wx in ((0, 1.0 - fx), (1, fx)):
      xi = x0 + dx
      yi = y0 + dy
      inside = (xi >= 0) & (xi < width) & (yi >= 0) & (yi < height)
      corners.append(start + jnp.clip(yi, 0, height - 1) * width + jnp.clip(xi, 0, width - 1))
      corner_weights.append(jnp.where(inside, wx * wy, 0.0))
  index = jnp.stack(corners, axis=-1).reshape(b, heads, q, p * 4)
  bilinear = jnp.stack(corner_weights, axis=-1)  # [B, heads, Q, P, 4]
  weights = bilinear * weight_l[..., None].astype(bilinear.dtype)
  return index, weights.reshape(b, heads, q, p * 4)


def msda_gather(value, spatial_shapes: SpatialShapes, sampling_locations, attention_weights):
  """Reference gather implementation; see `multi_scale_deformable_attention`."""
  b, _, heads, d = value.shape
  q = sampling_locations.shape[1]
  # Heads first so each (batch, head) gathers from its own [S, d] slab.
  value = jnp.transpose(value, (0, 2, 1, 3))  # [B, heads, S, d]
  locations = jnp.transpose(sampling_locations, (0, 2, 3, 1, 4, 5))  # [B, heads, L, Q, P, 2]
  weights = jnp.transpose(attention_weights, (0, 2, 3, 1, 4))  # [B, heads, L, Q, P]
  starts = np.cumsum([0] + [h * w for h, w in spatial_shapes])
  corners = [_corners(locations[:, :, level], weights[:, :, level], h, w, int(starts[level]))
             for level, (h, w) in enumerate(spatial_shapes)]
  index = jnp.stack([c[0] for c in corners], axis=2)  # [B, heads, L, Q, P*4]
  corner_weights = jnp.stack([c[1] for c in corners], axis=2).astype(value.dtype)
  out = _weighted_rows(value, index, corner_weights)  # [B, heads, Q, d]
  out = jnp.transpose(out, (0, 2, 1, 3))  # [B, Q, heads, d]
  return out.reshape(b, q, heads * d)


def _msda_pallas(value, spatial_shapes, sampling_locations, attention_weights):
  """The Pallas kernel (models/msda_pallas.py), imported on first use."""
  from sized_detr_jax.models import msda_pallas  # pylint: disable=import-outside-toplevel
  return msda_pallas.msda_pallas(value, spatial_shapes, sampling_locations, attention_weights)


# "gather": portable XLA reference; "pallas": fused kernel (Triton on GPU, interpret mode on CPU,
# not TPU), forward and backward.
IMPLEMENTATIONS: Dict[str, Callable] = {"gather": msda_gather, "pallas": _msda_pallas}


def multi_scale_deformable_attention(value, spatial_shapes, sampling_locations,
                                     attention_weights, *, implementation: str = "gather"):
  """Multi-scale deformable attention sampling (Deformable-DETR semantics).

  Args:
    value: [B, S, heads, d] values of all levels, each level flattened row-major and the
      levels concatenated in `spatial_shapes` order (S = sum of H_l * W_l). Any float dtype;
      the output has this dtype.
    spatial_shapes: static sequence of per-level (H_l, W_l) ints (a Python tuple, not an array:
      it fixes the slicing at trace time).
    sampling_locations: [B, Q, heads, L, P, 2] normalised (x, y) locations in the padded map;
      [0, 1] spans the map, values outside sample zeros. Kept/cast to float32 (in bfloat16 a
      location on a 167-pixel-wide map would be off by up to half a pixel).
    attention_weights: [B, Q, heads, L, P] weights (DINO softmaxes them over L*P).
    implementation: key of `IMPLEMENTATIONS` ("gather" is the portable reference, "pallas"
      the GPU kernel).

  Returns:
    [B, Q, heads * d] weighted sums of the bilinear samples.

  Raises:
    ValueError: on inconsistent shapes or an unknown implementation.
  """
  b, s, heads, _ = value.shape
  shapes = check_spatial_shapes(spatial_shapes, s)
  expected = (b, sampling_locations.shape[1], heads, len(shapes))
  if sampling_locations.shape[:4] != expected or sampling_locations.shape[-1] != 2:
    raise ValueError(f"msda: sampling_locations shape {sampling_locations.shape} does not "
                     f"match [B, Q, heads, L, P, 2] = {expected} + [P, 2]")
  if attention_weights.shape != sampling_locations.shape[:-1]:
    raise ValueError(f"msda: attention_weights shape {attention_weights.shape} != "
                     f"{sampling_locations.shape[:-1]}")
  if implementation not in IMPLEMENTATIONS:
    raise ValueError(f"msda: unknown implementation {implementation!r}; "
                     f"known: {sorted(IMPLEMENTATIONS)}")
  return IMPLEMENTATIONS[implementation](
      value, shapes, sampling_locations.astype(jnp.float32), attention_weights)
