"""Pooling's CPU lowerings against numpy loops and XLA's reduce_window (max: ties
included; average: sharded over fake devices against one device)."""
import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sdl.models.pooling import avg_pool3d, max_pool3d
from sdl.parallel import Partitioner, make_mesh
from sdl.parallel.sharding import VOLUME_AXES


def numpy_pool_and_grad(x, k, dy):
  """Forward max and its gradient by loops: each window's first maximum in row-major
  (depth, height, width) order takes the whole output gradient (numpy's argmax is the
  first occurrence), as XLA's select_and_scatter does."""
  n, d, h, w, c = x.shape
  y = np.zeros((n, d // k, h // k, w // k, c), x.dtype)
  dx = np.zeros_like(x)
  for b, i, j, l, ch in itertools.product(range(n), range(d // k), range(h // k),
                                          range(w // k), range(c)):
    window = x[b, i * k:(i + 1) * k, j * k:(j + 1) * k, l * k:(l + 1) * k, ch]
    y[b, i, j, l, ch] = window.max()
    a, e, f = np.unravel_index(np.argmax(window), window.shape)
    dx[b, i * k + a, j * k + e, l * k + f, ch] += dy[b, i, j, l, ch]
  return y, dx


@pytest.mark.parametrize("k,shape", [(2, (2, 4, 6, 4, 3)), (3, (1, 6, 3, 6, 2))])
@pytest.mark.parametrize("ties", [False, True])
def test_window_max_equals_numpy_and_native(k, shape, ties):
  rng = np.random.default_rng(k)
  if ties:  # few distinct values, and whole constant windows (an empty CosmoFlow region)
    x = rng.integers(0, 3, size=shape).astype(np.float32)
    x[:, :k] = 1.0
  else:
    x = rng.normal(size=shape).astype(np.float32)
  out_shape = (shape[0], shape[1] // k, shape[2] // k, shape[3] // k, shape[4])
  dy = rng.normal(size=out_shape).astype(np.float32)
  y_ref, dx_ref = numpy_pool_and_grad(x, k, dy)
  for lowering in ("folded", "native"):
    y, vjp = jax.vjp(lambda v, lowering=lowering: max_pool3d(v, k, k, lowering=lowering),
                     jnp.asarray(x))
    np.testing.assert_array_equal(np.asarray(y), y_ref)
    np.testing.assert_array_equal(np.asarray(vjp(jnp.asarray(dy))[0]), dx_ref)


def test_overlapping_or_padded_windows_use_the_native_op():
  x = jnp.asarray(np.random.default_rng(0).normal(size=(1, 8, 8, 8, 2)).astype(np.float32))
  for kernel, stride, pad in ((3, 2, (1, 1)), (2, 2, (1, 1)), (2, 1, (0, 0))):
    a = max_pool3d(x, kernel, stride, pad, lowering="folded")
    b = max_pool3d(x, kernel, stride, pad, lowering="native")
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  with pytest.raises(ValueError, match="pool lowering 'fast'"):
    max_pool3d(x, 2, 2, lowering="fast")


def test_folded_pool_compiles_to_no_select_and_scatter():
  x = jnp.ones((1, 8, 8, 8, 2))
  hlo = lambda lowering: jax.jit(jax.grad(lambda v: jnp.sum(
      max_pool3d(v, 2, 2, lowering=lowering)))).lower(x).as_text()
  assert "select_and_scatter" in hlo("native")
  assert "select_and_scatter" not in hlo("folded")


def numpy_avg_pool_and_grad(x, k, s, p, dy):
  """Average over each k³ window of the zero-padded input (padding counted), and its
  gradient: every input voxel of a window gets dy / k³, accumulated by loops."""
  xp = np.pad(x, [(0, 0)] + [(p, p)] * 3 + [(0, 0)])
  out = [(xp.shape[i] - k) // s + 1 for i in (1, 2, 3)]
  y = np.zeros((x.shape[0], *out, x.shape[4]), np.float64)
  dxp = np.zeros(xp.shape, np.float64)
  for i, j, l in itertools.product(*(range(o) for o in out)):
    window = np.s_[:, i * s:i * s + k, j * s:j * s + k, l * s:l * s + k]
    y[:, i, j, l] = xp[window].mean(axis=(1, 2, 3))
    dxp[window] += dy[:, i, j, l, None, None, None] / k ** 3
  return y, dxp[:, p:xp.shape[1] - p, p:xp.shape[2] - p, p:xp.shape[3] - p]


@pytest.mark.parametrize("k,s,p,shape", [(3, 2, 1, (2, 8, 6, 10, 3)), (3, 1, 1, (1, 5, 4, 6, 2)),
                                         (2, 2, 0, (1, 4, 6, 4, 2)), (3, 2, 0, (1, 7, 9, 5, 2)),
                                         (3, 3, 1, (1, 7, 6, 8, 1))])
def test_avg_pool_equals_numpy_and_native(k, s, p, shape):
  rng = np.random.default_rng(k * 10 + s)
  x = rng.normal(size=shape).astype(np.float32)
  out = [(n + 2 * p - k) // s + 1 for n in shape[1:4]]
  dy = rng.normal(size=(shape[0], *out, shape[4])).astype(np.float32)
  y_ref, dx_ref = numpy_avg_pool_and_grad(x, k, s, p, dy)
  for lowering in ("folded", "native"):
    y, vjp = jax.vjp(lambda v, lowering=lowering: avg_pool3d(v, k, s, (p, p), lowering),
                     jnp.asarray(x))
    np.testing.assert_allclose(np.asarray(y), y_ref, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(vjp(jnp.asarray(dy))[0]), dx_ref, rtol=1e-5,
                               atol=1e-6)


def test_avg_pool_with_padding_per_axis_equals_numpy():
  """Valid in depth, padded in height and width (how `sdl.models.slabs` runs a slab): the
  same as the numpy pool of the volume padded that way by hand."""
  rng = np.random.default_rng(3)
  x = rng.normal(size=(1, 9, 6, 8, 2)).astype(np.float32)
  pads = ((0, 0), (1, 1), (1, 1))
  xp = np.pad(x, [(0, 0), (0, 0), (1, 1), (1, 1), (0, 0)])
  dy = rng.normal(size=(1, 4, 3, 4, 2)).astype(np.float32)
  y_ref, dxp = numpy_avg_pool_and_grad(xp, 3, 2, 0, dy)
  for lowering in ("folded", "native"):
    y, vjp = jax.vjp(lambda v, lowering=lowering: avg_pool3d(v, 3, 2, pads, lowering),
                     jnp.asarray(x))
    np.testing.assert_allclose(np.asarray(y), y_ref, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(vjp(jnp.asarray(dy))[0]), dxp[:, :, 1:-1, 1:-1],
                               rtol=1e-5, atol=1e-6)


def test_folded_avg_pool_gradient_has_no_reduce_window():
  x = jnp.ones((1, 8, 8, 8, 2))
  hlo = lambda lowering: jax.jit(jax.grad(lambda v: jnp.sum(
      avg_pool3d(v, 3, 2, (1, 1), lowering)))).lower(x).compile().as_text()
  assert "reduce-window" in hlo("native")  # XLA's gradient: a window sum of the padded dy
  assert "reduce-window" not in hlo("folded")


@pytest.mark.parametrize("shape", [(2, 4), (1, 8), (2, 2, 2)])
@pytest.mark.parametrize("k,s,p", [(3, 2, 1), (3, 1, 1), (2, 2, 0)])
def test_sharded_avg_pool_equals_one_device(shape, k, s, p):
  """Depth (and height) split: per-shard pooling with halos == unsplit native pooling."""
  rng = np.random.default_rng(0)
  x = rng.normal(size=(2, 16, 8, 6, 3)).astype(np.float32)
  weights = rng.normal(size=(2, (16 + 2 * p - k) // s + 1, (8 + 2 * p - k) // s + 1,
                             (6 + 2 * p - k) // s + 1, 3)).astype(np.float32)
  loss = lambda pool, v: jnp.sum(jnp.sin(pool(v)) * weights)
  native = functools.partial(avg_pool3d, kernel=k, stride=s, padding=(p, p), lowering="native")
  y_ref, dx_ref = jax.value_and_grad(lambda v: loss(native, v))(x)
  mesh = make_mesh(shape, ("data", "spatial", "spatial_h")[:len(shape)])
  part = Partitioner.create(mesh)
  sharded = functools.partial(avg_pool3d, kernel=k, stride=s, padding=(p, p),
                              lowering="folded", partitioner=part)
  xs = jax.device_put(x, part.sharding(VOLUME_AXES))
  step = jax.jit(jax.value_and_grad(lambda v: loss(sharded, v)))
  y, dx = step(xs)
  np.testing.assert_allclose(float(y), float(y_ref), rtol=1e-5)
  np.testing.assert_allclose(np.asarray(dx), np.asarray(dx_ref), rtol=1e-5, atol=1e-6)
  hlo = step.lower(xs).compile().as_text()
  assert "all-gather" not in hlo
  assert ("collective-permute" in hlo) == (shape[1] > 1 and not (k == s and p == 0))
