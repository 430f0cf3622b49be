"""What the generic trainer reads batches from: any dataset with a length and a `batch`.

`sdl.train.loop.fit` asks for batch `step` through a `get_batch(step)` callable (usually a
`sdl.data.loader.Prefetcher` over a `BatchSource` and a `sdl.data.sampler.EpochSampler`),
and `sdl.train.evaluate.evaluate` walks a `BatchSource` in order. Volumes
(`loader.ArraySource`, `loader.ShardedReader`, `memory_store.DistributedStore`) implement
it; so can padded graphs or audio windows: return a dict of global arrays, each laid out
in the sharding the step expects.
"""
from typing import Protocol, runtime_checkable

import numpy as np


@runtime_checkable
class BatchSource(Protocol):
  def __len__(self) -> int:
    """The number of samples."""

  def batch(self, indices: np.ndarray) -> dict:
    """The samples at `indices` (a global batch), as a dict of (sharded) arrays."""
