"""Wall-clock timing of jitted (or any) callables, done the way benchmarks need it.

Warm-up calls (compilation, first-touch allocation) happen before the clock starts; every
timed call is blocked on (`jax.block_until_ready`), so asynchronous dispatch cannot hide
work; the median of `runs` calls is reported with its spread (10th-90th percentile).
`measure_interleaved` times several callables in turns, so that a shared machine's slow
minutes fall on all of them alike and their ratios hold.
"""
import dataclasses
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


def times_interleaved(calls: Sequence[tuple[Callable, tuple]], warmup: int = 2,
                      runs: int = 20) -> np.ndarray:
  """Seconds of each `fn(*args)` of `calls`, `[len(calls), runs]`: `warmup` untimed calls
  each, then `runs` rounds in which every callable runs once, in order (a shared machine's
  slow minutes then hit every call alike)."""
  for fn, args in calls:
    for _ in range(warmup):
      jax.block_until_ready(fn(*args))
  times = np.empty((len(calls), runs))
  for i in range(runs):
    for j, (fn, args) in enumerate(calls):
      start = time.perf_counter()
      jax.block_until_ready(fn(*args))
      times[j, i] = time.perf_counter() - start
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
