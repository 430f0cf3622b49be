"""fp32 GEMMs on CPU through a BLAS library, called by XLA through its FFI.

XLA:CPU runs its own GEMM kernels (YNNPACK's with sdl's flags, `sdl/xla_flags.py`). On the
2-core EPYC VM they reached 64-88 % of NumPy's OpenBLAS on DeepBench's large training
shapes (`experiments.layer_bench`, docs/benchmarks.md), and on CPU nodes such as Fugaku's
A64FX the vendor's BLAS is where the tuned kernels are. jaxlib already sends Cholesky and
eigh on CPU to a LAPACK library the same way (`sdl/blas_threads.py`).

`matmul(a, b)` computes `a @ b` for 2D fp32 operands, either transposed, by a custom call
to `gemm.cc` (compiled on first use, `sdl.kernels.build`), which hands the operands to
`cblas_sgemm` in place: no copy, the transposes are BLAS flags. Its gradients are two more
such GEMMs. `dot_general` has `jax.lax.dot_general`'s signature, so a Flax layer takes it
as is: `nn.Dense(features, dot_general=sdl.kernels.gemm.dot_general)`; what it cannot send
to BLAS (batch dimensions, other dtypes) goes to XLA unchanged.

`use_blas` is the one place that decides which GEMMs go to BLAS: fp32, on the CPU
backend, with at least `MIN_MACS` multiply-adds. GPUs and TPUs always keep XLA. Measured
on the 29 DeepBench training GEMMs (2-core EPYC VM, jax 0.10.2, `experiments.layer_bench`
with implementations timed in turns, docs/benchmarks.md): forward + backward through BLAS
was faster on 25, by a median 1.16 x; forward alone it won 10 (median 0.90 x), the large
and small shapes, losing the thin ones (n ≤ 64, m and k ≥ 2048) to YNNPACK. In the
BERT-base block, its four projections through BLAS made the block 7 % slower forward +
backward (why was not measured; a custom call does end XLA's fusions around it). So sdl's
models do not use it unless asked (and see sharding, below).

Which BLAS: `$SDL_BLAS` if set, else NumPy's own (the one `numpy.ndarray @` runs, with its
own thread pool):
  SDL_BLAS=off                       never call BLAS (every GEMM stays on XLA)
  SDL_BLAS=/path/libfoo.so           find cblas_sgemm (or a known 64-bit-integer name) there
  SDL_BLAS=/path/libfoo.so:SYMBOL    that function; `:ilp64` after it for 64-bit integers
At set-up a small GEMM through the library is checked against NumPy, so a wrong integer
width fails there with the library named, not later with wrong numbers.

Under a mesh XLA's partitioner cannot split a custom call, so it gathers the operands and
runs the call replicated: the result is right, the traffic is not what sharding promised.
Call `matmul` inside `jax.shard_map` (on local blocks) when the operands are sharded.
"""
import ctypes
import dataclasses
import functools
import os
import threading
import warnings

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from sdl.kernels import build

TARGET = "sdl_gemm_f32"
IMPLS = ("auto", "blas", "xla")
# (symbol, 64-bit integers): the standard CBLAS name, then 64-bit-integer OpenBLAS builds
# (NumPy's and scipy's wheels rename their OpenBLAS with a `scipy_` prefix).
SYMBOLS = (("cblas_sgemm", False), ("scipy_cblas_sgemm64_", True), ("cblas_sgemm64_", True),
           ("scipy_cblas_sgemm", False))
MIN_MACS = 1 << 20  # m * n * k below this stays on XLA (see `use_blas`)


class BlasError(RuntimeError):
  """No usable BLAS for sdl's GEMM kernel: the message names the library and the fix."""


@dataclasses.dataclass(frozen=True)
class Blas:
  path: str
  symbol: str
  ilp64: bool


def _find_symbol(path: str, symbols=SYMBOLS) -> Blas | None:
  lib = ctypes.CDLL(path)
  for symbol, ilp64 in symbols:
    if hasattr(lib, symbol):
      return Blas(path, symbol, ilp64)
  return None


def numpy_blas() -> Blas:
  """The BLAS library NumPy itself runs `@` with (loaded into this process)."""
  import threadpoolctl  # noqa: PLC0415

  from sdl.blas_threads import owned_blas_controllers  # noqa: PLC0415
  np.ones((2, 2), np.float32) @ np.ones((2, 2), np.float32)  # make sure it is loaded
  paths = [c.filepath for c in threadpoolctl.ThreadpoolController().lib_controllers
           if c.user_api == "blas"]
  owned = [c.filepath for c in owned_blas_controllers(np)]
  for path in owned + [p for p in paths if p not in owned and "scipy" not in p]:
    found = _find_symbol(path)
    if found:
      return found
  raise BlasError(f"NumPy's BLAS ({', '.join(paths) or 'none found'}) exports no "
                  f"cblas_sgemm; set SDL_BLAS=/path/libblas.so[:symbol[:ilp64]], or "
                  f"SDL_BLAS=off")


def parse_blas(value: str) -> Blas | None:
  """`$SDL_BLAS` → the library to call (None for `off`)."""
  if value.strip().lower() == "off":
    return None
  path, *rest = value.split(":")
  if not os.path.exists(path):
    raise BlasError(f"SDL_BLAS={value!r}: no file {path!r}")
  if not rest:
    found = _find_symbol(path)
    if not found:
      raise BlasError(f"SDL_BLAS={value!r}: {path} exports none of "
                      f"{', '.join(s for s, _ in SYMBOLS)}; name it: {path}:SYMBOL[:ilp64]")
    return found
  symbol, width = rest[0], (rest[1] if len(rest) > 1 else "")
  if width not in ("", "ilp64", "lp64"):
    raise BlasError(f"SDL_BLAS={value!r}: the integer width is 'ilp64' or 'lp64', "
                    f"not {width!r}")
  if not hasattr(ctypes.CDLL(path), symbol):
    raise BlasError(f"SDL_BLAS={value!r}: {path} has no symbol {symbol!r}")
  return Blas(path, symbol, width == "ilp64" or (not width and symbol.endswith("64_")))


_lock = threading.Lock()
_state: dict = {}


def setup() -> Blas | None:
  """Pick the BLAS, compile and register the kernel, check it (once per process).

  Returns the library in use, None with `SDL_BLAS=off`; raises `BlasError` or
  `sdl.kernels.build.KernelBuildError` when it cannot be used.
  """
  with _lock:
    if "blas" in _state:
      return _state["blas"]
    if "error" in _state:
      raise _state["error"]
    try:
      value = os.environ.get("SDL_BLAS")
      blas = parse_blas(value) if value else numpy_blas()
      if blas is not None:
        kernel = ctypes.CDLL(str(build.library("gemm.cc")))
        address = ctypes.cast(getattr(ctypes.CDLL(blas.path), blas.symbol), ctypes.c_void_p)
        kernel.sdl_gemm_set_blas(address, ctypes.c_int(int(blas.ilp64)))
        jax.ffi.register_ffi_target(TARGET, jax.ffi.pycapsule(kernel.SdlGemmF32),
                                    platform="cpu")
        _state["kernel"] = kernel  # keep the library loaded
        _self_check(blas)
    except Exception as error:
      _state["error"] = error
      raise
    _state["blas"] = blas
  if blas is not None:
    _warn_if_spinning(blas)
  return blas


def _warn_if_spinning(blas: Blas) -> None:
  from sdl import process  # noqa: PLC0415
  quiet = process.applied()["openblas_idle"] or os.environ.get("OPENBLAS_THREAD_TIMEOUT")
  if "openblas" in os.path.basename(blas.path).lower() and not quiet:
    warnings.warn(
        "OpenBLAS loaded without OPENBLAS_THREAD_TIMEOUT: its idle threads spin for about "
        "0.1 s after each GEMM and slow the XLA ops that follow (sdl/blas_threads.py). Call "
        "sdl.process.configure() before importing numpy and jax (the experiments package "
        "does), or export OPENBLAS_THREAD_TIMEOUT=4.", stacklevel=3)


def _self_check(blas: Blas) -> None:
  """A small GEMM through the kernel against NumPy: a wrong integer width shows here."""
  rng = np.random.default_rng(0)
  a, b = rng.standard_normal((7, 5), np.float32), rng.standard_normal((5, 3), np.float32)
  # set-up may run while a caller's function is being traced: compute this one now
  with jax.ensure_compile_time_eval(), jax.default_device(jax.devices("cpu")[0]):
    out = np.asarray(jax.jit(functools.partial(_call, trans_a=False, trans_b=False))(a, b))
  if not np.allclose(out, a @ b, rtol=1e-5, atol=1e-5):
    raise BlasError(
        f"{blas.symbol} in {blas.path} gave wrong results with "
        f"{'64' if blas.ilp64 else '32'}-bit integers; set SDL_BLAS={blas.path}:"
        f"{blas.symbol}:{'lp64' if blas.ilp64 else 'ilp64'}, or SDL_BLAS=off")


def available() -> bool:
  """Whether GEMMs can go to BLAS here (set-up succeeded and SDL_BLAS is not off)."""
  try:
    return setup() is not None
  except (BlasError, build.KernelBuildError):
    return False


def use_blas(m: int, n: int, k: int, dtype, backend: str | None = None) -> bool:
  """The one place that decides: does an `m x k @ k x n` GEMM go to BLAS?

  Only fp32 on the CPU backend, and only with at least `MIN_MACS` multiply-adds, where
  the call's fixed cost is lost in the arithmetic.
  """
  if (backend or jax.default_backend()) != "cpu" or jnp.dtype(dtype) != jnp.float32:
    return False
  if m * n * k < MIN_MACS:
    return False
  if available():
    return True
  if not _state.get("warned"):
    _state["warned"] = True
    warnings.warn(f"sdl.kernels.gemm: GEMMs stay on XLA ({_state.get('error')})",
                  stacklevel=3)
  return False


def _shape(a, b, trans_a, trans_b):
  m, k = (a.shape[1], a.shape[0]) if trans_a else a.shape
  k_b, n = (b.shape[1], b.shape[0]) if trans_b else b.shape
  if k != k_b:
    raise ValueError(f"matmul: contracting sizes differ: a {a.shape} (trans_a={trans_a}) "
                     f"and b {b.shape} (trans_b={trans_b})")
  return m, n, k


def _call(a, b, trans_a, trans_b):
  m, n, _ = _shape(a, b, trans_a, trans_b)
  return jax.ffi.ffi_call(TARGET, jax.ShapeDtypeStruct((m, n), jnp.float32),
                          vmap_method="sequential")(
      a, b, trans_a=bool(trans_a), trans_b=bool(trans_b))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _blas_matmul(a, b, trans_a, trans_b):
  return _call(a, b, trans_a, trans_b)


def _blas_matmul_fwd(a, b, trans_a, trans_b):
  return _call(a, b, trans_a, trans_b), (a, b)


def _blas_matmul_bwd(trans_a, trans_b, residuals, dc):
  # C = op(A) op(B): d op(A) = dC op(B)ᵀ and d op(B) = op(A)ᵀ dC, each one more GEMM
  # with the transposes as flags.
  a, b = residuals
  da = _call(b, dc, trans_b, True) if trans_a else _call(dc, b, False, not trans_b)
  db = _call(dc, a, True, trans_a) if trans_b else _call(a, dc, not trans_a, False)
  return da, db


_blas_matmul.defvjp(_blas_matmul_fwd, _blas_matmul_bwd)


def matmul(a, b, *, trans_a: bool = False, trans_b: bool = False, impl: str = "auto"):
  """`op(a) @ op(b)` for 2D operands, op a transpose where asked.

  impl: "auto" (BLAS where `use_blas` says so, else XLA), "blas" (always BLAS; fp32 on
  CPU only, raises if it cannot be set up) or "xla" (`jnp.matmul`).
  """
  if impl not in IMPLS:
    raise ValueError(f"matmul impl {impl!r}: choose one of {IMPLS}")
  if a.ndim != 2 or b.ndim != 2:
    raise ValueError(f"matmul takes 2D operands, got {a.shape} and {b.shape}")
  m, n, k = _shape(a, b, trans_a, trans_b)
  if impl == "blas":
    if jnp.dtype(a.dtype) != jnp.float32 or jnp.dtype(b.dtype) != jnp.float32:
      raise ValueError(f"matmul impl='blas' is fp32 only, got {a.dtype} and {b.dtype}")
    if setup() is None:
      raise BlasError("matmul impl='blas' with SDL_BLAS=off")
  elif impl == "xla" or not (a.dtype == b.dtype and use_blas(m, n, k, a.dtype)):
    return jnp.matmul(a.T if trans_a else a, b.T if trans_b else b,
                      precision=lax.Precision.HIGHEST)
  return _blas_matmul(a, b, trans_a, trans_b)


def dot_general(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None,
                **kwargs):
  """`jax.lax.dot_general`, with the GEMMs `use_blas` picks sent to BLAS.

  Taken: no batch dimensions, one contracting dimension, `rhs` 2D, and `lhs`'s
  contracting dimension its last (any leading dimensions are flattened into rows) or, for
  a 2D `lhs`, its first. Everything else, and every GEMM `use_blas` declines, is
  `lax.dot_general` with the same arguments.
  """
  (lhs_c, rhs_c), (lhs_b, rhs_b) = dimension_numbers
  fallback = functools.partial(lax.dot_general, lhs, rhs, dimension_numbers, precision,
                               preferred_element_type, **kwargs)
  f32 = jnp.dtype(jnp.float32)
  if (lhs_b or rhs_b or len(lhs_c) != 1 or rhs.ndim != 2 or lhs.ndim < 2
      or jnp.dtype(lhs.dtype) != f32 or jnp.dtype(rhs.dtype) != f32
      or preferred_element_type not in (None, f32) or kwargs.get("out_sharding")):
    return fallback()
  (lc,), (rc,) = lhs_c, rhs_c
  lc, rc = lc % lhs.ndim, rc % 2
  if lc == lhs.ndim - 1:
    trans_a, a = False, lhs.reshape(-1, lhs.shape[-1])
  elif lhs.ndim == 2 and lc == 0:
    trans_a, a = True, lhs
  else:
    return fallback()
  trans_b = rc == 1
  m, n, k = _shape(a, rhs, trans_a, trans_b)
  if not use_blas(m, n, k, f32):
    return fallback()
  out = _blas_matmul(a, rhs, trans_a, trans_b)
  return out.reshape(*lhs.shape[:-1], n) if not trans_a else out
