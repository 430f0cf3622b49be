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
position `s o + t`; grouped by the position's phase mod `s` that is a sum of shifted
copies of `g`, interleaved (`_scatter_windows`): one fused pass over the input gradient
(the lbann CosmoFlow step went from 6.97 to 4.44 s with a separable gradient;
`experiments.cosmoflow_step_bench`, docs/benchmarks.md). Under a
partitioner the op runs per shard in `shard_map` with halos from the neighbours
(`sdl.models.conv.per_shard`), as the folded convolution does, so a depth split costs no
all-gather; its gradient fetches the few pooled-size planes of the cotangent that reach
a shard's own voxels from the neighbours, rather than sending halo gradients back.
"""
import functools
import itertools

import flax.linen as nn
import jax
import jax.numpy as jnp

from jax import lax

from sdl.models.conv import extend, per_shard, resolve_lowering
from sdl.parallel.halo import exchange_halo, halo_planes
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


def avg_pool3d(x, kernel: int, stride: int, padding=(0, 0), lowering: str = "auto",
               partitioner: Partitioner | None = None, logical=VOLUME_AXES):
  """3D average pooling of NDHWC `x` (cubic window; zero padding counted in the mean).

  `padding`: one (low, high) pair for every spatial axis, or a pair per axis (depth,
  height, width). `partitioner`/`logical` say how `x` is laid out on the mesh; the CPU
  lowering then runs per shard with halo exchange (module docstring). The native lowering
  is `flax.linen.avg_pool`, partitioned by GSPMD.
  """
  pads = per_axis(padding)
  if resolve_lowering(lowering, "pool") == "native":
    return nn.avg_pool(x, (kernel,) * 3, (stride,) * 3, pads, count_include_pad=True)

  def local(x, depth_axis=None, height_axis=None, reduce_axes=()):
    del reduce_axes  # no parameters
    return _avg_pool(x, kernel, stride, pads, (depth_axis, height_axis, None))

  return per_shard(local, x, partitioner=partitioner, logical=logical)


def per_axis(padding) -> tuple[tuple[int, int], ...]:
  """A (low, high) pair, or one per spatial axis, as one (low, high) pair per axis."""
  if len(padding) == 2 and all(isinstance(p, int) for p in padding):
    return (tuple(padding),) * 3
  return tuple(tuple(int(v) for v in p) for p in padding)


SPATIAL = (1, 2, 3)  # the depth, height and width dimensions of NDHWC


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3, 4))
def _avg_pool(x, k, s, padding, axis_names):
  """One shard's average pooling; `padding`: a (low, high) pair per spatial axis;
  `axis_names[i]`: the mesh axis that spatial dimension `i` is split over inside
  `shard_map`, or None (it is zero-padded instead)."""
  split = [(dim, name) for dim, name in zip(SPATIAL, axis_names) if name is not None]
  # halo planes from the neighbours (`extend`): low before, k - low - s after
  high = {dim: k - padding[dim - 1][0] - s for dim, _ in split}
  if any(h < 0 for h in high.values()) or any(x.shape[dim] < k for dim, _ in split):
    for dim, name in zip(SPATIAL, axis_names):  # general case: form the extended slab
      x = extend(x, name, dim, k, s, padding[dim - 1])
    return _window_sum(x, k, s, {}) / k ** 3
  pads = {dim: (padding[dim - 1][0], high[dim]) if name is not None else padding[dim - 1]
          for dim, name in zip(SPATIAL, axis_names)}
  return _halo_window_sum(x, k, s, split, pads) / k ** 3


def _window_sum(x, k, s, pads):
  """Window sums of `x` zero-padded by `pads[dim]` (none for dimensions not in it)."""
  padding = [(0, 0)] + [pads.get(dim, (0, 0)) for dim in SPATIAL] + [(0, 0)]
  return lax.reduce_window(x, jnp.zeros((), x.dtype), lax.add, (1, k, k, k, 1),
                           (1, s, s, s, 1), padding)


def _halo_window_sum(x, k, s, split, pads):
  """Window sums of `x` extended by its neighbours' planes along the `split` dimensions,
  without forming the extended slab (a copy of the whole activation, at the step's memory
  peak after the first convolution): the sums over zero padding in place of the halos,
  whose first and last output planes are then recomputed from thin slabs (halo plus the
  few own planes those windows cover)."""
  if not split:
    return _window_sum(x, k, s, pads)
  (dim, name), rest = split[0], split[1:]
  out = _halo_window_sum(x, k, s, rest, pads)  # exact but for the planes next to halos
  low, high = pads[dim]
  size = x.shape[dim]
  before, after = halo_planes(x, name, dim, low, high)
  valid = {**pads, dim: (0, 0)}
  if low:
    n = -(-low // s)  # outputs whose windows reach into the previous shard
    thin = jnp.concatenate([before, lax.slice_in_dim(x, 0, s * (n - 1) + k - low, axis=dim)],
                           axis=dim)
    out = lax.dynamic_update_slice_in_dim(out, _halo_window_sum(thin, k, s, rest, valid),
                                          0, axis=dim)
  if high:
    first = -(-(low + size - k + 1) // s)  # the first output reaching into the next shard
    thin = jnp.concatenate([lax.slice_in_dim(x, s * first - low, size, axis=dim), after],
                           axis=dim)
    out = lax.dynamic_update_slice_in_dim(out, _halo_window_sum(thin, k, s, rest, valid),
                                          first, axis=dim)
  return out


def _avg_pool_fwd(x, k, s, padding, axis_names):
  return _avg_pool(x, k, s, padding, axis_names), x.shape


def _avg_pool_bwd(k, s, padding, axis_names, shape, g):
  """The input gradient of this shard's own voxels, in one pass over them.

  Voxel `i` (in padded coordinates) gets `g[o] / k³` from every window `o` that holds it.
  Under a split, the windows of a shard's last voxels may belong to the next shard (and
  its first voxels' to the previous one): those few planes of `g`, pooled-size, come over
  by halo exchange, so the gradient is never formed for the halo and sent back.
  """
  offsets = []
  for dim, name in zip(SPATIAL, axis_names):
    low = padding[dim - 1][0]
    if name is None:  # g holds every window of this dimension
      offsets.append(low)
      continue
    assert g.shape[dim] * s == shape[dim], (shape, g.shape, s)  # sdl.parallel.spatial
    before = (k - 1 - low) // s          # windows of the previous shard reaching here
    after = (low - 1) // s + 1           # and of the next one
    g = exchange_halo(g, name, dim, before, after)
    offsets.append(low + s * before)
  return (_scatter_windows(g / k ** 3, k, s, [shape[d] for d in SPATIAL], offsets),)


_avg_pool.defvjp(_avg_pool_fwd, _avg_pool_bwd)


def _scatter_windows(g, k, s, sizes, offsets):
  """The transpose of the stride-`s` `k`³ window sum, at positions `offsets[a]` to
  `offsets[a] + sizes[a]` of each spatial axis (position `x` lies in windows
  `o = (x - t) / s` for taps `t < k`; positions past `g`'s windows get zeros).

  Along an axis, by phase `r = x mod s`: `x = s q + r` is tap `r + s j` of window `q - j`,
  so each phase is a sum of shifted copies of `g`; the `s`³ phase combinations of the three
  axes interleave (stacks and a reshape) into the output. Every read is of the pooled-size
  `g`, so XLA fuses the whole gradient into one pass that writes only the input-sized
  result (summing `k` dilated pads per axis, one axis at a time, left up to three
  input-sized temporaries at the lbann CosmoFlow step's memory peak;
  `experiments.cosmoflow_memory --peak`).
  """
  taps = [len(range(r, k, s)) for r in range(s)]  # windows that reach each phase
  reach = max(taps) - 1
  q = [-(-(offset + size) // s) for offset, size in zip(offsets, sizes)]  # per phase
  pad = [(0, 0)] * g.ndim
  for dim, n in zip(SPATIAL, q):
    pad[dim] = (reach, max(0, n - g.shape[dim]))
  g = jnp.pad(g, pad)

  def shifted(js):
    start, limit = [0] * g.ndim, list(g.shape)
    for dim, j, n in zip(SPATIAL, js, q):
      start[dim], limit[dim] = reach - j, reach - j + n
    return lax.slice(g, start, limit)

  def phase(rs):
    terms = [shifted(js) for js in itertools.product(*(range(taps[r]) for r in rs))]
    return functools.reduce(jnp.add, terms) if terms else jnp.zeros_like(shifted((0,) * 3))

  def interleave(rs):  # the phases rs + (r, ...) for every r of the remaining axes
    if len(rs) == 3:
      return phase(rs)
    return jnp.stack([interleave((*rs, r)) for r in range(s)], axis=2 + len(rs))

  x = interleave(())  # [n, qd, s, qh, s, qw, s, c]
  x = x.reshape(x.shape[0], q[0] * s, q[1] * s, q[2] * s, x.shape[-1])
  start = (0, *offsets, 0)
  return lax.slice(x, start, (x.shape[0], *(o + n for o, n in zip(offsets, sizes)),
                              x.shape[-1]))
