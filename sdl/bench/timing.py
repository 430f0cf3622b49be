"""Wall-clock timing of jitted (or any) callables, done the way benchmarks need it.

Warm-up calls (compilation, first-touch allocation) happen before the clock starts; every
timed call is blocked on (`jax.block_until_ready`), so asynchronous dispatch cannot hide
work; the median of `runs` calls is reported with its spread (10th-90th percentile).
`measure_interleaved` times several callables in turns, so that a shared machine's slow
minutes fall on all of them alike and their ratios hold.
"""
import dataclasses
import math
import time
from collections.abc import Callable, Sequence

import jax
import numpy as np


@dataclasses.dataclass(frozen=True)
class Timing:
  median_s: float
  p10_s: float
  p90_s: float
  runs: int

  @property
  def spread(self) -> float:
    """(p90 - p10) / median: relative spread of the timed runs."""
    return (self.p90_s - self.p10_s) / self.median_s


def measure(fn: Callable, *args, warmup: int = 2, runs: int = 20) -> Timing:
  """Time `fn(*args)`: `warmup` untimed calls, then `runs` timed ones."""
  return measure_interleaved([(fn, args)], warmup=warmup, runs=runs)[0]


# Calls whose warm-up took less than LEAD_IN_BELOW_S run untimed for about LEAD_IN_S (at
# least once) before each timed run.
LEAD_IN_BELOW_S = 0.5
LEAD_IN_S = 0.02


def _call_s(fn: Callable, args) -> float:
  start = time.perf_counter()
  jax.block_until_ready(fn(*args))
  return time.perf_counter() - start


def times_interleaved(calls: Sequence[tuple[Callable, tuple]], warmup: int = 2,
                      runs: int = 20) -> np.ndarray:
  """Seconds of each `fn(*args)` of `calls`, `[len(calls), runs]`: `warmup` untimed calls
  each, then `runs` rounds in which every callable runs once, in order (a shared machine's
  slow minutes then hit every call alike).

  A call whose last warm-up took under `LEAD_IN_BELOW_S` first runs untimed for about
  `LEAD_IN_S` (at least once) before each timed run. It is then timed after itself, as in
  a loop of its own ops, once the previous library's idle threads have stopped spinning:
  PyTorch's OpenMP threads spin for milliseconds after each op, and on the 2-core VM the sdl
  layer timed right after one ran up to 2 x slower (lbann conv5, 4³ x 128 → 256: 146 → 75
  GFLOP/s forward; `experiments.lowering_checks --check=after_torch`).
  """
  last = [0.0] * len(calls)
  for j, (fn, args) in enumerate(calls):
    for _ in range(warmup):
      last[j] = _call_s(fn, args)
  lead_in = [math.ceil(LEAD_IN_S / max(t, 1e-6)) if warmup and t < LEAD_IN_BELOW_S else 0
             for t in last]
  times = np.empty((len(calls), runs))
  for i in range(runs):
    for j, (fn, args) in enumerate(calls):
      for _ in range(lead_in[j]):
        jax.block_until_ready(fn(*args))
      times[j, i] = _call_s(fn, args)
  return times


def measure_interleaved(calls: Sequence[tuple[Callable, tuple]], warmup: int = 2,
                        runs: int = 20) -> list[Timing]:
  """`times_interleaved`, summarised: one `Timing` per call."""
  times = times_interleaved(calls, warmup, runs)
  timings = []
  for row in times:
    p10, median, p90 = np.percentile(row, [10, 50, 90])
    timings.append(Timing(float(median), float(p10), float(p90), runs))
  return timings
