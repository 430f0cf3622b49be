"""The one place that sets how the BLAS libraries in an sdl process use threads.

Two settings, both applied by `sdl.process.configure()`:

1. **OpenBLAS's idle threads sleep at once** (`quiet_idle_threads`). After a call,
   OpenBLAS's worker threads spin for 2^28 cycles (about 0.1 s) before sleeping. Next to
   XLA:CPU, whose own threads run the ops that follow, they steal the cores: on the 2-core
   EPYC VM, XLA's GEMMs timed in turns with NumPy's ran at 62-77 GFLOP/s against 104-113
   alone (2048x64x2048, 4096x16x4096, 1760x128x1760; jax 0.10.2), and at 99-161 with
   `OPENBLAS_THREAD_TIMEOUT=4` (2^4 cycles). OpenBLAS reads that variable once, when it
   loads, so `configure()` sets it only if NumPy (and with it OpenBLAS) is not loaded yet,
   and `quiet_idle_threads` says whether it was in time: configure first (the
   `experiments` package does), or export the variable yourself, which wins.

2. **One thread for the LAPACK under XLA:CPU** (`limit`).

On CPU, jaxlib runs Cholesky, triangular solves and eigh as calls into scipy's LAPACK
(`scipy.linalg.cython_lapack`, an OpenBLAS with its own thread pool). XLA runs independent
operations of a step at the same time on its own threads, so in a K-FAC inversion step
(16 Cholesky factorisations and 32 triangular solves next to the statistics GEMMs)
OpenBLAS's threads and XLA's compete for the same cores. On the 2-core EPYC VM (jax 0.10.2,
`experiments.kfac_profile`, docs/benchmarks.md) the digits_autoencoder's inversion step took
50-66 ms with OpenBLAS's default 2 threads and 25-28 ms with one, CosmoFlow's 1,031-1,047
and 957 ms. A single large factor inverted alone is slower on one thread (Cholesky of
2,048: 0.30-0.37 s against 0.19 s), but inside a step, where XLA runs several at once, one
thread won on both problems.

`sdl.process.configure()` calls `limit()`. It changes only the BLAS libraries that scipy loads itself
(`scipy.libs`, `scipy/.dylibs`): NumPy's BLAS, which `experiments.layer_bench` compares
against, keeps its threads, and a scipy sharing a system BLAS with NumPy is left alone.
`SDL_LAPACK_THREADS=N` sets another count; an `OPENBLAS_NUM_THREADS` or `OMP_NUM_THREADS`
of your own opts out. GPU and TPU backends do not call this LAPACK.
"""
import os
import sys

IDLE_TIMEOUT = ("OPENBLAS_THREAD_TIMEOUT", "4")  # OpenBLAS's minimum: spin 2^4 cycles
OPT_OUT = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS")  # a thread count of the user's own


def owned_blas_controllers(package) -> list:
  """threadpoolctl controllers of the loaded BLAS libraries that `package` (a module)
  ships itself: inside it, or in the `<package>.libs` folder its wheel puts them in."""
  import threadpoolctl  # noqa: PLC0415
  root = os.path.realpath(os.path.dirname(package.__file__))
  homes = (root + os.sep, root + ".libs" + os.sep)
  return [c for c in threadpoolctl.ThreadpoolController().lib_controllers
          if c.user_api == "blas" and os.path.realpath(c.filepath).startswith(homes)]


def scipy_blas_controllers():
  """threadpoolctl controllers of the BLAS libraries shipped inside scipy (loaded now)."""
  import scipy  # noqa: PLC0415
  import scipy.linalg.cython_lapack  # noqa: F401, PLC0415  (loads the library jaxlib calls)
  return owned_blas_controllers(scipy)


def limit(environ=os.environ) -> list[str]:
  """Set scipy's own BLAS to `SDL_LAPACK_THREADS` (default 1) threads; returns the files
  changed (none where the user set a thread count, or scipy shares NumPy's BLAS)."""
  if any(environ.get(name) for name in OPT_OUT):
    return []
  threads = int(environ.get("SDL_LAPACK_THREADS") or 1)
  changed = []
  for controller in scipy_blas_controllers():
    controller.set_num_threads(threads)
    changed.append(controller.filepath)
  return changed


def quiet_idle_threads(environ=os.environ, modules=sys.modules) -> bool:
  """Set `OPENBLAS_THREAD_TIMEOUT=4` unless the user set it; True if it is in effect for
  the OpenBLAS libraries of this process (set before NumPy loaded, or by the user)."""
  name, value = IDLE_TIMEOUT
  if environ.get(name):
    return True
  if "numpy" in modules:
    return False
  environ[name] = value
  return True
