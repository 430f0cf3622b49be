"""The one place that sets how an sdl process's C allocator hands memory back to the OS.

**The problem.** XLA:CPU allocates each call's output and temporary buffers with the C
library's `malloc`, and frees them when the call is done. glibc serves any allocation above
32 MB (its largest mmap threshold) with a fresh `mmap` and returns it with `munmap` on
free. So every call of a jitted step gets brand-new pages for its large buffers, and the
kernel zeroes each 4 KiB page on first touch: a page fault per page, every step. On the
2-core EPYC VM (jax 0.10.2) the direct first-layer convolution of CosmoFlow
(2 x 128³ x 4 → 32, a 537 MB output) took 358 and 325 ms per call (two runs) with
131,073 page faults, and 160 and 148 ms with none (`experiments.lowering_checks
--check=host_memory`, docs/benchmarks.md). The same holds for every buffer of a training step above 32 MB
(`experiments.lowering_checks --check=step_faults`).
PyTorch's CPU tensors come from the same `malloc`, and pay the same.

**The setting.** `keep_freed_memory()` (called by `sdl.process.configure()`) tells glibc, through
`mallopt`, to serve large allocations from its heap instead of `mmap` (`M_MMAP_MAX = 0`),
never to give freed heap memory back to the OS (`M_TRIM_THRESHOLD = -1`), and to
give threads that have no arena yet the main one (`M_ARENA_MAX = 1`): the other arenas'
heaps are at most 64 MB, and glibc serves anything larger there with `mmap` whatever the
settings. (Small allocations stay fast: glibc's per-thread caches take them.) A step's
buffers are then reused from the heap within a few steps (until then the heap grows, as a
step's buffers are freed after the next step has allocated its own), already mapped.
glibc fixes its arena limit when a second thread first allocates, so configure before
other libraries start threads (the `experiments` package does); otherwise threads that
already have an arena of their own keep mapping their large buffers. The cost: the process
keeps its peak host memory until it exits, and the heap fragments. In 16 128³ CosmoFlow
steps (batch 2, `--check=step_faults`) peak memory went from 2.0 to 4.8 GB (mlperf) and
1.8 to 3.5 GB (lbann); steps without faults ran 2.34-2.44 s against 2.71-2.84 (mlperf)
and 0.79-0.82 s against 1.03-1.08 (lbann), but the steps in which the heap still grew
(2 of 16 in each) took 4.3-4.5 s and 1.5-2.2 s. Where host memory is short (a 512³
volume on a CPU node), opt out.

Only glibc has `mallopt`; elsewhere (macOS, musl) nothing changes. Opt out with
`SDL_KEEP_FREED_MEMORY=0`, or by setting glibc's own `MALLOC_MMAP_MAX_` or
`MALLOC_TRIM_THRESHOLD_` (yours win). GPU and TPU device memory has allocators of its own;
this only changes host memory.
"""
import ctypes
import ctypes.util
import os
import sys

# glibc's <malloc.h>
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
M_ARENA_MAX = -8
OPT_OUT = ("MALLOC_MMAP_MAX_", "MALLOC_TRIM_THRESHOLD_")  # glibc's own variables: yours win
TRIM_NEVER = -1  # glibc: "-1 disables trimming completely" (man mallopt)


def _glibc():
  """The process's glibc (ctypes), or None when the C library is another one."""
  if not sys.platform.startswith("linux"):
    return None
  try:
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    libc.gnu_get_libc_version  # noqa: B018 (only glibc has it)
    libc.mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    return libc
  except (OSError, AttributeError):
    return None


def keep_freed_memory(environ=os.environ) -> bool:
  """Make glibc reuse freed memory instead of unmapping it (module docstring); returns
  whether the setting is in effect now (False: opted out, or not glibc)."""
  if environ.get("SDL_KEEP_FREED_MEMORY", "1").strip().lower() in ("0", "false", "off", "no"):
    return False
  if any(environ.get(name) for name in OPT_OUT):
    return False
  libc = _glibc()
  if libc is None:
    return False
  # mallopt returns 1 on success
  return all([libc.mallopt(M_MMAP_MAX, 0), libc.mallopt(M_TRIM_THRESHOLD, TRIM_NEVER),
              libc.mallopt(M_ARENA_MAX, 1)])


def available_bytes() -> int:
  """Memory the system can still give (Linux: MemAvailable), else the physical memory."""
  try:
    with open("/proc/meminfo") as f:
      for line in f:
        if line.startswith("MemAvailable:"):
          return int(line.split()[1]) * 1024
  except OSError:
    pass
  return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
