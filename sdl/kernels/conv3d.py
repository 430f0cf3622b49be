"""Direct 3D convolution on CPU (`conv3d.cc`): first layers, and layers with long rows.

The first layers of CosmoFlow (4 channels → 16 or 32) and of a 3D U-Net (1 → 32) ran at
24-40 GFLOP/s on the 2-core EPYC VM through every lowering tried, XLA's native op, the
depth-folded 2D convolution and PyTorch/oneDNN alike, against a GEMM roof of 110-144
(docs/benchmarks.md, issue 5): as a GEMM their reduction is only 27 x C deep. `conv3d.cc`
computes them directly, one register tile of output positions x channels at a time, and
their kernel gradient the same way. The same kernel turned out faster than the folded
lowering on every layer with long rows and a cache-sized kernel (32³-64³), so
`use_direct` sends those here too, with their input gradient (a convolution of the
padded output gradient with the flipped kernel).

`forward(x, kernel)`: a valid (already padded) stride-1 3D convolution, NDHWC / DHWIO;
`kernel_grad(x, dy, kernel_shape)`: its kernel gradient. Neither has a gradient of its
own: `sdl.models.conv.direct` puts them together with the input gradient. `use_direct`
is the one place that decides which layers take them.
"""
import contextlib
import functools
import math
import os
import threading

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from sdl.kernels import build

FORWARD, KERNEL_GRAD = "sdl_conv3d_f32", "sdl_conv3d_kernel_grad_f32"
# Which layers go direct (`use_direct`), from per-layer timings on the 2-core EPYC VM
# (`experiments.direct_conv_bench`, docs/design/direct-kernel.md): with at most `MAX_CHANNELS` input channels always
# (im2col + GEMM is starved there); otherwise where output rows are at least `MIN_WIDTH`
# long and the kernel at most `MAX_KERNEL_BYTES`. The kernel is re-read from cache for
# every row tile, so at 8³ with a 14 MB kernel the folded GEMM lowering wins 2-3 x,
# while at 32³-64³ the direct kernel ran 1.4-2.4 x the folded forward and 2-4 x its
# kernel gradient; at 16³ they were about even.
MAX_CHANNELS = 4
MIN_WIDTH = 32
MAX_KERNEL_BYTES = 4 << 20
LANES = 16  # output channels come in vectors of 16 floats (conv3d.cc)
# Forward outputs of at least this many bytes bypass the caches (streaming stores): far
# larger than the caches, they would only evict the input and kernel on their way to
# memory. With them CosmoFlow's first layer (2 x 128³ x 4 → 32, 537 MB out) ran at 198
# GFLOP/s against 152 without (`experiments.direct_conv_bench [--stream_bytes=-1]`,
# docs/design/direct-kernel.md). 0 streams every output, -1 none.
STREAM_BYTES = 64 << 20

_local = threading.local()  # `disabled()` depth, per thread (tracing is per thread)


_TARGETS = {FORWARD: "SdlConv3dF32", KERNEL_GRAD: "SdlConv3dKernelGradF32"}


def setup() -> None:
  """Compile and register the kernels (once per process); raises `KernelBuildError`."""
  build.register_ffi("conv3d.cc", _TARGETS)


@contextlib.contextmanager
def disabled():
  """Within it (in this thread), functions traced keep every layer on XLA: to compare
  (`experiments.cosmoflow_step_bench --lowerings=folded,folded-xla`), or where a
  transformation needs rules a custom call lacks (K-FAC's adaptive step transposes the
  model's pullback). The choice is made when a function is traced, so a jitted function
  keeps what it was compiled with."""
  _local.depth = getattr(_local, "depth", 0) + 1
  try:
    yield
  finally:
    _local.depth -= 1


@functools.cache
def wide_vectors() -> bool:
  """Whether this CPU has 512-bit vector registers (x86 AVX-512, Arm SVE at 512 bits as
  on A64FX), where `conv3d.cc`'s vectors of 16 floats are one register. On AVX2 each is
  two, and the kernel ran 3-8 x slower than XLA's folded convolution (AMD EPYC without
  AVX-512, 2 cores: lbann CosmoFlow at 128³, batch 2, 7.5 s a step against 1.8 s with the
  kernel off, PyTorch 1.8 s; `experiments.cosmoflow_step_bench --lowerings=folded,folded-xla`),
  so `use_direct` leaves such CPUs on XLA. Where /proc/cpuinfo cannot be read, assumes
  they are wide (the kernels were tuned on such hosts)."""
  try:
    with open("/proc/cpuinfo") as f:
      info = f.read()
  except OSError:
    return True
  flags = set(info.replace(":", " ").split())
  if "avx512f" in flags:
    return True
  if "sve" in flags:
    try:
      with open("/proc/sys/abi/sve_default_vector_length") as f:
        return int(f.read().split()[0]) >= 64  # bytes
    except (OSError, ValueError, IndexError):
      return False
  return False


def mode() -> str:
  """`SDL_DIRECT_CONV`: "off" (never), "on" (wherever `use_direct`'s shape rules allow,
  even on a CPU without 512-bit vectors: to test the kernel there) or "auto" (default)."""
  value = os.environ.get("SDL_DIRECT_CONV", "").strip().lower() or "auto"
  if value not in ("off", "on", "auto"):
    raise ValueError(f"SDL_DIRECT_CONV={value!r}: give off, on or auto")
  return value


def available() -> bool:
  """Whether the kernels could be built here (and are not switched off: `SDL_DIRECT_CONV=off`
  in the environment, or inside `disabled()`)."""
  if mode() == "off" or getattr(_local, "depth", 0):
    return False
  return build.ffi_available("conv3d.cc", _TARGETS, "convolutions stay on XLA")


def use_direct(kernel_shape, strides, out_width: int, dtype,
               backend: str | None = None) -> bool:
  """The one place that decides: does a 3D convolution layer go to `conv3d.cc`?

  fp32 on the CPU backend, stride 1, output channels a multiple of 16, the kernel built,
  a CPU with 512-bit vectors (`wide_vectors`; or `SDL_DIRECT_CONV=on`), and either at
  most `MAX_CHANNELS` input channels or output rows of at least `MIN_WIDTH` positions
  with a kernel (`[kd, kh, kw, C, O]`) of at most `MAX_KERNEL_BYTES`. GPUs and TPUs keep
  XLA's convolution. Under a partitioner each device runs it on its own slab,
  after the halo exchange (`sdl.models.conv.conv3d_folded`).
  """
  *_, channels, features = kernel_shape
  small = channels <= MAX_CHANNELS or (
      out_width >= MIN_WIDTH and 4 * math.prod(kernel_shape) <= MAX_KERNEL_BYTES)
  return ((backend or jax.default_backend()) == "cpu"
          and jnp.dtype(dtype) == jnp.float32 and tuple(strides) == (1, 1, 1)
          and features % LANES == 0 and small and available()
          and (wide_vectors() or mode() == "on"))


def input_grad_direct(channels: int) -> bool:
  """Whether a direct layer's input gradient, itself a convolution with `channels`
  outputs, can go to `conv3d.cc` too (else the caller's lowering computes it)."""
  return channels % LANES == 0


def _out_shape(x_shape, kernel_shape):
  n, *spatial, _ = x_shape
  return (n, *(s - k + 1 for s, k in zip(spatial, kernel_shape[:3])), kernel_shape[4])


def varying_like(y, *operands):
  """Inside `shard_map`, type `y` (a custom call's result, a cotangent) as varying over
  the mesh axes its operands vary over (a custom call's result type names none), so
  autodiff and the collectives after it see the right type; outside, `y` unchanged."""
  def vma(v):  # jax 0.10-0.12 name it `manual_axis_type.varying` (before: `vma`)
    t = jax.typeof(v)
    manual = getattr(t, "manual_axis_type", None)
    return frozenset(manual.varying if manual is not None else getattr(t, "vma", ()))
  axes = frozenset().union(*map(vma, operands)) - vma(y)
  return lax.pcast(y, tuple(sorted(axes)), to="varying") if axes else y


def forward(x, kernel):
  """Valid stride-1 convolution by `conv3d.cc` (no gradient of its own)."""
  setup()
  out = jax.ShapeDtypeStruct(_out_shape(x.shape, kernel.shape), jnp.float32)
  y = jax.ffi.ffi_call(FORWARD, out, vmap_method="sequential")(
      x, kernel, stream_bytes=np.int64(STREAM_BYTES))
  return varying_like(y, x, kernel)


def kernel_grad(x, dy, kernel_shape):
  """`dk[a, b, j, c, o] = Σ x[n, z + a, r + b, w + j, c] dy[n, z, r, w, o]` by `conv3d.cc`."""
  setup()
  out = jax.ShapeDtypeStruct(tuple(kernel_shape), jnp.float32)
  dk = jax.ffi.ffi_call(KERNEL_GRAD, out, vmap_method="sequential")(x, dy)
  return varying_like(dk, x, dy)
