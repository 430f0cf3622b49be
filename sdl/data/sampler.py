"""Which samples each step trains on: a fresh permutation of all of them every epoch.

Generic over datasets: anything with a length (volumes, graphs, audio windows) is sampled
by index; the batch source then reads those indices. The order depends only on (seed,
epoch), and the batch of step `s` is a pure function of `s`, so a run resumed at step `s`
sees exactly the batches an uninterrupted run would.
"""
import dataclasses

import numpy as np


@dataclasses.dataclass(frozen=True)
class EpochSampler:
  """Global batch indices per step: a fresh permutation of all samples every epoch.

  Each epoch visits `steps_per_epoch * batch_size` samples exactly once (a remainder of
  fewer than `batch_size` samples is left out of that epoch, different ones each epoch).
  """
  num_samples: int
  batch_size: int
  seed: int

  def __post_init__(self):
    if self.batch_size > self.num_samples:
      raise ValueError(f"train.batch_size={self.batch_size} exceeds the {self.num_samples} "
                       "training samples; lower it or generate more data")

  @property
  def steps_per_epoch(self) -> int:
    return self.num_samples // self.batch_size

  def permutation(self, epoch: int) -> np.ndarray:
    return np.random.default_rng([self.seed, epoch]).permutation(self.num_samples)

  def indices(self, step: int) -> np.ndarray:
    epoch, within = divmod(step, self.steps_per_epoch)
    return self.permutation(epoch)[within * self.batch_size:(within + 1) * self.batch_size]
