"""MSDA sampling core vs an independent float64 numpy bilinear reference."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sized_detr_jax.models import msda

SHAPES = ((3, 4), (2, 2), (1, 1))


def _bilinear_np(img, x, y):
  """grid_sample(align_corners=False, zeros) of an [H, W, d] float64 map at normalised (x, y)."""
  h, w, d = img.shape
  px, py = x * w - 0.5, y * h - 0.5
  x0, y0 = int(np.floor(px)), int(np.floor(py))
  out = np.zeros(d)
  for xi in (x0, x0 + 1):
    for yi in (y0, y0 + 1):
      if 0 <= xi < w and 0 <= yi < h:
        out += (1 - abs(px - xi)) * (1 - abs(py - yi)) * img[yi, xi]
  return out


def _msda_np(value, shapes, loc, attn):
  b, _, heads, d = value.shape
  q, levels, points = loc.shape[1], loc.shape[3], loc.shape[4]
  out = np.zeros((b, q, heads, d))
  starts = np.cumsum([0] + [h * w for h, w in shapes])
  for bi in range(b):
    for qi in range(q):
      for hi in range(heads):
        for li, (h, w) in enumerate(shapes):
          img = value[bi, starts[li]:starts[li + 1], hi].reshape(h, w, d)
          for pi in range(points):
            x, y = loc[bi, qi, hi, li, pi]
            out[bi, qi, hi] += attn[bi, qi, hi, li, pi] * _bilinear_np(img, x, y)
  return out.reshape(b, q, heads * d)


@pytest.fixture(scope="module")
def inputs():
  rng = np.random.default_rng(0)
  b, q, heads, d, points = 2, 5, 2, 3, 3
  s = sum(h * w for h, w in SHAPES)
  value = rng.normal(size=(b, s, heads, d))
  # [-0.3, 1.3] puts many points (and some whole bilinear footprints) outside the map.
  loc = rng.uniform(-0.3, 1.3, size=(b, q, heads, len(SHAPES), points, 2))
  loc[0, 0, 0, 0, 0] = (0.5 / 4, 0.5 / 3)  # exactly on a pixel centre
  loc[0, 0, 0, 0, 1] = (-0.2, 0.5)  # footprint fully outside
  attn = rng.uniform(size=(b, q, heads, len(SHAPES), points))
  return value, loc, attn


def test_matches_float64_reference(inputs):
  value, loc, attn = inputs
  got = msda.multi_scale_deformable_attention(
      jnp.asarray(value, jnp.float32), SHAPES, jnp.asarray(loc, jnp.float32),
      jnp.asarray(attn, jnp.float32))
  want = _msda_np(value, SHAPES, loc, attn)
  assert got.shape == want.shape
  np.testing.assert_allclose(np.asarray(got), want, atol=2e-5)


def test_hand_computed_single_pixel():
  # 1x1 map holding 2.0: centre samples 2.0; x = 0.75 -> pixel 0.25 -> weight 0.75 on the pixel.
  value = jnp.full((1, 1, 1, 1), 2.0)
  loc = jnp.array([0.5, 0.5, 0.75, 0.5, 1.5, 0.5]).reshape(1, 3, 1, 1, 1, 2)
  attn = jnp.ones((1, 3, 1, 1, 1))
  got = msda.multi_scale_deformable_attention(value, ((1, 1),), loc, attn)
  np.testing.assert_allclose(np.asarray(got).ravel(), [2.0, 1.5, 0.0], atol=1e-6)


@pytest.mark.slow
def test_gradients_finite_and_match_finite_differences(inputs):
  value, loc, attn = (jnp.asarray(a, jnp.float32) for a in inputs)

  def f(v, l, a):
    return jnp.sum(jnp.sin(msda.multi_scale_deformable_attention(v, SHAPES, l, a)))

  grads = jax.grad(f, argnums=(0, 1, 2))(value, loc, attn)
  for g in grads:
    assert bool(jnp.all(jnp.isfinite(g)))
  assert float(jnp.abs(grads[1]).sum()) > 0
  # Directional derivative along a random direction vs a central difference (the map is
  # piecewise bilinear, so a small step rarely crosses a pixel boundary).
  rng = np.random.default_rng(1)
  for i, x in enumerate((value, loc, attn)):
    direction = jnp.asarray(rng.normal(size=x.shape), jnp.float32)
    eps = 1e-3
    args_p = [value, loc, attn]
    args_m = [value, loc, attn]
    args_p[i] = x + eps * direction
    args_m[i] = x - eps * direction
    fd = (f(*args_p) - f(*args_m)) / (2 * eps)
    analytic = jnp.sum(grads[i] * direction)
    np.testing.assert_allclose(float(analytic), float(fd), rtol=2e-2, atol=2e-2)


def test_bad_shapes_raise(inputs):
  value, loc, attn = inputs
  with pytest.raises(ValueError, match="spatial_shapes"):
    msda.multi_scale_deformable_attention(value, ((3, 4),), loc, attn)
  with pytest.raises(ValueError, match="implementation"):
    msda.multi_scale_deformable_attention(value, SHAPES, loc, attn, implementation="cuda")
