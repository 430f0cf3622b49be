"""In-memory CosmoFlow datasets made of synthetic universes.

A dataset is `volumes` int16 `[sample, depth, height, width, 4]` and `labels` float32
`[sample, 4]` (parameters scaled to [-1, 1]). Samples are crops of universes; the crops of
one universe share its label. Training and validation use disjoint universes (disjoint
seeds), so validation measures generalisation to new cosmologies, not new crops.
"""
import concurrent.futures
import dataclasses
import time

import numpy as np

from sdl import console, host_memory
from sdl.data import store, universes


@dataclasses.dataclass(frozen=True)
class ArrayDataset:
  volumes: np.ndarray  # int16 [sample, D, H, W, C]
  labels: np.ndarray   # float32 [sample, 4]

  def __len__(self) -> int:
    return len(self.labels)


def universe_crops(seed: int, spec: universes.UniverseSpec, crop_size: int,
                   crops_per_universe: int) -> tuple[np.ndarray, np.ndarray]:
  """The crops (int16 `[crops, size, size, size, 4]`) and scaled label of one universe.

  Crops are periodic and at random offsets; one crop of the universe's own size is the
  full volume as generated.
  """
  volume, theta = universes.make_universe(seed, spec)
  if crop_size == spec.size and crops_per_universe == 1:  # the full volume, as generated
    return volume[None], universes.scale_params(theta).astype(np.float32)
  rng = np.random.default_rng([seed, 3])
  crops = np.stack([universes.random_crop(volume, crop_size, rng)
                    for _ in range(crops_per_universe)])
  return crops, universes.scale_params(theta).astype(np.float32)


# Peak host bytes per voxel while one universe is generated (float64 fields, complex128
# FFTs, int64 Poisson draws): 5.8 GiB measured at 512³, 45 bytes a voxel.
GENERATION_BYTES_PER_VOXEL = 48


def for_each_universe(seeds, spec: universes.UniverseSpec, crop_size: int,
                      crops_per_universe: int, consume, *, desc: str, progress: bool = True,
                      threads: int = 4) -> None:
  """Generate universes in parallel threads (as many as memory allows, up to `threads`);
  `consume(i, crops, label)` for the i-th seed."""
  seeds = list(seeds)
  start = time.perf_counter()
  # at most half the free memory: the training step needs the rest (one 512³ universe at a time)
  threads = max(1, min(threads, host_memory.available_bytes() // (2 * GENERATION_BYTES_PER_VOXEL
                                                       * spec.size ** 3)))

  def one(i_seed):
    i, seed = i_seed
    consume(i, *universe_crops(seed, spec, crop_size, crops_per_universe))

  with concurrent.futures.ThreadPoolExecutor(threads) as pool:  # numpy's FFTs release the GIL
    for done, _ in enumerate(pool.map(one, enumerate(seeds)), 1):
      if progress and (done == len(seeds) or done % max(1, len(seeds) // 10) == 0):
        console.progress(f"generating {desc}: {done}/{len(seeds)} "
                         f"({time.perf_counter() - start:.1f} s)", final=done == len(seeds))


def make_dataset(seeds, spec: universes.UniverseSpec, crop_size: int, crops_per_universe: int,
                 *, desc: str = "universes", progress: bool = True) -> ArrayDataset:
  """Generate universes for `seeds` (in parallel) and cut `crops_per_universe` crops of each."""
  seeds = list(seeds)
  n = crops_per_universe
  volumes = np.empty((len(seeds) * n, crop_size, crop_size, crop_size, len(spec.redshifts)),
                     np.int16)
  labels = np.empty((len(volumes), 4), np.float32)

  def consume(i, crops, label):
    volumes[i * n:(i + 1) * n], labels[i * n:(i + 1) * n] = crops, label

  for_each_universe(seeds, spec, crop_size, n, consume, desc=desc, progress=progress)
  return ArrayDataset(volumes, labels)


def write_dataset(path: str, seeds, spec: universes.UniverseSpec, crop_size: int,
                  crops_per_universe: int, *, desc: str = "universes", progress: bool = True,
                  overwrite: bool = False, checksum: bool = True) -> str:
  """`make_dataset`, streamed to an on-disk dataset at `path` (see `sdl.data.store`).

  Sample order and content equal `make_dataset(seeds, ...)` exactly, so a run reading the
  written dataset sees the same batches as one generating it in memory.
  """
  seeds = list(seeds)
  n = crops_per_universe
  source = {"generator": "sdl.data.universes", "version": universes.VERSION, "seeds": seeds,
            "crops_per_universe": n, "spec": dataclasses.asdict(spec)}
  with store.Writer(path, len(seeds) * n, (crop_size,) * 3 + (len(spec.redshifts),),
                    param_names=universes.PARAM_NAMES, param_low=universes.PARAM_LOW,
                    param_high=universes.PARAM_HIGH, source=source, overwrite=overwrite,
                    checksum=checksum) as writer:
    def consume(i, crops, label):
      for c, crop in enumerate(crops):
        writer.write(i * n + c, crop, label)

    for_each_universe(seeds, spec, crop_size, n, consume, desc=desc, progress=progress)
    return writer.commit()
