"""Compile a C++ source of `sdl/kernels/` into a shared library, once per machine.

The library lands in `$SDL_KERNEL_CACHE` (default `~/.cache/sdl/kernels`), named by a
hash of the source, jaxlib's version, the compiler and its flags (and, for sources built
for the host CPU, that CPU's model and features), so a new jaxlib, an edited source or
another node type sharing the home folder builds afresh and every other process reuses
the file. It is written under
a temporary name and renamed into place, so processes building at the same time never
load half a file. The compiler is `$CXX`, else `c++`, `g++` or `clang++` on the PATH.
"""
import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import threading
import warnings
from importlib import metadata
from pathlib import Path

import jax.ffi

HERE = Path(__file__).parent
FLAGS = ("-O2", "-std=c++17", "-shared", "-fPIC", "-pthread", "-w")
# For kernels that do their own arithmetic (not a library call): vectorise for this CPU
# and contract a * b + c into fused multiply-adds. A compiler that refuses `-march=native`
# (some Apple clang versions) builds without it.
HOST_FLAGS = ("-O3", "-march=native", "-ffp-contract=fast")


class KernelBuildError(RuntimeError):
  """A native kernel could not be compiled (no compiler, or the compiler failed)."""


def compiler() -> str:
  for candidate in (os.environ.get("CXX"), "c++", "g++", "clang++"):
    if candidate and shutil.which(candidate):
      return shutil.which(candidate)
  raise KernelBuildError(
      "no C++ compiler for sdl's native kernels: install one (Debian: `apt-get install "
      "g++`) or point $CXX at it")


def cache_dir() -> Path:
  root = os.environ.get("SDL_KERNEL_CACHE") or Path.home() / ".cache" / "sdl" / "kernels"
  return Path(root)


def host_cpu() -> str:
  """What identifies this CPU's instruction set: its model name and feature flags."""
  try:
    text = Path("/proc/cpuinfo").read_text()
  except OSError:
    return f"{platform.machine()} {platform.processor()}"
  first = {}
  for line in text.splitlines():
    key, _, value = line.partition(":")
    first.setdefault(key.strip(), value.strip())
  return " ".join(first.get(k, "") for k in ("model name", "flags", "Features", "CPU part"))


def library(source: str, host: bool = False) -> Path:
  """The compiled shared library of `sdl/kernels/<source>`, building it if needed.

  host: compile for this machine's CPU (`HOST_FLAGS`), keyed by `host_cpu()`.
  """
  path = HERE / source
  cxx = compiler()
  include = jax.ffi.include_dir()
  flags = (*FLAGS, *HOST_FLAGS) if host else FLAGS
  key = hashlib.sha256(b"\0".join([
      path.read_bytes(), metadata.version("jaxlib").encode(), cxx.encode(),
      " ".join(flags).encode(), (host_cpu() if host else "").encode()])).hexdigest()[:16]
  out = cache_dir() / f"lib{path.stem}-{key}.so"
  if out.exists():
    return out
  # One build at a time in a process: the first users of a kernel are often reader threads
  # starting together, and each would compile it again.
  with _build_lock:
    return out if out.exists() else _compile(path, out, cxx, include, flags, host)


_build_lock = threading.Lock()


def _compile(path: Path, out: Path, cxx: str, include: str, flags, host: bool) -> Path:
  try:
    out.parent.mkdir(parents=True, exist_ok=True)
  except OSError as error:
    raise KernelBuildError(f"cannot create the kernel cache {out.parent} ({error}); point "
                           f"$SDL_KERNEL_CACHE at a writable folder") from error
  # unique per process and thread, so that concurrent builders never share a file
  tmp = out.with_name(f"{out.name}.{os.getpid()}.{threading.get_ident()}.tmp")
  command = [cxx, *flags, "-I", include, str(path), "-o", str(tmp)]
  result = subprocess.run(command, capture_output=True, text=True, check=False)
  if result.returncode != 0 and host:
    command = [c for c in command if c != "-march=native"]
    result = subprocess.run(command, capture_output=True, text=True, check=False)
  if result.returncode != 0:
    tmp.unlink(missing_ok=True)
    raise KernelBuildError(f"compiling {path} failed ({' '.join(command)}):\n"
                           f"{result.stderr[-2000:]}")
  os.replace(tmp, out)
  return out


_registered: dict = {}  # source -> the loaded library, or the error that stopped it
_register_lock = threading.Lock()


def register_ffi(source: str, targets: dict[str, str]) -> ctypes.CDLL:
  """Build `source` for the host CPU and register its XLA FFI handlers on the CPU platform,
  `{target name: exported symbol}`, once per process. A failure is remembered and raised
  again on every later call (`KernelBuildError`, or the loader's `OSError`)."""
  with _register_lock:
    done = _registered.get(source)
    if isinstance(done, Exception):
      raise done
    if done is not None:
      return done
    try:
      lib = ctypes.CDLL(str(library(source, host=True)))
      for target, symbol in targets.items():
        jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(lib, symbol)),
                                    platform="cpu")
    except Exception as error:
      _registered[source] = error
      raise
    _registered[source] = lib  # keep it loaded
    return lib


def ffi_available(source: str, targets: dict[str, str], fallback: str) -> bool:
  """`register_ffi(source, targets)` succeeded; where not, False, with one warning per
  process saying what happens instead (`fallback`, such as "convolutions stay on XLA")."""
  try:
    register_ffi(source, targets)
    return True
  except (KernelBuildError, OSError) as error:
    if source not in _warned:
      _warned.add(source)
      warnings.warn(f"sdl.kernels ({source}): {fallback} ({error})", stacklevel=3)
    return False


_warned: set = set()
