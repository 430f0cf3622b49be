r"""Checks behind some of sdl's CPU choices (docs/design/).

    python -m experiments.lowering_checks --check=planes       # fold vs one GEMM per shape
    python -m experiments.lowering_checks --check=steps        # GEMM_MAX_PLANE 4 vs 16, whole nets
    python -m experiments.lowering_checks --check=after_torch  # sdl timed right after PyTorch
    python -m experiments.lowering_checks --check=after_torch --lead_in_s=0  # without lead-ins
    python -m experiments.lowering_checks --check=host_memory  # sdl.host_memory off and on
    python -m experiments.lowering_checks --check=step_faults --runs=16  # the same, 128³ steps

`planes`: 3 x 3 x 3 'same' convolutions (batch x side³ x C → O) through the depth fold
(`sdl.models.conv.fold_depth`) and as one GEMM over all taps (`patches_gemm`), forward and
forward + backward (input and kernel gradients), GFLOP/s, median of `--runs` in turns.
`steps`: forward + backward of CosmoFlow networks compiled with `GEMM_MAX_PLANE` 4 and 16,
timed in turns. `after_torch`: sdl's folded layer timed alone, then with a PyTorch conv3d
between its calls (`sdl.bench.timing.LEAD_IN_S`, set by `--lead_in_s`, gives each short call
untimed runs of its own first; 0 times it right after PyTorch, with no lead-in).
`host_memory`: CosmoFlow's first layer (`HOST_MEMORY_LAYER`, direct kernel forward) in two
fresh processes, `SDL_KEEP_FREED_MEMORY=0` and the default (`sdl.host_memory`): median
time per call, page faults per call (`getrusage`), GFLOP/s. `step_faults`: the same two
processes for each CosmoFlow network's 128³ train step (batch 2, folded lowering): each
step's seconds and page faults, and the process's peak memory.
"""
import numpy as np
from absl import app, flags

_CHECK = flags.DEFINE_enum("check", "planes",
                           ["planes", "steps", "after_torch", "host_memory", "host_memory_once",
                            "step_faults", "step_faults_once"],
                           "Which check (*_once: one process of the check's).")
_VARIANT = flags.DEFINE_string("variant", "mlperf", "step_faults_once: the CosmoFlow network.")
_RUNS = flags.DEFINE_integer("runs", 20, "Timed runs per cell (median kept).")
_LEAD_IN = flags.DEFINE_float("lead_in_s", None, "Override sdl.bench.timing.LEAD_IN_S.")

PLANE_SHAPES = [(2, 4, 128, 256), (2, 4, 64, 128), (4, 4, 128, 256), (2, 8, 256, 512),
                (1, 8, 128, 256), (2, 8, 64, 128)]
STEP_NETS = [("mlperf", 32, 4), ("lbann", 64, 2)]
TORCH_LAYERS = [(2, 16, 64, 128, 2), (2, 4, 128, 256, 1), (2, 2, 256, 256, 1)]  # + stride
HOST_MEMORY_LAYER = (2, 128, 4, 32)  # mlperf conv1: batch, side, C, O (537 MB output)


def _operands(rng, n, side, c, o):
  import jax.numpy as jnp  # noqa: PLC0415
  return (jnp.asarray(rng.standard_normal((n, side, side, side, c), np.float32)),
          jnp.asarray(rng.standard_normal((3, 3, 3, c, o), np.float32) / np.sqrt(27 * c)))


def _both_passes(f):
  import jax  # noqa: PLC0415
  import jax.numpy as jnp  # noqa: PLC0415
  return jax.jit(f), jax.jit(jax.value_and_grad(lambda x, k: jnp.sum(f(x, k)), argnums=(0, 1)))


def planes(rng, measure_interleaved, conv):
  import jax.numpy as jnp  # noqa: PLC0415
  pad_dh = lambda x: jnp.pad(x, [(0, 0), (1, 1), (1, 1), (0, 0), (0, 0)])  # noqa: E731
  impls = {"folded": lambda x, k: conv.fold_depth(pad_dh(x), k, (1, 1, 1), (1, 1)),
           "one GEMM": lambda x, k: conv.patches_gemm(pad_dh(x), k, (1, 1, 1), (1, 1))}
  print("| batch x side³ x C → O | " + " | ".join(f"{i} fwd / fwd+bwd" for i in impls) + " |")
  print("|---|" + "---|" * len(impls))
  for n, side, c, o in PLANE_SHAPES:
    x, k = _operands(rng, n, side, c, o)
    flops = 2 * n * side ** 3 * 27 * c * o
    calls = [(fn, (x, k)) for f in impls.values() for fn in _both_passes(f)]
    t = [c.median_s for c in measure_interleaved(calls, warmup=2, runs=_RUNS.value)]
    cells = [f"{flops / t[2 * i] / 1e9:.0f} / {3 * flops / t[2 * i + 1] / 1e9:.0f}"
             for i in range(len(impls))]
    print(f"| {n} x {side}³ x {c} → {o} | " + " | ".join(cells) + " |", flush=True)


def steps(rng, measure_interleaved, conv):
  import jax  # noqa: PLC0415
  import jax.numpy as jnp  # noqa: PLC0415

  from sdl.models.cosmoflow import CosmoFlow  # noqa: PLC0415
  print("| network, side, batch | GEMM_MAX_PLANE 4 (ms) | 16 (ms) |\n|---|---|---|")
  default = conv.GEMM_MAX_PLANE
  for variant, size, batch in STEP_NETS:
    x = jnp.asarray(rng.poisson(3.0, size=(batch, size, size, size, 4)).astype(np.int16))
    y = jnp.asarray(rng.uniform(-1, 1, size=(batch, 4)).astype(np.float32))
    model = CosmoFlow(variant, size, conv_lowering="folded")
    params = model.init(jax.random.key(0), x[:1])
    loss = lambda p: jnp.mean((model.apply(p, x) - y) ** 2)  # noqa: E731
    compiled = []
    for plane in (4, 16):  # read when traced
      conv.GEMM_MAX_PLANE = plane
      compiled.append(jax.jit(jax.value_and_grad(loss)).lower(params).compile())
    conv.GEMM_MAX_PLANE = default
    t = measure_interleaved([(f, (params,)) for f in compiled], warmup=2, runs=_RUNS.value)
    print(f"| {variant}, {size}³, {batch} | {1e3 * t[0].median_s:.1f} | "
          f"{1e3 * t[1].median_s:.1f} |", flush=True)


def after_torch(rng, measure_interleaved, conv):
  try:
    import torch  # noqa: PLC0415 (optional reference)
  except ImportError:
    raise SystemExit("--check=after_torch needs PyTorch (pip install torch)") from None
  print("| layer (batch x side³ x C → O, stride) | sdl alone fwd / fwd+bwd | "
        "sdl after PyTorch fwd / fwd+bwd | PyTorch fwd |\n|---|---|---|---|")
  for n, side, c, o, s in TORCH_LAYERS:
    x, k = _operands(rng, n, side, c, o)
    fw, fb = _both_passes(lambda x, k: conv.conv3d_folded(x, k, (s,) * 3, ((1, 1),) * 3))
    tx, tk = torch.randn(n, c, side, side, side), torch.randn(o, c, 3, 3, 3)
    tconv = lambda tx, tk: torch.nn.functional.conv3d(tx, tk, stride=s, padding=1)  # noqa: E731
    out = (side + 2 - 3) // s + 1
    flops = 2 * n * out ** 3 * 27 * c * o
    alone = measure_interleaved([(fw, (x, k)), (fb, (x, k))], warmup=2, runs=_RUNS.value)
    mixed = measure_interleaved([(fw, (x, k)), (tconv, (tx, tk)), (fb, (x, k)),
                                 (tconv, (tx, tk))], warmup=2, runs=_RUNS.value)
    rate = lambda t, m=1: f"{m * flops / t.median_s / 1e9:.0f}"  # noqa: E731
    print(f"| {n} x {side}³ x {c} → {o}, {s} | {rate(alone[0])} / {rate(alone[1], 3)} | "
          f"{rate(mixed[0])} / {rate(mixed[2], 3)} | {rate(mixed[1])} |", flush=True)


def _fresh_processes(check: str, header: str, *args: str) -> None:
  """Run `--check=<check>` in a fresh process with `SDL_KEEP_FREED_MEMORY` 0 and 1 (the
  allocator is set once per process), printing each one's last line as a table row."""
  import os  # noqa: PLC0415
  import subprocess  # noqa: PLC0415
  import sys  # noqa: PLC0415
  print(header, flush=True)
  for keep in ("0", "1"):
    row = subprocess.run(
        [sys.executable, "-m", "experiments.lowering_checks", f"--check={check}",
         f"--runs={_RUNS.value}", *args], env={**os.environ, "SDL_KEEP_FREED_MEMORY": keep},
        capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
    print(f"| {keep} {row}", flush=True)


def host_memory(rng, measure_interleaved, conv):
  del rng, measure_interleaved, conv
  _fresh_processes("host_memory_once", "| SDL_KEEP_FREED_MEMORY | ms per call | page faults "
                   "per call | GFLOP/s |\n|---|---|---|---|")


def step_faults(rng, measure_interleaved, conv):
  del rng, measure_interleaved, conv
  for variant in ("mlperf", "lbann"):
    _fresh_processes("step_faults_once", f"\n{variant}, 128³, batch 2: each step's seconds "
                     "and page faults\n\n| SDL_KEEP_FREED_MEMORY | steps | peak memory |"
                     "\n|---|---|---|", f"--variant={variant}")


def _timed_with_faults(run, runs: int) -> tuple[list[float], list[int]]:
  """Seconds and minor page faults (`getrusage`) of each of `runs` calls of `run()`."""
  import resource  # noqa: PLC0415
  import time  # noqa: PLC0415
  times, faults = [], []
  for _ in range(runs):
    f0, t0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt, time.perf_counter()
    run()
    times.append(time.perf_counter() - t0)
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
  return times, faults


def step_faults_once(rng, measure_interleaved, conv):
  del rng, measure_interleaved, conv
  import resource  # noqa: PLC0415

  from experiments.cosmoflow_step_bench import sdl_step  # noqa: PLC0415
  run = sdl_step(_VARIANT.value, 128, 2, "folded")  # compiled, one step run
  times, faults = _timed_with_faults(run, _RUNS.value)
  cells = ", ".join(f"{t:.2f} s {f}" for t, f in zip(times, faults))
  print(f"| {cells} | {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.1f} GB |")


def host_memory_once(rng, measure_interleaved, conv):
  del measure_interleaved, conv
  import statistics  # noqa: PLC0415

  import jax  # noqa: PLC0415
  import jax.numpy as jnp  # noqa: PLC0415

  from sdl.kernels import conv3d as direct_kernels  # noqa: PLC0415
  n, side, c, o = HOST_MEMORY_LAYER
  x = jnp.asarray(rng.standard_normal((n, side + 2, side + 2, side + 2, c), np.float32))
  k = jnp.asarray(rng.standard_normal((3, 3, 3, c, o), np.float32))
  f = jax.jit(direct_kernels.forward)
  f(x, k).block_until_ready()
  times, faults = _timed_with_faults(lambda: f(x, k).block_until_ready(), _RUNS.value)
  t = statistics.median(times)
  print(f"| {1e3 * t:.0f} | {statistics.median(faults):.0f} | "
        f"{2 * n * side ** 3 * 27 * c * o / t / 1e9:.0f} |")


def main(argv):
  del argv
  from sdl.bench import timing  # noqa: PLC0415
  from sdl.models import conv  # noqa: PLC0415
  if _LEAD_IN.value is not None:
    timing.LEAD_IN_S = _LEAD_IN.value
  check = {"planes": planes, "steps": steps, "after_torch": after_torch,
           "host_memory": host_memory, "host_memory_once": host_memory_once,
           "step_faults": step_faults, "step_faults_once": step_faults_once}[_CHECK.value]
  check(np.random.default_rng(0), timing.measure_interleaved, conv)


if __name__ == "__main__":
  app.run(main)
