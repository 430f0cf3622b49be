"""crc32c as a chunk file is read: one pass over the bytes, not a read and then a check.

`read_verified(fd, size, dest, offset)` reads file bytes `[0, size)` (and the 4-byte
checksum after them) through a small
per-thread buffer that stays in the L2 cache, computes their crc32c with the CPU's crc
instruction (SSE4.2 or ARMv8) and copies `dest.nbytes` of them from `offset` into `dest`
in the same loop (`copycrc.cc`). Reading into `dest` and then checksumming it reads the
whole array back from memory: on the 2-core VM that second pass cost a fifth of the
reader's throughput, this costs a few per cent (`experiments.io_bench`, docs/benchmarks.md).

The library is compiled on first use (`sdl.kernels.build`). `available()` says whether it
could be; `sdl.data.store` falls back to the `crc32c` package's two-pass check where not.
`crc32c(data, crc=0)` is the same function on bytes in memory, for tests and callers that
hold them.
"""
import ctypes
import functools
import mmap
import os
import threading

import numpy as np

from sdl.kernels import build

_local = threading.local()
# Bytes per read: small enough to stay in L2 until checksummed, big enough that system
# calls don't show. On the 2-core VM 128 KiB cost 1-4 %, 192 KiB 0-6 %, 512 KiB 4-10 %,
# 1 MiB 11-16 % against the unchecked read; `$SDL_CRC_PIECE` overrides it.
PIECE = int(os.environ.get("SDL_CRC_PIECE", 128 << 10))


_library_lock = threading.Lock()


def _library() -> ctypes.CDLL | None:
  """The loaded kernel, or None where it cannot be built (loaded once: reader threads call
  this together on a dataset's first reads)."""
  with _library_lock:
    return _load()


@functools.cache
def _load() -> ctypes.CDLL | None:
  try:
    lib = ctypes.CDLL(str(build.library("copycrc.cc", host=True)))
  except (build.KernelBuildError, OSError):
    return None
  lib.sdl_read_crc32c.restype = ctypes.c_int
  lib.sdl_read_crc32c.argtypes = [ctypes.c_int, ctypes.c_size_t, ctypes.c_size_t,
                                  ctypes.c_size_t, ctypes.c_void_p, ctypes.c_void_p,
                                  ctypes.c_size_t, ctypes.POINTER(ctypes.c_uint32),
                                  ctypes.POINTER(ctypes.c_uint32)]
  lib.sdl_copy_crc32c.restype = ctypes.c_uint32
  lib.sdl_copy_crc32c.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t,
                                  ctypes.c_uint32, ctypes.c_int]
  lib.sdl_crc32c_kind.restype = ctypes.c_char_p
  return lib


PATHS = {"fastest": 0, "lanes": 1, "serial": 2}  # copycrc.cc's loops


def available() -> bool:
  """Whether the one-pass kernel is built (a C++ compiler was found)."""
  return _library() is not None


def kind() -> str:
  """How this build computes the crc (which instructions `-march=native` gave it)."""
  return _library().sdl_crc32c_kind().decode()


def _contiguous(data) -> np.ndarray:
  array = np.frombuffer(data, np.uint8) if not isinstance(data, np.ndarray) else data
  if not array.flags.c_contiguous:
    raise ValueError("crc32c needs contiguous bytes")
  return array


def crc32c(data, crc: int = 0, path: str = "fastest") -> int:
  """The crc32c of `data` (bytes-like, or a C-contiguous array), continuing from `crc`.
  `path` forces one of the kernel's loops (`PATHS`), for tests."""
  array = _contiguous(data)
  return _library().sdl_copy_crc32c(array.ctypes.data, None, array.nbytes, crc, PATHS[path])


def copy_crc32c(src, dst: np.ndarray, crc: int = 0, path: str = "fastest") -> int:
  """Copy `src` into `dst` (as many bytes, C-contiguous) and return their crc32c."""
  array, dst = _contiguous(src), _contiguous(dst)
  if dst.nbytes != array.nbytes:
    raise ValueError(f"copy of {array.nbytes} bytes into {dst.nbytes}")
  return _library().sdl_copy_crc32c(array.ctypes.data, dst.ctypes.data, array.nbytes, crc,
                                    PATHS[path])


def _bounce() -> np.ndarray:
  """This thread's read buffer (page-aligned, so the kernel's copies are aligned too)."""
  if not hasattr(_local, "bounce"):
    _local.bounce = np.frombuffer(mmap.mmap(-1, PIECE), np.uint8)
  return _local.bounce


def read_verified(fd: int, size: int, dest: np.ndarray, offset: int = 0
                  ) -> tuple[int, int] | None:
  """Read bytes `[0, size + 4)` of the open file `fd`; copy `dest.nbytes` of them, from
  `offset`, into `dest` (C-contiguous). Returns the crc32c of the first `size` bytes and
  the 4 after them as a little-endian integer (the zarr `crc32c` codec's trailer), or None
  where the file ended first. An OS error is raised as `OSError`."""
  lib = _library()
  if offset < 0 or offset + dest.nbytes > size or not dest.flags.c_contiguous:
    raise ValueError(f"bytes [{offset}, {offset + dest.nbytes}) of {size}: out of range")
  crc, trailer = ctypes.c_uint32(), ctypes.c_uint32()
  status = lib.sdl_read_crc32c(fd, size, offset, offset + dest.nbytes, dest.ctypes.data,
                               _bounce().ctypes.data, PIECE, ctypes.byref(crc),
                               ctypes.byref(trailer))
  if status == -1:
    return None
  if status < 0:
    raise OSError(-status, os.strerror(-status))
  return crc.value, trailer.value
