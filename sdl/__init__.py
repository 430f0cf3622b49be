"""sdl: scalable deep learning in JAX.

Subpackages: `sdl.parallel` (meshes, shardings, spatial partitioning), `sdl.models` (pure
Flax modules), `sdl.data` (synthetic universes, datasets), `sdl.optim` (optax transforms),
`sdl.train` (the jitted step, checkpoints, metrics), `sdl.bench` (timing, memory).
"""
from sdl import blas_threads as _blas_threads
from sdl import host_memory as _host_memory
from sdl import xla_flags as _xla_flags

__version__ = "0.1.0"

# first, before other libraries start threads: large host buffers are reused, not unmapped
# and faulted in again each step (sdl/host_memory.py)
KEEPS_FREED_MEMORY = _host_memory.keep_freed_memory()
# before NumPy loads OpenBLAS: its idle threads sleep instead of spinning (sdl/blas_threads.py)
BLAS_THREADS_QUIET = _blas_threads.quiet_idle_threads()
_xla_flags.apply_defaults()  # before JAX starts a backend (see sdl/xla_flags.py)
_blas_threads.limit()  # XLA:CPU's LAPACK calls: one thread each (sdl/blas_threads.py)
