"""Max pooling's CPU lowering against numpy and against XLA's reduce_window, ties included."""
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sdl.models.pooling import max_pool3d


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
