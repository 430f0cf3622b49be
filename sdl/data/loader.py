"""Global batches straight into their shardings, and a prefetcher that reads ahead.

A *source* turns the global sample indices of one step into the step's batch, a dict of
`jax.Array`s (`volume` int16 `[batch, depth, height, width, 4]`, `label` float32
`[batch, 4]`) laid out with the training step's input shardings. Three sources exist:

- `ArraySource`: a dataset held whole in every process's memory (generated data).
- `ShardedReader`: a dataset on disk. Each process reads only the samples of its devices'
  batch slices and, of each, only the depth (and height) slab its devices hold under the
  mesh: spatially partitioned I/O, as in the hybrid-parallel CosmoFlow work. Reads of a
  step run concurrently through tensorstore.
- `sdl.data.memory_store.DistributedStore`: the dataset spread over all devices' memory.

`Prefetcher` runs a source ahead of the training loop on background threads.
"""
import collections
import concurrent.futures
import sys
import threading
import time
from collections.abc import Callable

import jax
import numpy as np
import tensorstore as ts

from sdl.data import augment, store


def _refs(owners: list, i: int) -> int:
  return sys.getrefcount(owners[i])


class HostBuffers:
  """Page-aligned host arrays (`store.aligned_in`), handed out again once nothing outside
  the pool uses them.

  A buffer's memory belongs to one uint8 array (its *owner*); every view of it, a device
  array that adopted it without copying (XLA:CPU), or a host-to-device copy still in flight
  (other backends) holds a reference to that owner. An owner whose only references are the
  pool's own is idle and is reused, so reuse never overwrites data still in use. (XLA lets
  go of an adopted buffer shortly after its array dies, not at once: a few more buffers
  than the batches in flight.) Reused memory is already mapped; fresh memory page-faults
  on first touch, inside the read.
  """

  def __init__(self, max_idle: int = 8):
    self.max_idle = max_idle
    self._owners: list[np.ndarray] = []
    self._lock = threading.Lock()
    probe = [np.empty(1, np.uint8)]
    self._idle_refs = _refs(probe, 0)  # what "referenced by the pool only" reads as here

  def __call__(self, shape: tuple[int, ...], dtype) -> np.ndarray:
    """An uninitialised C-contiguous `shape` array on a `store.HOST_ALIGNMENT` boundary."""
    size = int(np.prod(shape)) * np.dtype(dtype).itemsize + store.HOST_ALIGNMENT
    with self._lock:
      idle = [i for i in range(len(self._owners)) if _refs(self._owners, i) == self._idle_refs]
      reuse = next((i for i in idle if self._owners[i].nbytes == size), None)
      if reuse is None:
        for i in reversed(idle[:max(0, len(idle) - self.max_idle)]):
          del self._owners[i]  # freed: a reader whose shapes change does not hoard memory
        self._owners.append(np.empty(size, np.uint8))
        reuse = len(self._owners) - 1
      return store.aligned_in(self._owners[reuse], shape, dtype)


def labels_array(labels: np.ndarray, sharding) -> jax.Array:
  """`labels` (host, `[batch, ...]`) as a global array; each process fills its own shards."""
  return jax.make_array_from_callback(labels.shape, sharding, lambda idx: labels[idx])


class ArraySource:
  """Batches from named in-memory arrays (`sdl.data.source.BatchSource`), each `[n, ...]`
  and laid out by `shardings[name]`; each process materialises only its addressable
  shards, gathering just their samples."""

  def __init__(self, arrays: dict[str, np.ndarray], shardings: dict):
    lengths = {name: len(a) for name, a in arrays.items()}
    if len(set(lengths.values())) != 1:
      raise ValueError(f"ArraySource: arrays of different lengths {lengths}")
    self.arrays, self.shardings = arrays, shardings

  @classmethod
  def of_volumes(cls, volumes: np.ndarray, labels: np.ndarray, shardings: dict) -> "ArraySource":
    """CosmoFlow's layout: `volume` `[n, D, H, W, C]` and `label` `[n, 4]`."""
    return cls({"volume": volumes, "label": labels}, shardings)

  def __len__(self) -> int:
    return len(next(iter(self.arrays.values())))

  def batch(self, indices: np.ndarray, symmetries: np.ndarray | None = None) -> dict:
    """The samples at `indices`; with `symmetries` (`sdl.data.augment`, a row per sample)
    every array with three spatial axes after the batch axis (a volume `[n, D, H, W, ...]`,
    not a label `[n, 4]`) is transformed, sample by sample."""
    arrays = self.arrays
    if symmetries is not None:
      arrays = {name: (np.stack([augment.apply(array[i], s) for i, s in zip(indices, symmetries)])
                       if array.ndim >= 4 else array[indices])
                for name, array in arrays.items()}
      indices = np.arange(len(indices))

    def gather(array, sharding):
      shape = (len(indices), *array.shape[1:])
      return jax.make_array_from_callback(
          shape, sharding, lambda idx: array[(indices[idx[0]], *idx[1:])])
    return {name: gather(array, self.shardings[name]) for name, array in arrays.items()}


def _key(index: tuple[slice, ...]) -> tuple:
  return tuple((s.start, s.stop, s.step) for s in index)


class ShardedReader:
  """Batches read from an on-disk dataset: each process reads only what its devices hold.

  Devices that hold the same shard (replicas over a mesh axis the volume is not split
  along) share one read.
  """

  def __init__(self, dataset: store.Dataset, shardings: dict):
    self.dataset, self.shardings = dataset, shardings
    self.buffers = HostBuffers()

  def __len__(self) -> int:
    return len(self.dataset)

  def batch(self, indices: np.ndarray) -> dict:
    indices = np.asarray(indices)
    ds = self.dataset
    with ts.Batch() as batch:  # issue every read of this process at once
      volume = self._start(ds.read, indices, self.shardings["volume"],
                           (len(indices), *ds.volume_shape), ds.dtype, batch)
      label = (self._start(ds.read_labels, indices, self.shardings["label"],
                           (len(indices), *ds.manifest.label_shape), ds.label_dtype, batch)
               if ds.manifest.volume_labels else None)
    return {"volume": volume(),
            "label": label() if label else labels_array(ds.labels[indices],
                                                         self.shardings["label"])}

  def _start(self, read, indices, sharding, shape, dtype, batch):
    """Start reading the shards of this process's devices (one read per distinct shard,
    straight into buffers the devices can adopt); returns the call that makes the
    global array once they are in."""
    per_device = sharding.addressable_devices_indices_map(shape)
    reads = {}
    for index in per_device.values():
      if _key(index) not in reads:
        out = self.buffers(sharding.shard_shape(shape), dtype)
        reads[_key(index)] = read(indices[index[0]], *index[1:], batch=batch, out=out)

    def finish():
      arrays = {key: r.result() for key, r in reads.items()}
      shards = [jax.device_put(arrays[_key(index)], device)
                for device, index in per_device.items()]
      return jax.make_array_from_single_device_arrays(shape, sharding, shards)
    return finish


class Prefetcher:
  """`prefetcher(step)` returns `produce(step)`, computed `depth` steps ahead on threads.

  One worker by default: the sources parallelise their own reads, and a second worker
  producing the next batch at the same time only competes with them for the cores (it made
  the reader slower on the 2-core VM).

  Steps are expected in increasing order; asking for any other step (a resume, an eval
  interleaved) restarts the read-ahead from there. `wait_seconds` totals the time callers
  waited for a batch that was not ready: the exposed input time.
  """

  def __init__(self, produce: Callable[[int], dict], depth: int = 2, workers: int = 1):
    self.produce, self.depth = produce, depth
    self._pool = concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix="prefetch")
    self._pending: collections.OrderedDict[int, concurrent.futures.Future] = (
        collections.OrderedDict())
    self.wait_seconds, self.batches = 0.0, 0

  def __call__(self, step: int) -> dict:
    # Read-ahead older than `step`, or all of it after a jump, will not be asked for.
    keep = step in self._pending
    stale = [s for s in self._pending if s < step or not keep]
    for s in stale:
      self._pending.pop(s).cancel()
    for ahead in range(step, step + self.depth + 1):
      if ahead not in self._pending:
        self._pending[ahead] = self._pool.submit(self.produce, ahead)
    start = time.perf_counter()
    out = self._pending.pop(step).result()
    self.wait_seconds += time.perf_counter() - start
    self.batches += 1
    return out

  def close(self) -> None:
    for future in self._pending.values():
      future.cancel()
    self._pool.shutdown(wait=True)
