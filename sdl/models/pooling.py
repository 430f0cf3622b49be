"""3D max and average pooling with a lowering chosen per backend, like `sdl.models.conv`.

Max pooling (non-overlapping windows).

`flax.linen.max_pool` is a `reduce_window`, whose gradient XLA runs as `select_and_scatter`.
XLA:CPU executes that slowly (with this module's lowering the mlperf CosmoFlow step went
from 11.5 to 8.1-8.9 s; `experiments.cosmoflow_step_bench`, docs/benchmarks.md). When
the window equals the stride and there is no padding, the window is a reshape,

    y[n, i, j, l, c] = max over (a, b, e) in {0..k-1}³ of x[n, k i + a, k j + b, k l + e, c],

and the gradient goes, as `select_and_scatter` sends it, to the *first* maximum of each
window in row-major (depth, height, width) order, so both lowerings agree exactly, ties
included (empty regions of a CosmoFlow volume pool constant windows). On GPU/TPU, and for
overlapping or padded windows, the native op runs. `sdl.models.conv.default_lowering` is
the one place that decides: "folded" there means "the CPU lowerings".

Average pooling (any window, stride and zero padding, the padding counted as cuDNN's
default mode and `flax.linen.avg_pool(count_include_pad=True)` do). The forward pass is
XLA's `reduce_window`, which is fast; its autodiff gradient is a `reduce_window` over a
dilated, padded cotangent, which XLA:CPU runs slowly. The window sum is separable, so
its transpose is too: along each axis, tap `t` of a stride-`s` window sends `g[o]` to
position `s o + t`, i.e. `g` padded by `t` with `s - 1` zeros between elements; summing
the `k` shifted pads per axis gives the input gradient (the lbann CosmoFlow step went from
6.97 to 4.44 s with it; `experiments.cosmoflow_step_bench`, docs/benchmarks.md). Under a
partitioner the op runs per shard in `shard_map` with halos from the neighbours
(`sdl.models.conv.per_shard`), as the folded convolution does, so a depth split costs no
all-gather.
"""
import functools
import itertools

import flax.linen as nn
import jax
import jax.numpy as jnp

from jax import lax

from sdl.models.conv import extend, per_shard, resolve_lowering
from sdl.parallel.sharding import VOLUME_AXES, Partitioner


def max_pool3d(x, kernel: int, stride: int, padding: tuple[int, int] = (0, 0),
               lowering: str = "auto"):
  """3D max pooling of NDHWC `x` with a cubic window; `lowering` as in `sdl.models.conv`."""
  lowering = resolve_lowering(lowering, "pool")
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


def avg_pool3d(x, kernel: int, stride: int, padding: tuple[int, int] = (0, 0),
               lowering: str = "auto", partitioner: Partitioner | None = None,
               logical=VOLUME_AXES):
  """3D average pooling of NDHWC `x` (cubic window; zero padding counted in the mean).

  `partitioner`/`logical` say how `x` is laid out on the mesh; the CPU lowering then runs
  per shard with halo exchange (module docstring). The native lowering is
  `flax.linen.avg_pool`, partitioned by GSPMD.
  """
  if resolve_lowering(lowering, "pool") == "native":
    return nn.avg_pool(x, (kernel,) * 3, (stride,) * 3, (tuple(padding),) * 3,
                       count_include_pad=True)

  def local(x, depth_axis=None, height_axis=None, reduce_axes=()):
    del reduce_axes  # no parameters
    x = extend(x, depth_axis, 1, kernel, stride, padding)
    x = extend(x, height_axis, 2, kernel, stride, padding)
    x = extend(x, None, 3, kernel, stride, padding)
    return _window_sum(x, kernel, stride) / kernel ** 3

  return per_shard(local, x, partitioner=partitioner, logical=logical)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2))
def _window_sum(x, k, s):
  """Sums over the valid `k`³ windows of NDHWC `x`, stride `s` (a `reduce_window`)."""
  return lax.reduce_window(x, jnp.zeros((), x.dtype), lax.add, (1, k, k, k, 1),
                           (1, s, s, s, 1), "VALID")


def _window_sum_fwd(x, k, s):
  return _window_sum(x, k, s), x.shape


def _window_sum_bwd(k, s, shape, g):
  zero = jnp.zeros((), g.dtype)
  for axis in (3, 2, 1):  # separable: one axis at a time, ending at the input's shape
    size, out = shape[axis], g.shape[axis]
    taps = []
    for t in range(k):
      config = [(0, 0, 0)] * g.ndim
      config[axis] = (t, size - t - s * (out - 1) - 1, s - 1)
      taps.append(lax.pad(g, zero, config))
    g = functools.reduce(jnp.add, taps)
  return (g,)


_window_sum.defvjp(_window_sum_fwd, _window_sum_bwd)
