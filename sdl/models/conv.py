"""3D convolution with a lowering chosen per backend: native, or depth-folded onto 2D.

XLA:CPU's native 3D convolution is slow (4-38 GFLOP/s on 2 cores where oneDNN reaches
37-112 for the same layers; docs/design/folded-conv.md). Folding the depth taps into channels
turns a `kd x kh x kw` 3D convolution into one 2D convolution over `batch * depth_out`
images with `kd * C` input channels,

    y[n, z] = conv2d(concat_a x[n, z * s_d + a - p_d], kernel.reshape(kh, kw, kd * C, O)),

which XLA:CPU runs through its fast 2D path (Eigen/oneDNN GEMMs). GPUs and TPUs keep the
native op. `default_lowering` is the one place that decides.

Within the folded (CPU) lowering two kinds of layer take another route, each decided in
one place: stride-1 layers with few input channels (the first layer of CosmoFlow or a 3D
U-Net, whose reduction is too shallow for a GEMM) or with long rows and a cache-sized
kernel run `sdl.kernels.conv3d`'s direct kernel (`sdl.kernels.conv3d.use_direct`, see
`direct`; per shard under a partitioner, like the fold); output planes of at most
`GEMM_MAX_PLANE` positions run as one GEMM (`patches_gemm`).

Under spatial partitioning the fold reshapes the depth axis into the batch, which the SPMD
partitioner could only do by gathering whole activations. So with a `partitioner` the
folded convolution runs per shard inside `jax.shard_map`: depth (and height) halos come
from the neighbouring shards by `ppermute` (`sdl.parallel.halo`), then each device folds
its own slab. Parameters are those of `flax.linen.Conv` (`kernel` `[kd, kh, kw, C, O]`,
`bias` `[O]`, same initialisers), so the lowering can change without touching checkpoints.
"""
import functools
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import PartitionSpec

from sdl.kernels import conv3d as direct_kernels
from sdl.ops.windows import window_patches
from sdl.parallel.halo import exchange_halo
from sdl.parallel.sharding import VOLUME_AXES, Partitioner

LOWERINGS = ("auto", "native", "folded")


def default_lowering(backend: str | None = None) -> str:
  """The convolution lowering for a backend: folded on CPU, native elsewhere."""
  return "folded" if (backend or jax.default_backend()) == "cpu" else "native"


def resolve_lowering(lowering: str, op: str = "conv") -> str:
  """"auto" → this backend's default; otherwise `lowering`, checked."""
  if lowering not in LOWERINGS:
    raise ValueError(f"{op} lowering {lowering!r}: choose one of {LOWERINGS}")
  return default_lowering() if lowering == "auto" else lowering


def conv3d_native(x, kernel, strides, padding):
  return lax.conv_general_dilated(x, kernel, strides, padding,
                                  dimension_numbers=("NDHWC", "DHWIO", "NDHWC"))


def fold_depth(x, kernel, strides, width_padding, reduce_axes=()):
  """Valid-in-depth-and-height 3D convolution as one 2D convolution (see module docstring).

  x `[n, D, H, W, C]` already padded (or halo-extended) in depth and height;
  kernel `[kd, kh, kw, C, O]` → `[n, D_out, H_out, W_out, O]`.
  """
  kd, kh, kw, c, o = kernel.shape
  n, depth = x.shape[:2]
  sd = strides[0]
  d_out = (depth - kd) // sd + 1
  taps = [lax.slice_in_dim(x, a, a + sd * (d_out - 1) + 1, stride=sd, axis=1)
          for a in range(kd)]
  folded = jnp.concatenate(taps, axis=-1) if kd > 1 else taps[0]  # [n, D_out, H, W, kd*C]
  folded = folded.reshape(n * d_out, *folded.shape[2:])
  kernel2d = kernel.transpose(1, 2, 0, 3, 4).reshape(kh, kw, kd * c, o)
  y = conv2d(folded, kernel2d, tuple(strides[1:]), tuple(width_padding), reduce_axes)
  return y.reshape(n, d_out, *y.shape[1:])


def _conv2d(x, kernel, strides, width_padding):
  return lax.conv_general_dilated(x, kernel, strides, [(0, 0), width_padding],
                                  dimension_numbers=("NHWC", "HWIO", "NHWC"))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def conv2d(x, kernel, strides, width_padding, reduce_axes=()):
  """2D convolution (valid in height) whose kernel gradient is computed as GEMMs.

  XLA:CPU's filter-gradient convolution is slow on folded shapes; the same gradient as
  one `[kd*C, positions] @ [positions, O]` product per (kh, kw) tap is several times
  faster (mlperf conv3 fwd+bwd: 19 → 79 GFLOP/s in `experiments.layer_bench`, see
  docs/benchmarks.md). The input gradient stays XLA's, which is fast. Inside `shard_map`,
  `reduce_axes` names the mesh axes the input is split over, across which the kernel
  gradient is summed.
  """
  return _conv2d(x, kernel, strides, width_padding)


def _conv2d_fwd(x, kernel, strides, width_padding, reduce_axes):
  return _conv2d(x, kernel, strides, width_padding), (x, kernel)


def _conv2d_bwd(strides, width_padding, reduce_axes, residuals, dy):
  x, kernel = residuals
  _, input_vjp = jax.vjp(lambda x: _conv2d(x, kernel, strides, width_padding), x)
  (dx,) = input_vjp(dy)
  x = jnp.pad(x, [(0, 0), (0, 0), width_padding, (0, 0)])
  dkernel = kernel_gradient(x, dy, kernel.shape[:2], strides).astype(kernel.dtype)
  # Inside shard_map a kernel replicated over the mesh gets the sum of every shard's
  # contribution (what autodiff inserts for a replicated input, done by hand here).
  return dx, lax.psum(dkernel, reduce_axes) if reduce_axes else dkernel


# Images per chunk of the kernel gradient: as many as fit this many bytes of input and
# output gradient, so that each tap's strided view is re-read from cache, not from DRAM.
KERNEL_GRADIENT_CHUNK_BYTES = 8 << 20


def kernel_gradient(x, dy, kernel_hw, strides):
  """`dk[i, j] = Σ_positions x[tap (i, j)]ᵀ dy`: one GEMM per tap, over chunks of images.

  x `[b, H, W, C]` (padded), dy `[b, H_out, W_out, O]` → float32 `[kh, kw, C, O]`. Over
  the whole batch every tap's strided view of `x` is copied out of DRAM and read back
  (9 times the input for 3 x 3); a `scan` over chunks of a few MiB keeps those copies in
  cache (the mlperf CosmoFlow step went from 9.6 to 7.2 s with it, lbann's from 4.4 to
  3.4 s; `experiments.cosmoflow_step_bench`, docs/benchmarks.md).
  """
  (kh, kw), (sh, sw) = kernel_hw, strides
  b, c, (h_out, w_out, o) = x.shape[0], x.shape[-1], dy.shape[1:]

  def taps(x, dy):
    dy2 = dy.reshape(-1, o)
    view = lambda i, j: lax.slice(x, (0, i, j, 0), (x.shape[0], i + sh * (h_out - 1) + 1,
                                                    j + sw * (w_out - 1) + 1, c),
                                  (1, sh, sw, 1)).reshape(-1, c)
    return jnp.stack([jnp.stack([jnp.dot(view(i, j).T, dy2, preferred_element_type=jnp.float32)
                                 for j in range(kw)]) for i in range(kh)])

  per_image = x[0].size * x.dtype.itemsize + dy[0].size * dy.dtype.itemsize
  chunk = max(d for d in range(1, b + 1)
              if b % d == 0 and (d == 1 or d * per_image <= KERNEL_GRADIENT_CHUNK_BYTES))
  if chunk == b:
    return taps(x, dy)
  xs, dys = (v.reshape(b // chunk, chunk, *v.shape[1:]) for v in (x, dy))
  # The first chunk starts the sum: a zeros carry would not be "varying" over the mesh axes
  # inside `shard_map`, and `scan` refuses carries whose types change.
  total, _ = lax.scan(lambda acc, xy: (acc + taps(*xy), None), taps(xs[0], dys[0]),
                      (xs[1:], dys[1:]))
  return total


conv2d.defvjp(_conv2d_fwd, _conv2d_bwd)


def extend(x, axis_name, dim, kernel, stride, padding):
  """Pad (unsplit) or halo-extend (split) `dim` so a valid window op gives the output."""
  low, high_pad = padding
  if axis_name is None:
    return exchange_halo(x, None, dim, low, high_pad)
  high = kernel - low - stride  # planes of the next shard the last outputs need
  x = exchange_halo(x, axis_name, dim, low, max(high, 0))
  return lax.slice_in_dim(x, 0, x.shape[dim] + high, axis=dim) if high < 0 else x


# Output planes of at most this many positions (h_out x w_out per image and depth) take
# one GEMM over all taps instead of XLA's 2D convolution, which is overhead-bound there:
# lbann's 2³ x 256 → 256 layers ran at 2-3 GFLOP/s folded, 19 forward and 43 forward +
# backward as a GEMM (`experiments.layer_bench`, docs/benchmarks.md). 4³ layers (planes of
# 16) gain too: 4³ x 128 → 256, batch 2, forward / forward + backward 123 / 115 GFLOP/s
# folded, 141 / 147 as a GEMM; at 8³ (64) not on every pass (`experiments.lowering_checks
# --check=planes`, docs/design/folded-conv.md).
GEMM_MAX_PLANE = 16


def _plane_out(x, kernel, strides, width_padding):
  h_out = (x.shape[2] - kernel.shape[1]) // strides[1] + 1
  w_out = (x.shape[3] + sum(width_padding) - kernel.shape[2]) // strides[2] + 1
  return h_out * w_out


def patches_gemm(x, kernel, strides, width_padding):
  """Valid-in-depth-and-height 3D convolution as one `[positions, kd*kh*kw*C] @ [.., O]`."""
  x = jnp.pad(x, [(0, 0), (0, 0), (0, 0), width_padding, (0, 0)])
  patches = window_patches(x, kernel.shape[:3], strides)
  return patches @ kernel.reshape(-1, kernel.shape[-1])


def per_shard(local, x, *params, partitioner: Partitioner | None = None,
              logical: Sequence[str | None] = VOLUME_AXES):
  """Run the window op `local` on each shard of `x` inside `jax.shard_map`.

  `local(x, *params, depth_axis=, height_axis=, reduce_axes=)` sees its own slab, the whole
  parameters, and the names of the mesh axes its depth and height are split over (None:
  not split; it pads instead of exchanging halos, see `extend`) and of every axis `x` is
  split over (for sums of parameter gradients). Without a partitioner it runs once,
  unsplit. Parameters split by the partitioner's `params="fsdp"` enter as their shards and
  are gathered here (`gather_param`), once this layer's input exists.
  """
  if partitioner is None:
    return local(x, *params)
  spec = partitioner.spec(logical)
  mesh = partitioner.mesh
  split = lambda axis: axis if axis is not None and mesh.shape[axis] > 1 else None
  split_over = tuple(a for entry in spec if entry is not None
                     for a in (entry if isinstance(entry, tuple) else (entry,)))
  axes = {"depth_axis": split(spec[1]), "height_axis": split(spec[2]),
          "reduce_axes": split_over}
  param_specs = [partitioner.param_spec(p.shape) for p in params]

  def body(x, *shards):
    whole = [gather_param(p, s, x, split_over, mesh) for p, s in zip(shards, param_specs)]
    return local(x, *whole, **axes)
  return jax.shard_map(body, mesh=mesh, in_specs=(spec, *param_specs),
                       out_specs=spec)(x, *params)


def gather_param(shard, spec: PartitionSpec, after, after_axes=(), mesh=None):
  """Inside `shard_map`: the whole parameter from this device's `shard` (split as `spec`).

  Left to itself XLA gathers every layer's parameters at the start of the step, so all of
  them are live at the first layer's memory peak (about 24 MiB per device for lbann's
  convolutions 4-6 at P = 8). Adding `min(|after[0]|, 0)`, zero for any finite or infinite
  value, makes the gather wait for the layer's input `after`. That input varies over the
  mesh axes `after_axes`, and so would the parameter: it is gathered over those of size 1
  too, so that it is the same on every device (unless its split does not cover them,
  where it goes without the wait).
  """
  dims = [d for d, entry in enumerate(spec) if entry is not None]
  if not dims:
    return shard
  (dim,) = dims
  axes = spec[dim] if isinstance(spec[dim], tuple) else (spec[dim],)
  trivial = tuple(a for a in after_axes if a not in axes and mesh.shape[a] == 1)
  if set(after_axes) <= set(axes + trivial):
    anchor = jnp.minimum(jnp.abs(lax.stop_gradient(after).reshape(-1)[0]), 0)
    shard, axes = shard + anchor.astype(shard.dtype), axes + trivial
  # "invarying": every device holds the same whole parameter, as if it entered replicated
  # (so layers whose output is replicated over an axis type-check, and the hand-summed
  # kernel gradients of `conv2d`/`direct` come back as one slice, not summed again)
  return lax.all_gather(shard, axes, axis=dim, tiled=True, to="invarying")


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def direct(x, kernel, width_padding, reduce_axes=()):
  """Stride-1 3D convolution, valid in depth and height, by `sdl.kernels.conv3d`.

  For the layers `sdl.kernels.conv3d.use_direct` picks: few input channels (the mlperf
  CosmoFlow conv1, 128³ x 4 → 32, ran at 57 GFLOP/s folded and at 80-90 direct, its kernel
  gradient at 40 and 176-207), or long rows with a cache-sized kernel (mlperf conv2,
  64³ x 32 → 64: forward 130 → 182, kernel gradient 74 → 197; docs/benchmarks.md, issue
  5). The input gradient goes direct too when the input channels are a multiple of 16,
  else it is the folded lowering's; XLA drops it for a first layer, where nothing uses it.
  """
  x = jnp.pad(x, [(0, 0), (0, 0), (0, 0), width_padding, (0, 0)])
  return direct_kernels.forward(x, kernel)


def _direct_fwd(x, kernel, width_padding, reduce_axes):
  return direct(x, kernel, width_padding, reduce_axes), (x, kernel)


def _direct_bwd(width_padding, reduce_axes, residuals, dy):
  x, kernel = residuals
  dy = direct_kernels.varying_like(dy, x)  # a cotangent may arrive typed as invariant
  padded = jnp.pad(x, [(0, 0), (0, 0), (0, 0), width_padding, (0, 0)])
  dkernel = direct_kernels.kernel_grad(padded, dy, kernel.shape).astype(kernel.dtype)
  if direct_kernels.input_grad_direct(x.shape[-1]):
    # The input gradient is a full convolution of dy with the flipped kernel, inputs and
    # outputs swapped: a valid one of dy padded by the kernel size - 1, then the width
    # padding cut off again.
    kd, kh, kw = kernel.shape[:3]
    dy_full = jnp.pad(dy, [(0, 0), (kd - 1, kd - 1), (kh - 1, kh - 1), (kw - 1, kw - 1), (0, 0)])
    flipped = jnp.flip(kernel, (0, 1, 2)).swapaxes(3, 4)
    dx = direct_kernels.forward(dy_full, flipped)
    dx = lax.slice_in_dim(dx, width_padding[0], width_padding[0] + x.shape[3], axis=3)
  else:
    # (reduce_axes: the folded vjp also forms a kernel gradient, summed over the shards to
    # type-check, then dropped by XLA, as nothing uses it)
    _, input_vjp = jax.vjp(
        lambda x: fold_depth(x, kernel, (1, 1, 1), width_padding, reduce_axes), x)
    (dx,) = input_vjp(dy)
  return dx.astype(x.dtype), lax.psum(dkernel, reduce_axes) if reduce_axes else dkernel


direct.defvjp(_direct_fwd, _direct_bwd)


def conv3d_folded(x, kernel, strides, padding, partitioner: Partitioner | None = None,
                  logical: Sequence[str | None] = VOLUME_AXES):
  """The folded lowering; per shard (with halo exchange) when a partitioner is given."""
  kd, kh = kernel.shape[:2]

  def local(x, kernel, depth_axis=None, height_axis=None, reduce_axes=()):
    x = extend(x, depth_axis, 1, kd, strides[0], padding[0])
    x = extend(x, height_axis, 2, kh, strides[1], padding[1])
    if _plane_out(x, kernel, strides, padding[2]) <= GEMM_MAX_PLANE:
      return patches_gemm(x, kernel, strides, padding[2])  # autodiff sums over shards
    w_out = x.shape[3] + sum(padding[2]) - kernel.shape[2] + 1
    if direct_kernels.use_direct(kernel.shape, strides, w_out, x.dtype):
      return direct(x, kernel, tuple(padding[2]), reduce_axes)
    return fold_depth(x, kernel, strides, padding[2], reduce_axes)

  return per_shard(local, x, kernel, partitioner=partitioner, logical=logical)


def saved_as(fn, dtype):
  """`fn(x, *params)` whose backward pass keeps `x` only in `dtype` (and the params): it
  recomputes the VJP from that copy. For a convolution nothing of the forward is redone
  (its output is not needed for its gradients, and XLA drops it), so this is storage in
  low precision with compute at full precision; the input gradient does not depend on
  `x`, the kernel gradient sees `x` rounded to `dtype`."""
  @jax.custom_vjp
  def f(x, *params):
    return fn(x, *params)

  def fwd(x, *params):
    return fn(x, *params), (x.astype(dtype), params)

  def bwd(residuals, dy):
    kept, params = residuals
    _, vjp = jax.vjp(fn, kept.astype(dy.dtype), *params)
    return vjp(dy)

  f.defvjp(fwd, bwd)
  return f


class Conv3D(nn.Module):
  """`flax.linen.Conv` for NDHWC volumes, with a per-backend lowering (module docstring)."""
  features: int
  kernel_size: tuple[int, int, int] = (3, 3, 3)
  strides: tuple[int, int, int] = (1, 1, 1)
  padding: tuple[tuple[int, int], ...] = ((1, 1),) * 3
  use_bias: bool = True
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  lowering: str = "auto"
  partitioner: Partitioner | None = None
  logical: tuple[str | None, ...] = VOLUME_AXES  # how the input is laid out on the mesh

  # Keep the input for the kernel gradient in this dtype (bfloat16: half the bytes of the
  # largest saved activations) while computing in `dtype`; None: as computed.
  save_dtype: Any = None

  @nn.compact
  def __call__(self, x):
    kernel = self.param("kernel", nn.initializers.lecun_normal(),
                        (*self.kernel_size, x.shape[-1], self.features), self.param_dtype)
    x, kernel = x.astype(self.dtype), kernel.astype(self.dtype)
    lowering = resolve_lowering(self.lowering, "conv")
    if lowering == "native" or self.is_initializing():  # init only needs the shapes
      conv = functools.partial(conv3d_native, strides=self.strides, padding=self.padding)
    else:
      conv = functools.partial(conv3d_folded, strides=self.strides, padding=self.padding,
                               partitioner=self.partitioner, logical=self.logical)
    if self.save_dtype is not None and not self.is_initializing():
      conv = saved_as(conv, self.save_dtype)
    y = conv(x, kernel)
    if self.use_bias:
      y = y + self.param("bias", nn.initializers.zeros, (self.features,),
                         self.param_dtype).astype(self.dtype)
    return y


# --- transposed convolution (upsampling) -------------------------------------------------


def conv_transpose3d_native(x, kernel, strides):
  """`flax.linen.ConvTranspose(padding="VALID")`'s op: XLA's convolution with a dilated
  input, which GPUs and TPUs run well."""
  return lax.conv_transpose(x, kernel, strides, "VALID",
                            dimension_numbers=("NDHWC", "DHWIO", "NDHWC"))


def depth_to_space(x, kernel):
  """The transposed convolution whose kernel equals its stride (no overlap) as one GEMM
  and a depth-to-space reshuffle:

      y[n, k i + a, k j + b, k l + e] = x[n, i, j, l] @ kernel[k-1-a, k-1-b, k-1-e]

  (`lax.conv_transpose` without `transpose_kernel` correlates the dilated input with the
  kernel, so output offset `a` meets tap `k - 1 - a`). Every output voxel depends on one
  input voxel: a shard of the input gives its shard of the output, with no halo.
  """
  kd, kh, kw, c, o = kernel.shape
  n, d, h, w, _ = x.shape
  taps = jnp.flip(kernel, (0, 1, 2)).transpose(3, 0, 1, 2, 4).reshape(c, -1)
  y = (x.reshape(-1, c) @ taps).reshape(n, d, h, w, kd, kh, kw, o)
  return y.transpose(0, 1, 4, 2, 5, 3, 6, 7).reshape(n, d * kd, h * kh, w * kw, o)


class ConvTranspose3D(nn.Module):
  """`flax.linen.ConvTranspose` with kernel = stride and "VALID" padding (the U-Net's
  2³ stride-2 upsampling), same parameters (`kernel` `[kd, kh, kw, C, O]`, `bias`).

  XLA:CPU runs the native op very slowly (jax#31662): 2-10 GFLOP/s on the U-Net's
  upsamplings, where `depth_to_space` runs at 150-180 (`experiments.layer_bench`,
  `convT3d` rows in docs/benchmarks.md). So the folded lowering runs it as
  `depth_to_space`, per shard under a partitioner; `default_lowering` decides, as for
  `Conv3D`.
  """
  features: int
  kernel_size: tuple[int, int, int] = (2, 2, 2)
  use_bias: bool = False
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  lowering: str = "auto"
  partitioner: Partitioner | None = None
  logical: tuple[str | None, ...] = VOLUME_AXES

  @nn.compact
  def __call__(self, x):
    kernel = self.param("kernel", nn.initializers.lecun_normal(),
                        (*self.kernel_size, x.shape[-1], self.features), self.param_dtype)
    x, kernel = x.astype(self.dtype), kernel.astype(self.dtype)
    if resolve_lowering(self.lowering, "conv") == "native" or self.is_initializing():
      y = conv_transpose3d_native(x, kernel, self.kernel_size)
    else:
      def local(x, kernel, depth_axis=None, height_axis=None, reduce_axes=()):
        del depth_axis, height_axis, reduce_axes  # no halo; autodiff sums the kernel grad
        return depth_to_space(x, kernel)
      y = per_shard(local, x, kernel, partitioner=self.partitioner, logical=self.logical)
    if self.use_bias:
      y = y + self.param("bias", nn.initializers.zeros, (self.features,),
                         self.param_dtype).astype(self.dtype)
    return y
