"""Batch order, prefetching and the distributed in-memory store."""
import threading

import jax
import numpy as np
import pytest

from sdl.data import loader, memory_store, store, synthetic
from sdl.data.sampler import EpochSampler
from tests.test_data_store import MESHES, random_volumes, shardings_for, write

N, BATCH = 24, 8


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
  volumes, labels = random_volumes(N, shape=(8, 8, 4, 4), seed=3)
  volumes[:, 0, 0, 0, 0] = np.arange(N)  # each sample names itself
  return store.open_dataset(write(tmp_path_factory.mktemp("ds") / "set", volumes, labels)), volumes


def sample_ids_per_rank(batch, data_ranks):
  """Sample ids each data-parallel rank holds, read from the rank's own shards."""
  per_rank = [set() for _ in range(data_ranks)]
  b = batch["volume"].shape[0] // data_ranks
  for shard in batch["volume"].addressable_shards:
    if (shard.index[1].start or 0) == 0 and (shard.index[2].start or 0) == 0:
      rank = (shard.index[0].start or 0) // b
      per_rank[rank].update(np.asarray(shard.data)[:, 0, 0, 0, 0].tolist())
  return per_rank


def test_every_sample_once_per_epoch_across_data_ranks(dataset):
  ds, _ = dataset
  reader = loader.ShardedReader(ds, shardings_for((4, 2), ("data", "spatial")))
  sampler = EpochSampler(N, BATCH, seed=5)
  epochs = []
  for epoch in range(2):
    seen = []
    for step in range(epoch * 3, epoch * 3 + 3):
      ranks = sample_ids_per_rank(reader.batch(sampler.indices(step)), 4)
      assert all(len(r) == BATCH // 4 for r in ranks)
      seen += [i for r in ranks for i in sorted(r)]
    assert sorted(seen) == list(range(N))  # each exactly once, over all ranks
    epochs.append(seen)
  assert epochs[0] != epochs[1]  # a fresh permutation each epoch
  again = EpochSampler(N, BATCH, seed=5)
  other = EpochSampler(N, BATCH, seed=6)
  assert all((again.indices(s) == sampler.indices(s)).all() for s in range(6))
  assert any((other.indices(s) != sampler.indices(s)).any() for s in range(6))


def test_reader_batches_live_in_reused_aligned_host_buffers(dataset):
  ds, volumes = dataset
  reader = loader.ShardedReader(ds, shardings_for((2, 4), ("data", "spatial")))
  batches = N // BATCH
  held = reader.batch(np.arange(BATCH))  # kept: its buffers must never be handed out again
  if jax.devices()[0].platform == "cpu":  # XLA:CPU adopted the read buffers: no copy
    starts = {-(-o.ctypes.data // store.HOST_ALIGNMENT) for o in reader.buffers._owners}
    assert {s.data.unsafe_buffer_pointer() // store.HOST_ALIGNMENT
            for s in held["volume"].addressable_shards} == starts
  for step in range(1, 12):
    b = step % batches
    batch = reader.batch(np.arange(b * BATCH, (b + 1) * BATCH))
    np.testing.assert_array_equal(np.asarray(batch["volume"]), volumes[b * BATCH:][:BATCH])
    del batch
  np.testing.assert_array_equal(np.asarray(held["volume"]), volumes[:BATCH])
  # Dropped batches' buffers come back (XLA lets go of them asynchronously): 12 batches
  # of 8 shards did not need 96 buffers.
  assert len(reader.buffers._owners) <= 6 * 8


def test_host_buffers_reuse_only_idle_memory():
  pool = loader.HostBuffers(max_idle=1)
  a = pool((4, 1000), np.int16)
  view = a[1:]
  del a
  b = pool((4, 1000), np.int16)  # `view` still holds the first buffer
  assert not np.shares_memory(b, view)
  del view
  c = pool((4, 1000), np.int16)
  assert c.ctypes.data % store.HOST_ALIGNMENT == 0 and len(pool._owners) == 2
  held = jax.device_put(b)
  del b, c
  d = pool((2, 2000), np.int16)  # same bytes: the idle one is reused, not the one `held` uses
  if jax.devices()[0].platform == "cpu":
    assert held.unsafe_buffer_pointer() != d.ctypes.data
  assert len(pool._owners) == 2
  e = pool((3,), np.float32)  # another size: a new owner; idle ones beyond max_idle freed
  assert len(pool._owners) <= 3 and e.shape == (3,)


def test_resumed_prefetcher_gives_the_uninterrupted_batches(dataset):
  ds, volumes = dataset
  reader = loader.ShardedReader(ds, shardings_for((2, 4), ("data", "spatial")))
  sampler = EpochSampler(N, BATCH, seed=1)

  def produce(step):
    return reader.batch(np.sort(sampler.indices(step)))
  straight = loader.Prefetcher(produce, depth=2)
  want = [np.asarray(straight(s)["volume"]) for s in range(7)]
  straight.close()
  resumed = loader.Prefetcher(produce, depth=2)
  for s in range(4, 7):  # resume mid-epoch 1 (3 steps per epoch)
    np.testing.assert_array_equal(np.asarray(resumed(s)["volume"]), want[s])
  resumed.close()
  np.testing.assert_array_equal(want[4], volumes[np.sort(sampler.permutation(1)[8:16])])


def test_prefetcher_reads_ahead_and_restarts_on_a_jump():
  asked, gate = [], threading.Event()

  def produce(step):
    asked.append(step)
    if step > 0:
      gate.wait(5)
    return step
  prefetch = loader.Prefetcher(produce, depth=3, workers=1)
  assert prefetch(0) == 0
  gate.set()
  assert prefetch(1) == 1 and prefetch(2) == 2
  assert prefetch(10) == 10  # a jump (resume) restarts the read-ahead there
  prefetch.close()
  assert asked[:5] == [0, 1, 2, 3, 4] and 10 in asked and 11 in asked
  assert prefetch.batches == 4


def simulate_exchange(indices, rows, ranks):
  """What every destination rank receives, by plain numpy indexing of the plan."""
  send, place = memory_store.exchange_plan(indices, rows, ranks)
  store_ids = np.arange(rows * ranks).reshape(ranks, rows)   # owner o holds rows o*rows...
  buffers = store_ids[np.arange(ranks)[:, None, None], send]  # [owner, dest, m]
  received = buffers.transpose(1, 0, 2).reshape(ranks, -1)    # dest gets all owners' buckets
  return np.take_along_axis(received, place, axis=1).reshape(-1), send.shape[2]


@pytest.mark.parametrize("ranks,batch,seed", [(1, 4, 0), (4, 8, 1), (8, 64, 2), (3, 12, 3)])
def test_exchange_plan_delivers_each_rank_its_samples(ranks, batch, seed):
  rows = 40
  indices = np.random.default_rng(seed).permutation(rows * ranks)[:batch]
  got, m = simulate_exchange(indices, rows, ranks)
  np.testing.assert_array_equal(got, indices)
  assert m <= batch // ranks


@pytest.mark.parametrize("mesh_shape,axes", MESHES)
def test_memory_store_batches_equal_direct_batches(dataset, mesh_shape, axes):
  ds, volumes = dataset
  shardings = shardings_for(mesh_shape, axes)
  held = memory_store.DistributedStore.load(ds, shardings)
  # The store is spread: each device holds 1/devices of all samples' voxels.
  shard = held.volumes.addressable_shards[0].data
  assert shard.size * len(jax.devices()) == held.volumes.size
  assert held.volumes.size >= volumes.size
  sampler = EpochSampler(N, BATCH, seed=2)
  for step in range(4):
    indices = np.sort(sampler.indices(step))
    batch = held.batch(indices)
    np.testing.assert_array_equal(np.asarray(batch["volume"]), volumes[indices])
    np.testing.assert_array_equal(np.asarray(batch["label"]), ds.labels[indices])
    assert batch["volume"].sharding == shardings["volume"]


def test_memory_store_pads_and_communicates_only_by_all_to_all(dataset):
  ds, volumes = dataset
  shardings = shardings_for((2, 4), ("data", "spatial"))
  arrays = synthetic.ArrayDataset(volumes[:21], ds.labels[:21])  # 21 does not split over 2
  held = memory_store.DistributedStore.load(arrays, shardings)
  assert held.volumes.shape[0] == 22 and len(held) == 21
  indices = np.array([20, 0, 11, 12, 3, 19, 10, 1])
  np.testing.assert_array_equal(np.asarray(held.batch(indices)["volume"]), volumes[indices])
  send, place = memory_store.exchange_plan(indices, held.rows_per_owner, held.ranks)
  hlo = held._gather.lower(held.volumes, send, place).compile().as_text()
  assert "all-to-all" in hlo and "all-gather" not in hlo and "all-reduce" not in hlo
