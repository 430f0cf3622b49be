"""CosmoFlow's data: generated universes, the on-disk datasets, and the batch sources for
each `data.source` of a CosmoFlow config (`experiments/configs/cosmoflow.py`)."""
import os

import numpy as np

from sdl.data import loader, memory_store, store, synthetic, universes
from sdl.parallel import ConfigError

SOURCES = ("generate", "disk", "memory")


def universe_seeds(config) -> tuple[range, range]:
  """Training and validation universe seeds: disjoint, and disjoint across `config.seed`
  (or across `data.seed` where a config sets it: the same universes for every model seed)."""
  d = config.data
  seed = d.get("seed", None)
  base = (config.seed if seed is None else seed) * 1_000_003
  return (range(base, base + d.train_universes),
          range(base + d.train_universes, base + d.train_universes + d.val_universes))


def spec_of(config) -> universes.UniverseSpec:
  d = config.data
  return universes.UniverseSpec(d.universe_size, d.cell_mpc, d.particles_per_voxel)


def make_datasets(config):
  """(training, validation) `synthetic.ArrayDataset`s generated in memory."""
  d = config.data
  return tuple(synthetic.make_dataset(seeds, spec_of(config), d.input_size,
                                      d.crops_per_universe, desc=f"{name} universes")
               for name, seeds in zip(("training", "validation"), universe_seeds(config)))


def write_datasets(config, out: str, *, overwrite: bool = False, checksum: bool = True):
  """Write what `make_datasets(config)` generates to `out/train` and `out/val`."""
  d = config.data
  return tuple(synthetic.write_dataset(os.path.join(out, split), seeds, spec_of(config),
                                       d.input_size, d.crops_per_universe,
                                       desc=f"{split} universes", overwrite=overwrite,
                                       checksum=checksum)
               for split, seeds in zip(("train", "val"), universe_seeds(config)))


def open_datasets(config) -> tuple[store.Dataset, store.Dataset]:
  """The `train/` and `val/` datasets under `data.path`, checked against the config."""
  datasets = tuple(store.open_dataset(os.path.join(config.data.path, split))
                   for split in ("train", "val"))
  size = config.data.input_size
  for ds in datasets:
    expect = (size,) * 3 + (len(universes.REDSHIFTS),)
    if ds.volume_shape != expect:
      raise ConfigError(f"{ds.path} holds volumes of {list(ds.volume_shape)} but "
                        f"data.input_size={size} needs {list(expect)}; set data.input_size="
                        f"{ds.volume_shape[0]} or write a dataset of that size")
  return datasets


def make_sources(config, batch_sharding: dict, datasets=None):
  """Training and validation batch sources (`sdl.data.source.BatchSource`) for
  `data.source`."""
  source = config.data.source
  if source == "generate":
    train, val = datasets or make_datasets(config)
    return (loader.ArraySource.of_volumes(train.volumes, train.labels, batch_sharding),
            loader.ArraySource.of_volumes(val.volumes, val.labels, batch_sharding))
  train, val = open_datasets(config)
  if source == "memory":
    print(f"loading {len(train)} samples into device memory ...", flush=True)
    return (memory_store.DistributedStore.load(train, batch_sharding),
            loader.ShardedReader(val, batch_sharding))
  return loader.ShardedReader(train, batch_sharding), loader.ShardedReader(val, batch_sharding)


def sample_batch(config, batch_size: int = 1) -> dict:
  """A batch of zeros with the shapes and dtypes of CosmoFlow's (for init and shapes)."""
  size = config.data.input_size
  return {"volume": np.zeros((batch_size, size, size, size, len(universes.REDSHIFTS)),
                             np.int16),
          "label": np.zeros((batch_size, len(universes.PARAM_NAMES)), np.float32)}
