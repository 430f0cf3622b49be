"""Non-overlapping 3D max pooling with a lowering chosen per backend, like `sdl.models.conv`.

`flax.linen.max_pool` is a `reduce_window`, whose gradient XLA runs as `select_and_scatter`.
XLA:CPU executes that slowly: for CosmoFlow's first pool (2 x 128³ x 32 fp32) forward and
backward took 2.3 s against 0.8 s with this module's reshape and gradient (2-core EPYC,
2026-11-27, a scratch timing; the whole mlperf step went from 11.5 to 9.3 s in
`experiments.cosmoflow_step_bench`, docs/benchmarks.md). When the window equals the
stride and there is no padding, the window is a reshape,

    y[n, i, j, l, c] = max over (a, b, e) in {0..k-1}³ of x[n, k i + a, k j + b, k l + e, c],

and the gradient goes, as `select_and_scatter` sends it, to the *first* maximum of each
window in row-major (depth, height, width) order, so both lowerings agree exactly, ties
included (empty regions of a CosmoFlow volume pool constant windows). On GPU/TPU, and for
overlapping or padded windows, the native op runs. `sdl.models.conv.default_lowering` is
the one place that decides: "folded" there means "the CPU lowerings".
"""
import functools

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
  hit = _windows(x, k) == y[:, :, None, :, None, :, None, :]
  first = _first_along(_first_along(_first_along(hit, 6), 4), 2)
  dx = jnp.where(first, dy[:, :, None, :, None, :, None, :], jnp.zeros((), dy.dtype))
  return (dx.reshape(x.shape),)


_window_max.defvjp(_window_max_fwd, _window_max_bwd)


def _first_along(hit, axis):
  """Keep, along window axis `axis`, only the first slice holding a True: a position stays
  if no earlier slice along `axis` has a True anywhere in its inner window axes. Applied
  to the width, then height, then depth axis this leaves each window's first True in
  row-major order."""
  k = hit.shape[axis]
  inner = tuple(a for a in (4, 6) if a > axis)
  seen = jnp.zeros_like(jnp.take(hit, 0, axis=axis))
  parts = []
  for i in range(k):
    part = jnp.take(hit, i, axis=axis)
    parts.append(part & ~_any_inner(seen, inner, axis))
    seen = seen | part
  return jnp.stack(parts, axis=axis)


def _any_inner(seen, inner, axis):
  """`seen` (with `axis` removed) reduced to any() over the inner window axes, kept as size 1
  so it broadcasts back over them."""
  axes = tuple(a - 1 for a in inner)  # positions after `axis` was removed
  return seen.any(axis=axes, keepdims=True) if axes else seen
