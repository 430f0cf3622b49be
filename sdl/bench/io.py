"""Read throughput of the dataset reader against plain sequential reads of the same bytes.

Five ways to move a dataset's volume bytes from the file system into this process:

- `reader`: `ShardedReader.batch` for every batch of the dataset in order through a
  `Prefetcher`, as training does, including placement on the devices. One reader serves
  every repeat, as one serves a whole training run (its host buffers are reused).
- `reader, through tensorstore`: the same, with the direct chunk reads
  (`store.RawChunks`) switched off, so tensorstore copies each chunk into the same
  page-aligned buffers.
- `reader, checksums not verified` (checksummed datasets): the same direct reads with the
  crc32c check switched off, so the difference is what verifying costs.
- `cat`: `cat` of every chunk file to /dev/null: the bytes cross into a user buffer that
  stays in cache and is never written back to memory.
- `readinto`: one Python thread reading each chunk file, in order, into one preallocated,
  already touched, page-aligned array: a plain sequential read that keeps the bytes.
- `readinto, 16-byte aligned`: the same into an array as numpy allocates it (16 bytes past
  a page boundary). The kernel's copy out of the page cache is much slower into a
  destination not aligned like the source page; this row shows by how much.

Each is timed `repeats` times and the median kept. The reads come from the page cache when
the dataset fits in memory (dropping it needs root); that is the case where per-byte
overhead shows most, since a disk-bound read hides it behind the device.
"""
import copy
import os
import statistics
import subprocess
import time

import jax
import numpy as np

from sdl.data import loader, store


def chunk_files(dataset: store.Dataset) -> list[str]:
  root = os.path.join(dataset.path, "volumes", "c")
  return sorted(os.path.join(d, f) for d, _, files in os.walk(root) for f in files)


def time_reader(reader: loader.ShardedReader, batch_size: int, prefetch: int = 2) -> float:
  """Every whole batch of the dataset through the reader and a prefetcher, as training."""
  batches = len(reader) // batch_size
  prefetcher = loader.Prefetcher(
      lambda b: reader.batch(np.arange(b * batch_size, (b + 1) * batch_size)), depth=prefetch)
  start = time.perf_counter()
  for b in range(batches):
    jax.block_until_ready(prefetcher(b))
  elapsed = time.perf_counter() - start
  prefetcher.close()
  return elapsed


def time_cat(files: list[str]) -> float:
  start = time.perf_counter()
  subprocess.run(["cat", *files], stdout=subprocess.DEVNULL, check=True)
  return time.perf_counter() - start


def time_readinto(files: list[str], out: np.ndarray) -> float:
  sizes = [os.path.getsize(f) for f in files]
  start = time.perf_counter()
  offset = 0
  for f, size in zip(files, sizes):
    with open(f, "rb", buffering=0) as fh:
      fh.readinto(memoryview(out[offset:offset + size]))
    offset += size
  return time.perf_counter() - start


def throughput(dataset: store.Dataset, shardings: dict, batch_size: int,
               repeats: int = 5) -> dict:
  """GB/s (1e9 bytes) of each method, medians over `repeats`, on the same bytes."""
  files = chunk_files(dataset)
  nbytes = sum(os.path.getsize(f) for f in files)
  usable = (len(dataset) // batch_size) * batch_size / len(dataset)
  reader = loader.ShardedReader(dataset, shardings)
  through_ts = copy.copy(dataset)
  through_ts.raw = None
  ts_reader = loader.ShardedReader(through_ts, shardings)
  unverified = None
  if dataset.raw is not None and dataset.raw.checksum:
    unchecked = copy.copy(dataset)
    unchecked.raw = copy.copy(dataset.raw)
    unchecked.raw.verify = False
    unverified = loader.ShardedReader(unchecked, shardings)
  aligned = store.aligned_empty((nbytes,), np.uint8)
  unaligned = store.aligned_empty((nbytes + 16,), np.uint8)[16:]
  for buf in (aligned, unaligned):
    buf[:] = 1  # touched: no page faults inside the timing
  methods = {"reader": lambda: time_reader(reader, batch_size) / usable,
             "reader, through tensorstore": lambda: time_reader(ts_reader, batch_size) / usable,
             **({"reader, checksums not verified":
                 lambda: time_reader(unverified, batch_size) / usable} if unverified else {}),
             "cat": lambda: time_cat(files),
             "readinto": lambda: time_readinto(files, aligned),
             "readinto, 16-byte aligned": lambda: time_readinto(files, unaligned)}
  for fn in methods.values():  # warm the page cache, the code paths and the reader's buffers
    fn()
  times = {k: [] for k in methods}
  for _ in range(repeats):  # interleaved, so drifts hit every method alike
    for k, fn in methods.items():
      times[k].append(fn())
  return {k: nbytes / statistics.median(v) / 1e9 for k, v in times.items()} | {"bytes": nbytes}
