"""The one place that sets XLA compiler flags for sdl: XLA:CPU's kernel library, scheduler and
collective timeout, and the compile options that keep rematerialisation on CPU.

XLA reads `XLA_FLAGS` once, when JAX starts its first backend, so `sdl.process.configure()`
applies these defaults before then (`apply_defaults`), before any computation. A flag the user already
put in `XLA_FLAGS` is left as it is: that is also the way to opt out.

* `--xla_cpu_experimental_ynn_fusion_type=individual_dot`. jaxlib 0.10-0.12 hand both
  dots and convolutions to YNNPACK on CPU by default. With convolutions on Eigen instead,
  the DeepBench 2D convolutions ran at a median 77 GFLOP/s forward + backward against 31
  (`experiments.layer_bench`), and the mlperf CosmoFlow step ran 1.24-1.34 x faster
  (lbann: 0.96 and 1.38 x in two runs; `experiments.cosmoflow_step_bench`). Both were
  measured with jax 0.10.2 on the 2-core EPYC VM; commands and tables are in
  docs/benchmarks.md. Dots stay on YNNPACK: with Eigen's dots the 29 DeepBench GEMMs had
  the same median (95.5 against 96.9 GFLOP/s) and the 4096³ GEMM fell from 123 to 71
  (`experiments.layer_bench`, docs/benchmarks.md). The flag only affects the CPU backend;
  GPU and TPU compilers ignore it.

* `--xla_cpu_enable_concurrency_optimized_scheduler=false`. With XLA:CPU's default
  scheduler, a sharded K-FAC step on 8 virtual devices (`tests/test_kfac.py`, phased steps
  against the counter-driven one, data-parallel with a factored Conv3D) crashed inside the
  in-process all-reduce (a segfault in `ReduceScatter`, or a rendezvous that never
  completes) in about half the runs, and in every run with `stale_tolerance=0`; with the
  list scheduler, none in 9 runs of that setting (jax 0.10.2 and 0.12). The reordering that
  scheduler does for concurrency is what breaks collectives here, so sdl does without it.

* `--xla_cpu_collective_call_terminate_timeout_seconds=1800`. XLA:CPU aborts the process
  when a device has waited 40 s in an in-process collective for the others. K-FAC inverts
  each layer on one device while the rest wait for its inverse in an all-reduce; lbann's
  widest factor (6,913) takes about 70 s to decompose on 2 cores, so every CosmoFlow K-FAC
  inverse step on virtual devices aborted without all layers capped by
  `optim.kfac.max_factor_dim` (jax 0.10.2, a 2 x 2 x 2 mesh). A real hang still warns after
  XLA's 20 s, and multi-process runs have the step watchdog (`train.stall_seconds`).

Rematerialisation (`jax.checkpoint`, flax's `nn.remat`) on XLA:CPU: JAX guards the
recomputed forward pass with an optimization barrier so that common-subexpression
elimination cannot merge it with the original, but XLA:CPU expands the barriers away
("cse_barrier_expander") before its last CSE pass, which then does merge them. The lbann
CosmoFlow step with a block of two convolutions rematerialised compiled to the same 20
convolutions as without (22 before optimisation), and the backward pass kept the
activations remat was meant to drop. `remat_compiler_options` gives the per-jit option
that skips that one pass; sdl's trainers pass it to the steps whose model rematerialises,
so nothing else compiles differently. `tests/test_cosmoflow_model.py` checks the count.

`SDL_FAST_COMPILE=1` in the environment adds `--xla_backend_optimization_level=1`: LLVM
optimises the generated loops at -O1 instead of -O2, for work that compiles far more than it
computes (the test suite, tiny notebook shapes). At -O2, fusions over shapes with small
leading dimensions, such as a 3D CNN's (3, 3, 3, C_in, C_out) kernels, compile slowly:
`jax.jit(lambda k: jax.random.bits(k, (3, 3, 3, 32, 64))).lower(jax.random.key(0)).compile()`
took 1.5 s, against 0.2 s with `XLA_FLAGS=--xla_backend_optimization_level=1` or for the
flat shape (55296,) (jax 0.10.2, the 2-core AVX2 EPYC VM). The level moves results only
by rounding: `tests/test_xla_flags.py` checks that a 3D CNN's loss and gradients agree
within 1e-6 at both levels. The suite took a fifth less time with
it (docs/benchmarks.md, "Test suite"); runs that compute keep XLA's default.

Unknown flags abort XLA at start-up, and the first one is marked experimental, so all are only
set for the jaxlib versions they were measured with (`CPU_FLAGS_JAXLIB`); a newer jaxlib
runs with its own defaults until someone measures again.
"""
import os
import re
from importlib import metadata

CPU_FLAGS = {"xla_cpu_experimental_ynn_fusion_type": "individual_dot",
             "xla_cpu_enable_concurrency_optimized_scheduler": "false",
             "xla_cpu_collective_call_terminate_timeout_seconds": "1800"}
CPU_FLAGS_JAXLIB = ((0, 10), (0, 13))  # [first, past-the-end) (major, minor) known to work


FAST_COMPILE_FLAGS = {"xla_backend_optimization_level": "1"}  # `SDL_FAST_COMPILE=1`


# Per-jit compile options (`jax.jit(..., compiler_options=...)`) under which XLA:CPU keeps
# a rematerialised forward pass apart from the original (see the module docstring).
CPU_REMAT_OPTIONS = {"xla_disable_hlo_passes": "cse_barrier_expander"}


def remat_compiler_options(platform: str) -> dict[str, str]:
  """The compile options of a jitted step whose model rematerialises, on `platform`
  ("cpu", "gpu", "tpu"): XLA:CPU's, and none elsewhere."""
  return dict(CPU_REMAT_OPTIONS) if platform == "cpu" else {}


def _jaxlib_version() -> tuple[int, int] | None:
  try:
    installed = metadata.version("jaxlib")
  except metadata.PackageNotFoundError:
    return None
  match = re.match(r"(\d+)\.(\d+)", installed)
  return (int(match[1]), int(match[2])) if match else None


def default_flags(jaxlib_version: tuple[int, int] | None,
                  fast_compile: bool = False) -> dict[str, str]:
  """sdl's default XLA flags for a jaxlib (major, minor) version, with the fast-compile
  flags when asked (`SDL_FAST_COMPILE`)."""
  low, high = CPU_FLAGS_JAXLIB
  flags = dict(CPU_FLAGS) if jaxlib_version and low <= jaxlib_version < high else {}
  return {**flags, **FAST_COMPILE_FLAGS} if fast_compile else flags


def with_defaults(xla_flags: str, jaxlib_version: tuple[int, int] | None,
                  fast_compile: bool = False) -> str:
  """`xla_flags` plus every default flag it does not already set."""
  extra = [f"--{name}={value}"
           for name, value in default_flags(jaxlib_version, fast_compile).items()
           if not re.search(rf"--{name}(=|\s|$)", xla_flags)]
  return " ".join([xla_flags.strip(), *extra]).strip()


def fast_compile_requested(environ=os.environ) -> bool:
  """Whether `SDL_FAST_COMPILE` asks for the fast-compile flags ("1"; "0" or unset: no)."""
  value = environ.get("SDL_FAST_COMPILE", "0")
  if value not in ("0", "1"):
    raise ValueError(f"SDL_FAST_COMPILE={value!r}: set it to 1 (LLVM at -O1, for "
                     "compile-bound work) or 0 (XLA's default)")
  return value == "1"


def apply_defaults(environ=os.environ) -> None:
  """Add sdl's defaults to `environ["XLA_FLAGS"]` (no effect once a backend started)."""
  flags = with_defaults(environ.get("XLA_FLAGS", ""), _jaxlib_version(),
                        fast_compile_requested(environ))
  if flags:
    environ["XLA_FLAGS"] = flags
