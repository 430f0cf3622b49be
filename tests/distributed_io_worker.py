"""One of two processes for tests/test_distributed_io.py (run as a script, not a test).

Usage: distributed_io_worker.py PROCESS_ID PORT DATASET OUT.npz
Joins a 2-process `jax.distributed` job on localhost (2 CPU devices each, gloo
collectives), reads global batches of a 2 x 2 data x spatial mesh with the sharded reader
and the distributed in-memory store, and saves what this process's devices hold.
"""
import sys

import jax

process_id, port, dataset_path, out = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
jax.config.update("jax_num_cpu_devices", 2)
jax.config.update("jax_cpu_collectives_implementation", "gloo")
jax.distributed.initialize(f"localhost:{port}", num_processes=2, process_id=process_id)

import numpy as np  # noqa: E402

from sdl.data import loader, memory_store, store  # noqa: E402
from sdl.data.sampler import EpochSampler  # noqa: E402
from sdl.parallel import VOLUME_AXES, Partitioner, make_mesh  # noqa: E402

assert jax.process_count() == 2 and jax.device_count() == 4
mesh = make_mesh((2, 2), ("data", "spatial"))
part = Partitioner.create(mesh)
shardings = {"volume": part.sharding(VOLUME_AXES), "label": part.sharding(("batch", None))}
dataset = store.open_dataset(dataset_path)
sampler = EpochSampler(len(dataset), 4, seed=7)
sources = {"disk": loader.ShardedReader(dataset, shardings)}
sources["memory"] = memory_store.DistributedStore.load(dataset, shardings)
bytes_for_store = dataset.bytes_read
saved = {}
for name, source in sources.items():
  for step in range(3):
    batch = source.batch(np.sort(sampler.indices(step)))
    for shard in batch["volume"].addressable_shards:
      starts = [s.start or 0 for s in shard.index]
      saved[f"{name}/{step}/{shard.device.id}/{starts}"] = np.asarray(shard.data)
    for shard in batch["label"].addressable_shards:
      saved[f"{name}-label/{step}/{shard.device.id}/{shard.index[0].start or 0}"] = (
          np.asarray(shard.data))
saved["bytes_for_store"] = np.array(bytes_for_store)
saved["bytes_total"] = np.array(dataset.bytes_read)
np.savez(out, **saved)
jax.distributed.shutdown()
