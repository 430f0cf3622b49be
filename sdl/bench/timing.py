"""Wall-clock timing of jitted (or any) callables, done the way benchmarks need it.

Warm-up calls (compilation, first-touch allocation) happen before the clock starts; every
timed call is blocked on (`jax.block_until_ready`), so asynchronous dispatch cannot hide
work; the median of `runs` calls is reported with its spread (10th-90th percentile).
"""
import dataclasses
import time
from collections.abc import Callable

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
  for _ in range(warmup):
    jax.block_until_ready(fn(*args))
  times = np.empty(runs)
  for i in range(runs):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times[i] = time.perf_counter() - start
  p10, median, p90 = np.percentile(times, [10, 50, 90])
  return Timing(float(median), float(p10), float(p90), runs)
