"""An in-memory dataset distributed over all devices, with exact global shuffling.

The hybrid-parallel CosmoFlow work kept its dataset in a data store spread over the ranks'
memory, so that a dataset larger than one node fits in the sum of the nodes, and
exchanged samples between ranks each step to follow a global permutation. Here the store
is one `jax.Array` `[samples, depth, height, width, channels]` laid out like a batch:
samples in contiguous blocks over the `data` mesh axis, depth over `spatial` (and height
over `spatial_h`). A device holds `1 / devices` of the dataset, and the spatial slab it
holds is exactly the slab of the batch it trains on, so only the data axis communicates.

Each step, owners send the requested samples to the data-parallel rank that trains on
them with one `all_to_all` inside `shard_map`: rank `o` packs, for every rank `d`, the
rows `d` needs from it into a bucket of `m` slots, where `m` is the largest number any
owner sends any rank this step (rounded up to a power of two to bound recompiles; at most
the per-rank batch). Traffic per device is `data_shards * m` sample slabs, against the
`batch` slabs of an all-gather or a masked all-reduce. The plan is computed on the host
from the step's global indices, identically on every process.
"""
import math

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from sdl.data.loader import labels_array
from sdl.data.store import Dataset, aligned_empty


def exchange_plan(indices: np.ndarray, rows_per_owner: int, ranks: int):
  """Bucket layout of one step's `all_to_all`.

  Returns `send` int32 `[ranks (owner), ranks (destination), m]`, the owner-local rows
  each owner sends each destination (unused slots 0), and `place` int32
  `[ranks (destination), batch / ranks]`, where in the received `[ranks * m]` rows each
  sample of the destination's batch slice lies.
  """
  indices = np.asarray(indices)
  per_rank = len(indices) // ranks
  owner, row = np.divmod(indices, rows_per_owner)
  dest = np.arange(len(indices)) // per_rank
  slot = np.zeros(len(indices), np.int64)
  counts = np.zeros((ranks, ranks), np.int64)
  for j in range(len(indices)):  # batch-sized loop on the host: microseconds
    slot[j] = counts[owner[j], dest[j]]
    counts[owner[j], dest[j]] += 1
  m = min(per_rank, 1 << int(math.ceil(math.log2(max(counts.max(), 1)))))
  send = np.zeros((ranks, ranks, m), np.int32)
  send[owner, dest, slot] = row
  place = (owner * m + slot).reshape(ranks, per_rank).astype(np.int32)
  return send, place


def data_ranks(sharding) -> tuple[str | tuple[str, ...] | None, int]:
  """The mesh axis (or axes) a batch's samples are split over (None if unsplit), and the
  number of shards."""
  axis = sharding.spec[0] if len(sharding.spec) else None
  names = () if axis is None else (axis,) if isinstance(axis, str) else tuple(axis)
  return axis, math.prod(sharding.mesh.shape[a] for a in names)


class DistributedStore:
  """All samples resident on the devices; `batch(indices)` gathers a global batch."""

  def __init__(self, volumes: jax.Array, labels: np.ndarray, shardings: dict):
    self.volumes, self.labels, self.shardings = volumes, labels, shardings
    sharding = shardings["volume"]
    self.mesh, self.spec = sharding.mesh, sharding.spec
    self.data_axis, self.ranks = data_ranks(sharding)
    self.rows_per_owner = volumes.shape[0] // self.ranks
    self._gather = jax.jit(self._make_gather(), out_shardings=sharding)

  @classmethod
  def load(cls, dataset, shardings: dict) -> "DistributedStore":
    """Fill the store from a `Dataset` on disk (each process reads only its devices'
    samples and slabs) or from arrays (`volumes`, `labels` attributes)."""
    sharding = shardings["volume"]
    _, ranks = data_ranks(sharding)
    n = len(dataset)
    rows = -(-n // ranks)
    shape = (rows * ranks, *dataset.volumes.shape[1:])
    dtype = dataset.dtype if isinstance(dataset, Dataset) else dataset.volumes.dtype

    def shard(index):
      lo, stop, _ = index[0].indices(shape[0])
      hi = min(stop, n)  # rows past the last sample pad the last owner's block
      out = aligned_empty(sharding.shard_shape(shape), dtype)  # adopted by XLA:CPU
      out[hi - lo:] = 0
      if hi > lo:
        if isinstance(dataset, Dataset):
          dataset.read(slice(lo, hi), *index[1:], out=out[:hi - lo]).result()
        else:
          out[:hi - lo] = dataset.volumes[(slice(lo, hi), *index[1:])]
      return out

    volumes = jax.make_array_from_callback(shape, sharding, shard)
    labels = dataset.labels
    if labels is None:  # label volumes (segmentation): kept on the host, like vectors
      labels = dataset.read_labels(slice(None)).result()
    return cls(volumes, np.asarray(labels), shardings)

  def __len__(self) -> int:
    return len(self.labels)

  def _make_gather(self):
    axis = self.data_axis
    rows_spec = PartitionSpec(axis)

    def local(store, send, place):  # store [rows, d, h, W, C]; send [1, R, m]; place [1, b]
      buf = store[send[0].reshape(-1)]
      if axis is not None:
        buf = jax.lax.all_to_all(buf, axis, 0, 0, tiled=True)  # block o now from owner o
      return buf[place[0]]

    return jax.shard_map(local, mesh=self.mesh, in_specs=(self.spec, rows_spec, rows_spec),
                         out_specs=self.spec)

  def batch(self, indices: np.ndarray) -> dict:
    indices = np.asarray(indices)
    if len(indices) % self.ranks:
      raise ValueError(f"batch of {len(indices)} does not split over {self.ranks} data ranks")
    send, place = exchange_plan(indices, self.rows_per_owner, self.ranks)
    rows = NamedSharding(self.mesh, PartitionSpec(self.data_axis))
    send, place = (jax.make_array_from_callback(a.shape, rows, lambda idx, a=a: a[idx])
                   for a in (send, place))
    return {"volume": self._gather(self.volumes, send, place),
            "label": labels_array(self.labels[indices], self.shardings["label"])}
