"""The one explicit call that tunes a CPU process for sdl: `configure()`.

`import sdl` changes nothing in the process. An entry point (the `experiments` package,
first thing, before NumPy loads and before any thread starts) and the test conftest call
`configure()`; a notebook or a script of your own may call it too, as its first line.
It applies four settings, each explained, with the measurement behind it, in the module
that owns it and in `docs/design/`:

  allocator       glibc keeps freed host memory for reuse instead of unmapping it, so
                  large XLA:CPU buffers are not faulted in afresh every step
                  (`sdl.host_memory`). Cost: the process keeps its peak host memory.
  openblas_idle   OpenBLAS's idle threads sleep at once instead of spinning next to XLA's
                  (`OPENBLAS_THREAD_TIMEOUT=4`; only in effect if set before NumPy loads,
                  `sdl.blas_threads`).
  xla_flags       XLA:CPU's kernel library choice (`sdl.xla_flags`); only before the JAX
                  backend starts.
  lapack_threads  one thread per LAPACK call under XLA:CPU (`sdl.blas_threads.limit`).

Every setting yields to the user's own environment variable (each module says which).
`configure()` returns what it applied, and `applied()` returns the same later; the
trainers write it into the run's `config.json`.

Off switch: `configure(enabled=False)` applies nothing. The entry points read it from the
command line (`--config.process.configure=False`) or from `SDL_PROCESS_SETTINGS=0` before
anything else loads, because the allocator and OpenBLAS settings cannot be made later.
"""
import os
import sys

SETTINGS = ("allocator", "openblas_idle", "xla_flags", "lapack_threads")
ARGV_FLAG = "--config.process.configure"
OFF = ("0", "false", "off", "no")

_applied: dict | None = None


def enabled_by(argv=sys.argv, environ=os.environ) -> bool:
  """Whether the command line (`--config.process.configure=False`) or the environment
  (`SDL_PROCESS_SETTINGS=0`) turned the settings off; the command line wins."""
  for arg in reversed(list(argv)):
    if arg.startswith(ARGV_FLAG + "="):
      return arg.split("=", 1)[1].strip().lower() not in OFF
  return environ.get("SDL_PROCESS_SETTINGS", "1").strip().lower() not in OFF


def configure(enabled: bool = True, environ=os.environ) -> dict:
  """Apply sdl's CPU-process settings (module docstring); returns what was applied:
  `{"enabled": bool, "allocator": bool, "openblas_idle": bool, "xla_flags": str,
  "lapack_threads": [library paths]}`. Calling it again applies nothing new."""
  global _applied
  if _applied is not None:
    return _applied
  if not enabled:
    _applied = {"enabled": False, **dict.fromkeys(SETTINGS)}
    return _applied
  from sdl import blas_threads, host_memory, xla_flags  # noqa: PLC0415
  record = {"enabled": True}
  # first: glibc fixes its arena limit when a second thread first allocates
  record["allocator"] = host_memory.keep_freed_memory(environ)
  # before NumPy loads OpenBLAS, which reads the variable once
  record["openblas_idle"] = blas_threads.quiet_idle_threads(environ)
  xla_flags.apply_defaults(environ)  # before JAX starts a backend
  record["xla_flags"] = environ.get("XLA_FLAGS", "")
  record["lapack_threads"] = blas_threads.limit(environ)
  _applied = record
  return record


def applied() -> dict:
  """What `configure` applied in this process (`{"enabled": False, ...}` if never called)."""
  return _applied if _applied is not None else {"enabled": False, **dict.fromkeys(SETTINGS)}
