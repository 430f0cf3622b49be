"""Non-overlapping 3D max pooling with a lowering chosen per backend, like `sdl.models.conv`.

`flax.linen.max_pool` is a `reduce_window`, whose gradient XLA runs as `select_and_scatter`.
XLA:CPU executes that slowly: for CosmoFlow's first pool (2 x 128³ x 32 fp32) forward and
backward took 2.5 s, against 0.35 s with this module's reshape and gradient (2-core
EPYC, 2026-11-27, scratch timings; whole-step numbers in docs/benchmarks.md). When the
window equals the stride and there is no padding, the window is a reshape,

    y[n, i, j, l, c] = max over (a, b, e) in {0..k-1}³ of x[n, k i + a, k j + b, k l + e, c],

and the gradient goes, as `select_and_scatter` sends it, to the *first* maximum of each
window in row-major (depth, height, width) order, so both lowerings agree exactly, ties
included (empty regions of a CosmoFlow volume pool constant windows). On GPU/TPU, and for
overlapping or padded windows, the native op runs. `sdl.models.conv.default_lowering` is
the one place that decides: "folded" there means "the CPU lowerings".
"""
import functools
import itertools

import flax.linen as nn
import jax
import jax.numpy as jnp

from sdl.models.conv import LOWERINGS, default_lowering


def max_pool3d(x, kernel: int, stride: int, padding: tuple[int, int] = (0, 0),
               lowering: str = "auto"):
  """3D max pooling of NDHWC `x` with a cubic window; `lowering` as in `sdl.models.conv`."""
  lowering = default_lowering() if lowering == "auto" else lowering
  if lowering not in LOWERINGS[1:]:
    raise ValueError(f"pool lowering {lowering!r}: choose one of {LOWERINGS}")
  reshapeable = (kernel == stride and tuple(padding) == (0, 0)
                 and all(n % kernel == 0 for n in x.shape[1:4]))
  if lowering == "native" or not reshapeable:
    return nn.max_pool(x, (kernel,) * 3, (stride,) * 3, (tuple(padding),) * 3)
  return _window_max(x, kernel)


def _windows(x, k):
  n, d, h, w, c = x.shape
  return x.reshape(n, d // k, k, h // k, k, w // k, k, c)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def _window_max(x, k):
  return _windows(x, k).max(axis=(2, 4, 6))


def _window_max_fwd(x, k):
  y = _window_max(x, k)
  return y, (x, y)


def _window_max_bwd(k, residuals, dy):
  x, y = residuals
  xw = _windows(x, k)
  # Per output: the row-major position of its window's first maximum. Working on
  # output-sized arrays (one strided view of x per position) and then one broadcast
  # select keeps the gradient at about one pass over x.
  taps = list(itertools.product(range(k), repeat=3))
  first = jnp.full(y.shape, len(taps), jnp.int32)
  for p in reversed(range(len(taps))):  # earlier positions overwrite later ones
    a, b, e = taps[p]
    first = jnp.where(xw[:, :, a, :, b, :, e, :] == y, p, first)
  r = jnp.arange(k)
  position = (r[:, None, None] * k * k + r[None, :, None] * k + r[None, None, :]).reshape(
      1, 1, k, 1, k, 1, k, 1)
  expand = lambda v: v[:, :, None, :, None, :, None, :]
  dx = jnp.where(position == expand(first), expand(dy), jnp.zeros((), dy.dtype))
  return (dx.reshape(x.shape),)


_window_max.defvjp(_window_max_fwd, _window_max_bwd)
