"""Multi-scale deformable attention (MSDA) as a Pallas kernel, forward and backward.

Same semantics as `msda.msda_gather` (Deformable-DETR's `MSDeformAttnFunction`, sampling as
`grid_sample(align_corners=False, padding_mode="zeros")`): see `msda.py` for the contract. This
file only adds a faster path for GPUs:

  * forward: one program per (batch, head, block of queries) gathers the 4 bilinear corners of
    every (query, level, point) from that head's [S, d] value slab and accumulates the weighted
    samples in float32 registers, so the [B, heads, Q, L*P*4, d] gathered tensor of the XLA
    version never exists in memory;
  * backward (`jax.custom_vjp`): the same programs recompute the corners, write the gradients of
    the locations and attention weights of their queries, and scatter the value gradient with
    float32 atomic adds (the XLA backward of the gather is a sort-based scatter-add).

Lowering. On GPU the kernel lowers through Pallas' Triton backend (`pallas.triton`
CompilerParams select it): gathers and atomics are pointer tensors, so every loaded block must
have a power-of-2 size; the wrapper pads the head dim d, the points per level P and the query
block to powers of 2 (zero attention weight on padded points, padded channels sliced off). On
CPU it runs in Pallas interpret mode (chosen automatically), where the value-gradient scatter is
an XLA scatter-add inside the kernel body instead of `atomic_add` (the interpret-mode discharge
of `atomic_add` drops repeated addresses within one call and does not take a mask). Everything
else, indices, weights and the three gradients, is the same code on both paths. TPU is not
served: Mosaic TPU has no vector gather from a VMEM ref nor atomics; use "gather" there.
"""
import functools
from typing import Optional, Tuple

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pl_triton

SpatialShapes = Tuple[Tuple[int, int], ...]

# Queries per program. 32 queries x 4 points x 32 channels = 4096 values per gathered corner,
# a comfortable register tile for 4 warps.
DEFAULT_BLOCK_Q = 32
_NUM_WARPS = 4


def _next_pow2(n: int) -> int:
  return 1 << max(0, int(n) - 1).bit_length()


def _use_interpret(interpret: Optional[bool]) -> bool:
  """Interpret mode on CPU, compiled kernels on GPU; a clear error on other backends."""
  if interpret is not None:
    return bool(interpret)
  backend = jax.default_backend()
  if backend == "cpu":
    return True
  if backend in ("gpu", "cuda", "rocm"):
    return False
  raise NotImplementedError(f"msda pallas: backend {backend!r} is not supported (Triton "
                            f"lowering: GPU only; interpret mode: CPU); use "
                            f"model.msda_implementation='gather'")


def _level_corners(x_ref, y_ref, level, height, width, start):
  """Bilinear corners of one level's sampling points.

  Args:
    x_ref, y_ref: [L, BQ, P] refs of normalised sampling locations (float32).
    level: static level index; height, width: static map size; start: static token offset.

  Returns:
    list of 4 (rows, bilinear, dwx, dwy): rows [BQ, P] int32 token indices (clipped into the
    map), bilinear [BQ, P] float32 corner weight (0 outside the map), and the derivatives of
    that weight w.r.t. the pixel coordinates x and y (0 outside the map).
  """
  # Clamping keeps the float->int conversion in range for far-away points; beyond 2 pixels
  # outside the map every corner is outside, so the output and all gradients are 0 either way
  # (as in the gather version).
  x = jnp.clip(x_ref[level] * width - 0.5, -2.0, width + 1.0)
  y = jnp.clip(y_ref[level] * height - 0.5, -2.0, height + 1.0)
  x0f = jnp.floor(x)
  y0f = jnp.floor(y)
  fx = x - x0f
  fy = y - y0f
  x0 = x0f.astype(jnp.int32)
  y0 = y0f.astype(jnp.int32)
  corners = []
  for dy, wy, dwy_sign in ((0, 1.0 - fy, -1.0), (1, fy, 1.0)):
    for dx, wx, dwx_sign in ((0, 1.0 - fx, -1.0), (1, fx, 1.0)):
      xi = x0 + dx
      yi = y0 + dy
      inside = (xi >= 0) & (xi < width) & (yi >= 0) & (yi < height)
      rows = start + jnp.clip(yi, 0, height - 1) * width + jnp.clip(xi, 0, width - 1)
      zero = jnp.zeros_like(wx)
      corners.append((rows,
                      jnp.where(inside, wx * wy, zero),
                      jnp.where(inside, dwx_sign * wy, zero),
                      jnp.where(inside, dwy_sign * wx, zero)))
  return corners


def _gather_rows(value_ref, rows, dp):
  """value_ref [S, dp] at rows [BQ, P] -> [BQ, P, dp] float32 (all-array indexing: a pointer
  gather under Triton, a plain gather in interpret mode)."""
  shape = rows.shape + (dp,)
  cols = jnp.broadcast_to(jnp.arange(dp, dtype=jnp.int32)[None, None, :], shape)
  return value_ref[jnp.broadcast_to(rows[:, :, None], shape), cols].astype(jnp.float32)


def _forward_kernel(value_ref, x_ref, y_ref, a_ref, out_ref, *, shapes, starts, dp):
  """One (batch, head, query block): out [BQ, dp] = sum over levels, points, corners."""
  acc = None
  for level, ((height, width), start) in enumerate(zip(shapes, starts)):
    attn = a_ref[level].astype(jnp.float32)  # [BQ, P]
    for rows, bilinear, _, _ in _level_corners(x_ref, y_ref, level, height, width, start):
      sample = _gather_rows(value_ref, rows, dp)  # [BQ, P, dp]
      term = jnp.sum(sample * (bilinear * attn)[:, :, None], axis=1)  # [BQ, dp]
      acc = term if acc is None else acc + term
  out_ref[...] = acc.astype(out_ref.dtype)


def _backward_kernel(value_ref, x_ref, y_ref, a_ref, g_ref, gv_in_ref, gx_ref, gy_ref, ga_ref,
                     gv_ref, *, shapes, starts, dp, interpret):
  """One (batch, head, query block): location/weight gradients of its queries, and its share of
  the value gradient added into gv_ref [S, dp] (float32, zero-initialised by the caller)."""
  del gv_in_ref  # Aliased with gv_ref (its zero initial value).
  g = g_ref[...].astype(jnp.float32)[:, None, :]  # [BQ, 1, dp]
  update = None
  if interpret:
    update = jnp.zeros(gv_ref.shape, jnp.float32)
  for level, ((height, width), start) in enumerate(zip(shapes, starts)):
    attn = a_ref[level].astype(jnp.float32)  # [BQ, P]
    grad_x = grad_y = grad_a = None
    for rows, bilinear, dwx, dwy in _level_corners(x_ref, y_ref, level, height, width, start):
      sample = _gather_rows(value_ref, rows, dp)  # [BQ, P, dp]
      g_dot_v = jnp.sum(sample * g, axis=-1)  # [BQ, P]
      terms = (bilinear * g_dot_v, dwx * g_dot_v, dwy * g_dot_v)
      if grad_a is None:
        grad_a, grad_x, grad_y = terms
      else:
        grad_a, grad_x, grad_y = grad_a + terms[0], grad_x + terms[1], grad_y + terms[2]
      contrib = (bilinear * attn)[:, :, None] * g  # [BQ, P, dp]
      shape = contrib.shape
      rows3 = jnp.broadcast_to(rows[:, :, None], shape)
      cols3 = jnp.broadcast_to(jnp.arange(dp, dtype=jnp.int32)[None, None, :], shape)
      if interpret:
        update = update.at[rows3, cols3].add(contrib)
      else:
        # Out-of-map corners (weight 0, clipped address) skip the atomic.
        mask = jnp.broadcast_to((bilinear != 0.0)[:, :, None], shape)
        pl_triton.atomic_add(gv_ref, (rows3, cols3), contrib, mask=mask)
    # d(pixel x)/d(normalised x) = width, likewise height for y.
    gx_ref[level] = grad_x * attn * width
    gy_ref[level] = grad_y * attn * height
    ga_ref[level] = grad_a.astype(ga_ref.dtype)
  if interpret:
    gv_ref[...] = gv_ref[...] + update


class _Layout:
  """Static padded sizes and the kernels' block specs for one call."""

  def __init__(self, value_shape, loc_shape, shapes, block_q):
    b, s, heads, d = value_shape
    _, q, _, levels, points, _ = loc_shape
    self.b, self.s, self.heads, self.d, self.q, self.levels, self.points = (
        b, s, heads, d, q, levels, points)
    self.dp = _next_pow2(d)
    self.pp = _next_pow2(points)
    self.bq = min(_next_pow2(block_q), _next_pow2(q))
    self.qp = -(-q // self.bq) * self.bq
    self.grid = (b, heads, self.qp // self.bq)
    starts, offset = [], 0
    for h, w in shapes:
      starts.append(offset)
      offset += h * w
    self.starts = tuple(starts)
    # value / value grad: the whole [S, dp] slab of head h.
    self.value_spec = pl.BlockSpec((None, s, None, self.dp), lambda bi, hi, qi: (bi, 0, hi, 0))
    # x, y, attention weights and their grads, laid out [B, heads, L, Qp, Pp].
    self.point_spec = pl.BlockSpec((None, None, levels, self.bq, self.pp),
                                   lambda bi, hi, qi: (bi, hi, 0, qi, 0))
    # output / its cotangent, [B, Qp, heads, dp].
    self.out_spec = pl.BlockSpec((None, self.bq, None, self.dp),
                                 lambda bi, hi, qi: (bi, qi, hi, 0))

  def pad_value(self, value):
    return jnp.pad(value, ((0, 0), (0, 0), (0, 0), (0, self.dp - self.d)))

  def to_points(self, x):
    """[B, Q, heads, L, P] -> [B, heads, L, Qp, Pp] (zero padding: padded points weigh 0)."""
    x = jnp.transpose(x, (0, 2, 3, 1, 4))
    return jnp.pad(x, ((0, 0), (0, 0), (0, 0), (0, self.qp - self.q), (0, self.pp - self.points)))

  def from_points(self, x):
    """[B, heads, L, Qp, Pp] -> [B, Q, heads, L, P]."""
    return jnp.transpose(x[:, :, :, :self.q, :self.points], (0, 3, 1, 2, 4))

  def compiler_params(self, interpret):
    if interpret:
      return None
    return pl_triton.CompilerParams(num_warps=_NUM_WARPS, num_stages=1)


def _split_locations(layout, sampling_locations):
  loc = sampling_locations.astype(jnp.float32)
  return layout.to_points(loc[..., 0]), layout.to_points(loc[..., 1])


def _forward(value, shapes, sampling_locations, attention_weights, block_q, interpret):
  layout = _Layout(value.shape, sampling_locations.shape, shapes, block_q)
  x, y = _split_locations(layout, sampling_locations)
  attn = layout.to_points(attention_weights)
  kernel = functools.partial(_forward_kernel, shapes=shapes, starts=layout.starts, dp=layout.dp)
  out = pl.pallas_call(
      kernel,
      grid=layout.grid,
      in_specs=[layout.value_spec, layout.point_spec, layout.point_spec, layout.point_spec],
      out_specs=layout.out_spec,
      out_shape=jax.ShapeDtypeStruct((layout.b, layout.qp, layout.heads, layout.dp), value.dtype),
      compiler_params=layout.compiler_params(interpret),
      interpret=interpret,
      name="msda_forward",
  )(layout.pad_value(value), x, y, attn)
  out = out[:, :layout.q, :, :layout.d]
  return out.reshape(layout.b, layout.q, layout.heads * layout.d)


def _backward(value, shapes, sampling_locations, attention_weights, cotangent, block_q,
              interpret):
  layout = _Layout(value.shape, sampling_locations.shape, shapes, block_q)
  x, y = _split_locations(layout, sampling_locations)
  attn = layout.to_points(attention_weights)
  g = cotangent.reshape(layout.b, layout.q, layout.heads, layout.d)
  g = jnp.pad(g, ((0, 0), (0, layout.qp - layout.q), (0, 0), (0, layout.dp - layout.d)))
  kernel = functools.partial(_backward_kernel, shapes=shapes, starts=layout.starts,
                             dp=layout.dp, interpret=interpret)
  points_shape = (layout.b, layout.heads, layout.levels, layout.qp, layout.pp)
  grad_value_init = jnp.zeros((layout.b, layout.s, layout.heads, layout.dp), jnp.float32)
  gx, gy, ga, gv = pl.pallas_call(
      kernel,
      grid=layout.grid,
      in_specs=[layout.value_spec, layout.point_spec, layout.point_spec, layout.point_spec,
                layout.out_spec, layout.value_spec],
      out_specs=[layout.point_spec, layout.point_spec, layout.point_spec, layout.value_spec],
      out_shape=[jax.ShapeDtypeStruct(points_shape, jnp.float32),
                 jax.ShapeDtypeStruct(points_shape, jnp.float32),
                 jax.ShapeDtypeStruct(points_shape, attention_weights.dtype),
                 jax.ShapeDtypeStruct(grad_value_init.shape, jnp.float32)],
      # The value gradient is accumulated (atomically) into a zero-initialised buffer.
      input_output_aliases={5: 3},
      compiler_params=layout.compiler_params(interpret),
      interpret=interpret,
      name="msda_backward",
  )(layout.pad_value(value), x, y, attn, g, grad_value_init)
  grad_loc = jnp.stack([layout.from_points(gx), layout.from_points(gy)], axis=-1)
  grad_value = gv[..., :layout.d].astype(value.dtype)
  return (grad_value, grad_loc.astype(sampling_locations.dtype),
          layout.from_points(ga).astype(attention_weights.dtype))


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 4, 5))
def _msda(value, shapes, sampling_locations, attention_weights, block_q, interpret):
  return _forward(value, shapes, sampling_locations, attention_weights, block_q, interpret)


def _msda_fwd(value, shapes, sampling_locations, attention_weights, block_q, interpret):
  out = _forward(value, shapes, sampling_locations, attention_weights, block_q, interpret)
  return out, (value, sampling_locations, attention_weights)


def _msda_bwd(shapes, block_q, interpret, residuals, cotangent):
  value, sampling_locations, attention_weights = residuals
  return _backward(value, shapes, sampling_locations, attention_weights, cotangent, block_q,
                   interpret)


_msda.defvjp(_msda_fwd, _msda_bwd)


def msda_pallas(value, spatial_shapes: SpatialShapes, sampling_locations, attention_weights, *,
                block_q: int = DEFAULT_BLOCK_Q, interpret: Optional[bool] = None):
  """Pallas MSDA sampling; drop-in for `msda.msda_gather` (see `multi_scale_deformable_attention`).

  Args:
    value: [B, S, heads, d] values of all levels (row-major, concatenated in level order).
    spatial_shapes: static tuple of per-level (H, W) ints.
    sampling_locations: [B, Q, heads, L, P, 2] normalised (x, y); used in float32.
    attention_weights: [B, Q, heads, L, P].
    block_q: queries per program (rounded up to a power of 2, at most the padded Q).
    interpret: None picks Pallas interpret mode on a CPU backend and the Triton kernel on GPU.

  Returns:
    [B, Q, heads * d] in value's dtype (accumulated in float32).

  Raises:
    NotImplementedError: on a backend other than CPU or GPU when `interpret` is None.
  """
  shapes = tuple((int(h), int(w)) for h, w in spatial_shapes)
  return _msda(value, shapes, sampling_locations, attention_weights, int(block_q),
               _use_interpret(interpret))
