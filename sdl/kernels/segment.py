"""Message passing over arcs sorted by segment, on CPU (`segment.cc`).

`gather_segment_sum(h, gather, segments, num_segments)` is
`jax.ops.segment_sum(h[gather], segments, num_segments)` where `segments` is sorted (a
graph's arcs sorted by sender: `sdl.data.graphs.from_edges` and jraph's batching and
padding keep them so). XLA's CPU lowering gathers every arc's row and scatters it back,
which made message passing nearly all of a betweenness model's scoring time; the kernel
sums each output row's run of arcs in place (docs/benchmarks.md, "Betweenness ranking").
Its gradient (a scatter to `gather`, unsorted) stays on XLA.

`use_kernel()` is the one place that decides: the CPU backend with the kernel built, and
not switched off (`SDL_SEGMENT_KERNEL=off`); elsewhere the same function is XLA's.
"""
import functools
import os

import jax
import jax.numpy as jnp
import numpy as np

from sdl.kernels import build

TARGET = "sdl_sorted_segment_sum"


def setup() -> None:
  """Compile and register the kernel (once per process); raises `KernelBuildError`."""
  build.register_ffi("segment.cc", {TARGET: "SdlSortedSegmentSum"})


def available() -> bool:
  """Whether the kernel is built here and not switched off."""
  if os.environ.get("SDL_SEGMENT_KERNEL", "").strip().lower() == "off":
    return False
  return build.ffi_available("segment.cc", {TARGET: "SdlSortedSegmentSum"},
                             "message passing stays on XLA")


def use_kernel(dtype=jnp.float32, backend: str | None = None) -> bool:
  """fp32 on the CPU backend with the kernel built: GPUs and TPUs keep XLA's scatter."""
  return ((backend or jax.default_backend()) == "cpu" and jnp.dtype(dtype) == jnp.float32
          and available())


def _threads() -> int:
  return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (
      os.cpu_count() or 1)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _kernel(h, gather, segments, num_segments):
  setup()
  out = jax.ShapeDtypeStruct((num_segments, h.shape[1]), jnp.float32)
  return jax.ffi.ffi_call(TARGET, out, vmap_method="sequential")(
      h, gather.astype(jnp.int32), segments.astype(jnp.int32), threads=np.int64(_threads()))


def _kernel_fwd(h, gather, segments, num_segments):
  return _kernel(h, gather, segments, num_segments), (h.shape[0], gather, segments)


def _kernel_bwd(num_segments, residuals, g):
  rows, gather, segments = residuals
  return jax.ops.segment_sum(g[segments], gather, num_segments=rows), None, None


_kernel.defvjp(_kernel_fwd, _kernel_bwd)


def gather_segment_sum(h: jax.Array, gather: jax.Array, segments: jax.Array,
                       num_segments: int) -> jax.Array:
  """`segment_sum(h[gather], segments, num_segments)` for sorted `segments` ([E] ints,
  each in range; the kernel checks and fails otherwise). h: [N, W]."""
  if use_kernel(h.dtype) and h.ndim == 2:
    return _kernel(h, gather, segments, num_segments)
  return jax.ops.segment_sum(h[gather], segments, num_segments=num_segments,
                             indices_are_sorted=True)
