"""Shortest-path kernels in C++: dependencies from sampled sources (Brandes'
accumulation) and the nodes no shortest path passes through.

`source_dependencies(indptr, indices, sources)` returns, for every node v, the sum over
the given sources s of delta_s(v): the share of the shortest paths leaving s that pass
through v (`brandes.cc`). Over all sources that is exact betweenness (an undirected
graph's pairs counted twice); over k sampled sources, times n / k, an unbiased estimate
(Brandes & Pich's pivots). `sdl.data.graphs.sampled_betweenness` is the caller, with a
NumPy fallback where no C++ compiler is found (`available()`); so is
`sdl.data.graphs.never_between` of `never_between` here.
"""
import ctypes
import functools
import os

import numpy as np

from sdl.kernels import build


@functools.cache
def _library() -> ctypes.CDLL | None:
  try:
    lib = ctypes.CDLL(str(build.library("brandes.cc", host=True)))
  except (build.KernelBuildError, OSError):
    return None
  lib.sdl_source_dependencies.restype = None
  lib.sdl_source_dependencies.argtypes = [
      ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
      ctypes.c_int32, ctypes.c_void_p]
  lib.sdl_never_between.restype = None
  lib.sdl_never_between.argtypes = [ctypes.c_int64, *[ctypes.c_void_p] * 4, ctypes.c_int64,
                                    ctypes.c_void_p]
  return lib


def available() -> bool:
  """Whether the kernel is built (a C++ compiler was found)."""
  return _library() is not None


def source_dependencies(indptr: np.ndarray, indices: np.ndarray, sources: np.ndarray,
                        threads: int | None = None) -> np.ndarray:
  """float64 [nodes]: sum over `sources` of each node's dependency delta_s(v), on the CSR
  graph whose arcs out of v are `indices[indptr[v]:indptr[v + 1]]`. Runs on `threads`
  threads (default: the CPUs this process may use), deterministically."""
  indptr = np.ascontiguousarray(indptr, np.int64)
  indices = np.ascontiguousarray(indices, np.int32)
  sources = np.ascontiguousarray(sources, np.int32)
  n = len(indptr) - 1
  if len(sources) and (sources.min() < 0 or sources.max() >= n):
    raise ValueError(f"sources must be nodes in [0, {n})")
  if threads is None:
    threads = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (
        os.cpu_count() or 1)
  out = np.zeros(n, np.float64)
  _library().sdl_source_dependencies(n, indptr.ctypes.data, indices.ctypes.data,
                                     sources.ctypes.data, len(sources), int(threads),
                                     out.ctypes.data)
  return out


def never_between(out_csr: tuple, in_csr: tuple, max_degree: int) -> np.ndarray:
  """bool [nodes]: `sdl.data.graphs.never_between`'s rule, from the out-arcs' CSR (each
  list sorted) and the in-arcs' CSR."""
  out_ptr, out_idx = (np.ascontiguousarray(out_csr[0], np.int64),
                      np.ascontiguousarray(out_csr[1], np.int32))
  in_ptr, in_idx = (np.ascontiguousarray(in_csr[0], np.int64),
                    np.ascontiguousarray(in_csr[1], np.int32))
  n = len(out_ptr) - 1
  never = np.zeros(n, np.uint8)
  _library().sdl_never_between(n, out_ptr.ctypes.data, out_idx.ctypes.data,
                               in_ptr.ctypes.data, in_idx.ctypes.data, int(max_degree),
                               never.ctypes.data)
  return never.astype(bool)
