"""Volume datasets on disk: zarr v3 arrays read and written through tensorstore.

A dataset is a directory:

    manifest.json  written last, by an atomic rename of the whole directory: a dataset
                   without it is incomplete and is refused
    volumes/       zarr v3, [sample, depth, height, width, channel] of the manifest's
                   `dtype` (CosmoFlow: int16 x 4 redshifts; the U-Net: float32 x 1); one
                   chunk is one sample's slab of `chunk_depth` depth planes, so a device
                   that holds a depth shard reads whole chunks and nothing else
    labels/        zarr v3, [sample, *label_shape] of `label_dtype`, either
                   - one vector per sample (CosmoFlow: float32 [4], the parameters scaled
                     to [-1, 1]), held in memory once opened, or
                   - a volume per sample (segmentation: uint8 [depth, height, width], a
                     class per voxel), chunked and read like the volumes: a device reads
                     the labels of its own shard only (`Dataset.read_labels`)

Why zarr v3 rather than n5: n5 stores big-endian only, so every read on a little-endian
host would byte-swap, while a zarr v3 chunk with the `bytes` codec is the sample's memory
image (reading is a copy, nothing to decode: `RawChunks` reads such chunks straight into
the caller's page-aligned array, one copy where tensorstore makes two; `experiments.io_bench`
times both); zarr v3 is an open spec that zarr-python and other readers understand; it has
a `crc32c` checksum codec and a `sharding` codec that packs many chunks into one file for
parallel file systems that dislike small files.

Checksums are on by default for the datasets sdl writes: each chunk file ends in the
zarr v3 `crc32c` codec's 4-byte checksum, and `RawChunks` verifies it itself as it reads,
so that a corrupted chunk is a `DatasetError` naming its file. The check is one pass with
the read (`sdl.kernels.checksum`: the CPU's crc instructions on each piece of the file
while it is in cache, copied on to the caller's array in the same loop), so it costs a few
per cent of the unchecked read, where a second pass over the array cost a fifth and
tensorstore's own crc32c path more than half; `experiments.io_bench` times the checked and
unchecked reads side by side (docs/benchmarks.md). Without a C++ compiler the check is a
second pass with the `crc32c` package. A truncated or missing
chunk is an error naming its file either way (reads never fill in missing chunks).
"""
import concurrent.futures
import dataclasses
import json
import os
import shutil
import sys
import threading
from collections.abc import Sequence

import crc32c
import numpy as np
import tensorstore as ts

from sdl.errors import DataError
from sdl.kernels import checksum

FORMAT = "sdl.volumes"
FORMAT_VERSION = 2
# Datasets written before labels and dtypes were general: CosmoFlow's int16 volumes and
# float32 [sample, parameters] labels. They open unchanged.
LEGACY_FORMAT = ("sdl.cosmoflow-volumes", 1)
MANIFEST = "manifest.json"
VOLUME_DTYPE, LABEL_DTYPE = np.dtype(np.int16), np.dtype(np.float32)  # CosmoFlow's
MAX_CHUNK_DEPTH = 16  # 2 MiB chunks at 128² x 4 int16: few files, slabs of 8 shards aligned


class DatasetError(DataError, ValueError):
  """A dataset that is missing, incomplete or corrupt; the message names the file."""


@dataclasses.dataclass(frozen=True)
class Manifest:
  """What `manifest.json` says about a dataset."""
  num_samples: int
  volume_shape: tuple[int, int, int, int]  # depth, height, width, channels
  chunk_depth: int
  checksum: bool
  param_names: tuple[str, ...]   # regression labels: one name per entry (else ())
  param_low: tuple[float, ...]   # labels are (θ - low) / (high - low) * 2 - 1
  param_high: tuple[float, ...]
  source: dict                   # generator and seeds, or the imported files
  dtype: str = VOLUME_DTYPE.name
  label_shape: tuple[int, ...] = ()  # per sample; () means (len(param_names),)
  label_dtype: str = LABEL_DTYPE.name
  class_names: tuple[str, ...] = ()  # segmentation labels: the name of each class

  def __post_init__(self):
    if not self.label_shape:
      object.__setattr__(self, "label_shape", (len(self.param_names),))

  @property
  def volume_labels(self) -> bool:
    """Labels are a volume per sample (read by region), not a vector (held in memory)."""
    return len(self.label_shape) >= 3 and self.label_shape[:3] == self.volume_shape[:3]

  def to_json(self) -> dict:
    return {"format": FORMAT, "version": FORMAT_VERSION, **dataclasses.asdict(self)}

  @classmethod
  def from_json(cls, blob: dict, where: str) -> "Manifest":
    found = (blob.get("format"), blob.get("version"))
    if found not in ((FORMAT, FORMAT_VERSION), LEGACY_FORMAT):
      raise DatasetError(f"{where}: format {found[0]!r} version {found[1]!r} is not "
                         f"{FORMAT!r} version {FORMAT_VERSION}; re-create the dataset")
    for key in ("dtype", "label_dtype"):
      if not _numeric(blob.get(key)):
        raise DatasetError(f"{where}: {key} {blob.get(key)!r} is not a numeric dtype; "
                           "re-create the dataset")
    try:
      return cls(int(blob["num_samples"]), tuple(int(s) for s in blob["volume_shape"]),
                 int(blob["chunk_depth"]), bool(blob["checksum"]), tuple(blob["param_names"]),
                 tuple(blob["param_low"]), tuple(blob["param_high"]), dict(blob["source"]),
                 blob["dtype"], tuple(int(s) for s in blob.get("label_shape", ())),
                 blob["label_dtype"], tuple(blob.get("class_names", ())))
    except (KeyError, TypeError, ValueError) as e:
      raise DatasetError(f"{where}: field {e} is missing or malformed; re-create the "
                         "dataset") from None


def _numeric(name) -> bool:
  try:
    return np.dtype(name).kind in "iuf"
  except TypeError:
    return False


def default_chunk_depth(depth: int) -> int:
  """Largest divisor of `depth` not above MAX_CHUNK_DEPTH."""
  return max(c for c in range(1, min(depth, MAX_CHUNK_DEPTH) + 1) if depth % c == 0)


def _zarr_spec(path: str, shape, dtype, chunks, checksum: bool) -> dict:
  codecs = [{"name": "bytes", "configuration": {"endian": "little"}}]
  if checksum:
    codecs.append({"name": "crc32c"})
  return {"driver": "zarr3", "kvstore": {"driver": "file", "path": path},
          "metadata": {"shape": list(shape), "data_type": np.dtype(dtype).name,
                       "chunk_grid": {"name": "regular",
                                      "configuration": {"chunk_shape": list(chunks)}},
                       "codecs": codecs, "fill_value": 0},
          "create": True, "delete_existing": True}


class Writer:
  """Writes a dataset into `<path>.partial` and renames it to `path` on `commit()`.

  Use as a context manager: an exception inside removes the partial directory, so a
  crashed or interrupted write never leaves something that opens as a dataset.
  `write()` may be called from several threads (tensorstore writes release the GIL).
  """

  def __init__(self, path: str, num_samples: int, volume_shape: Sequence[int], *,
               source: dict, param_names: Sequence[str] = (), param_low: Sequence[float] = (),
               param_high: Sequence[float] = (), dtype=VOLUME_DTYPE,
               label_shape: Sequence[int] = (), label_dtype=LABEL_DTYPE,
               class_names: Sequence[str] = (), chunk_depth: int | None = None,
               checksum: bool = True, overwrite: bool = False):
    """`label_shape` per sample: default `(len(param_names),)`; `volume_shape[:3]` (and
    maybe more) for a label volume, such as a class per voxel."""
    self.path, self.partial = os.path.abspath(path), os.path.abspath(path) + ".partial"
    if os.path.exists(self.path) and not overwrite:
      raise DatasetError(f"{self.path} already exists; delete it or pass overwrite")
    shape = tuple(int(s) for s in volume_shape)
    if len(shape) != 4:
      raise DatasetError(f"volume_shape {shape} must be (depth, height, width, channels)")
    chunk_depth = chunk_depth or default_chunk_depth(shape[0])
    if shape[0] % chunk_depth:
      raise DatasetError(f"chunk_depth={chunk_depth} does not divide the depth {shape[0]}")
    for what, value in (("dtype", dtype), ("label_dtype", label_dtype)):
      if not _numeric(value):
        raise DatasetError(f"{what} {value!r}: give an integer or floating-point dtype")
    self.dtype, self.label_dtype = np.dtype(dtype), np.dtype(label_dtype)
    self.manifest = Manifest(num_samples, shape, chunk_depth, checksum, tuple(param_names),
                             tuple(map(float, param_low)), tuple(map(float, param_high)), source,
                             self.dtype.name, tuple(int(s) for s in label_shape),
                             self.label_dtype.name, tuple(class_names))
    shutil.rmtree(self.partial, ignore_errors=True)
    os.makedirs(self.partial)
    self._volumes = ts.open(_zarr_spec(os.path.join(self.partial, "volumes"),
                                       (num_samples, *shape), self.dtype,
                                       (1, chunk_depth, *shape[1:]), checksum)).result()
    label_shape = self.manifest.label_shape
    if self.manifest.volume_labels:  # chunked like the volumes, written sample by sample
      self._label_store = ts.open(_zarr_spec(
          os.path.join(self.partial, "labels"), (num_samples, *label_shape), self.label_dtype,
          (1, chunk_depth, *label_shape[1:]), checksum)).result()
      self._labels = None
    else:
      self._labels = np.zeros((num_samples, *label_shape), self.label_dtype)
    self._written = np.zeros(num_samples, bool)
    self._lock = threading.Lock()

  def write(self, index: int, volume: np.ndarray, label: np.ndarray) -> None:
    m = self.manifest
    label = np.asarray(label)
    if np.can_cast(label.dtype, self.label_dtype, "same_kind"):  # float64 parameters, say
      label = label.astype(self.label_dtype, copy=False)
    for what, array, shape, dtype in (("volume", volume, m.volume_shape, self.dtype),
                                      ("label", label, m.label_shape, self.label_dtype)):
      if array.shape != tuple(shape) or array.dtype != dtype:
        raise DatasetError(f"sample {index}: {what} {array.dtype}{list(array.shape)}, expected "
                           f"{dtype}{list(shape)}")
    self._volumes[index].write(volume).result()
    if self._labels is None:
      self._label_store[index].write(label).result()
    with self._lock:
      if self._labels is not None:
        self._labels[index] = label
      self._written[index] = True

  def commit(self) -> str:
    missing = np.flatnonzero(~self._written)
    if missing.size:
      raise DatasetError(f"{self.partial}: samples {missing[:8].tolist()}... were never "
                         "written; nothing committed")
    if self._labels is not None:
      labels = ts.open(_zarr_spec(os.path.join(self.partial, "labels"), self._labels.shape,
                                  self.label_dtype, self._labels.shape,
                                  self.manifest.checksum)).result()
      labels.write(self._labels).result()
    with open(os.path.join(self.partial, MANIFEST), "w") as f:
      json.dump(self.manifest.to_json(), f, indent=1)
    if os.path.exists(self.path):
      shutil.rmtree(self.path)
    os.rename(self.partial, self.path)
    return self.path

  def __enter__(self) -> "Writer":
    return self

  def __exit__(self, exc_type, *_):
    if exc_type is not None:
      shutil.rmtree(self.partial, ignore_errors=True)


# Host arrays that reads land in start on a page boundary: the kernel copies out of the page
# cache several times faster into a destination aligned like the page (`io_bench`'s two
# `readinto` rows), and XLA:CPU adopts an array aligned to 64 bytes or more as a device
# buffer without copying it. numpy's own large arrays start 16 bytes past a page.
HOST_ALIGNMENT = 4096


def aligned_in(raw: np.ndarray, shape: Sequence[int], dtype) -> np.ndarray:
  """A C-contiguous `shape` array inside the uint8 array `raw`, on a `HOST_ALIGNMENT` boundary
  (`raw` needs `HOST_ALIGNMENT` spare bytes)."""
  dtype = np.dtype(dtype)
  nbytes = int(np.prod(shape)) * dtype.itemsize
  start = -raw.ctypes.data % HOST_ALIGNMENT
  return raw[start:start + nbytes].view(dtype).reshape(shape)


def aligned_empty(shape: Sequence[int], dtype) -> np.ndarray:
  """An uninitialised C-contiguous array starting on a `HOST_ALIGNMENT` boundary."""
  nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
  return aligned_in(np.empty(nbytes + HOST_ALIGNMENT, np.uint8), shape, dtype)


RAW_CODECS = [{"name": "bytes", "configuration": {"endian": "little"}}]
CRC32C = {"name": "crc32c"}  # zarr v3: a little-endian crc32c of the chunk, appended
CRC_BYTES = 4
# Chunk reads of every dataset in this process (threads start on first use). More threads
# than cores: a read from a disk or a network file system mostly waits.
_CHUNK_READS = concurrent.futures.ThreadPoolExecutor(max(4, os.cpu_count() or 1),
                                                     thread_name_prefix="sdl-chunks")


class RawChunks:
  """Reads whole depth planes of a zarr v3 array straight from its chunk files.

  With the little-endian `bytes` codec alone, a chunk file is the chunk's C-order memory
  image, and a chunk spans whole planes (`[1, chunk_depth, H, W, C]`), so a read of a
  sample's depth range is one `preadv` per chunk into the caller's array: one copy out of
  the page cache. Tensorstore makes two (file -> its buffer -> the array): 3.9 against
  6.0 GB/s for the reader on the 2-core VM (`experiments.io_bench`, docs/benchmarks.md).
  Used only where that layout is certain: metadata as `Writer` writes it, a little-endian
  host, reads of whole height, width and channel extents. Everything else (height-split
  meshes) reads through tensorstore. With the `crc32c` codec each chunk is checked as it
  is read: the whole chunk goes through `sdl.kernels.checksum.read_verified`, which
  checksums every byte and copies the ones the caller asked for (a depth shard thinner
  than a chunk gets its part) into the caller's array.
  """

  def __init__(self, path: str, shape: tuple[int, ...], chunk_depth: int, dtype: np.dtype,
               checksum: bool = False):
    self.path, self.shape, self.chunk_depth, self.dtype = path, shape, chunk_depth, dtype
    self.checksum = checksum  # the files carry a crc32c trailer
    self.verify = checksum  # check it on every read (`experiments.io_bench` turns it off)
    self.plane_bytes = int(np.prod(shape[2:])) * dtype.itemsize
    self.chunk_bytes = chunk_depth * self.plane_bytes
    self.file_bytes = self.chunk_bytes + (CRC_BYTES if checksum else 0)

  @classmethod
  def open(cls, path: str) -> "RawChunks | None":
    """The raw reader of the zarr v3 array at `path`, or None where its layout differs."""
    try:
      with open(os.path.join(path, "zarr.json")) as f:
        meta = json.load(f)
      chunks = meta["chunk_grid"]["configuration"]["chunk_shape"]
      shape = tuple(meta["shape"])
      codecs = meta["codecs"]
      if np.dtype(meta["data_type"]).itemsize == 1 and codecs[:1] == [{"name": "bytes"}]:
        codecs = [*RAW_CODECS, *codecs[1:]]  # single bytes have no endianness to record
      checksum = codecs == [*RAW_CODECS, CRC32C]
      plain = ((codecs == RAW_CODECS or checksum)
               and meta["chunk_grid"]["name"] == "regular"
               and meta.get("chunk_key_encoding") in ({"name": "default"}, {
                   "name": "default", "configuration": {"separator": "/"}})
               and len(shape) >= 2 and chunks[0] == 1 and list(chunks[2:]) == list(shape[2:]))
      if not plain or sys.byteorder != "little":
        return None
      return cls(path, shape, int(chunks[1]), np.dtype(meta["data_type"]), checksum)
    except (OSError, KeyError, TypeError, ValueError):
      return None  # tensorstore will name what is wrong

  def planes(self, region: tuple) -> tuple[int, int] | None:
    """`(start, stop)` of the depth planes `region` selects, if it selects whole planes."""
    region = tuple(region) + (slice(None),) * (len(self.shape) - 1 - len(region))
    if not all(isinstance(r, slice) for r in region):
      return None
    ranges = [r.indices(n) for r, n in zip(region, self.shape[1:])]
    (d0, d1, step), rest = ranges[0], ranges[1:]
    whole = all(r == (0, n, 1) for r, n in zip(rest, self.shape[2:]))
    return (d0, d1) if whole and step == 1 and d1 > d0 else None

  def read(self, samples: np.ndarray, depth: tuple[int, int], out: np.ndarray) -> "_AllOf":
    """Start reading `volumes[samples, d0:d1]` (`depth = (d0, d1)`) into `out`
    (C-contiguous, that shape)."""
    d0, d1 = depth
    flat = out.reshape(len(samples), -1).view(np.uint8)
    jobs = []
    for row, sample in enumerate(samples):
      for c in range(d0 // self.chunk_depth, -(-d1 // self.chunk_depth)):
        lo, hi = max(d0, c * self.chunk_depth), min(d1, (c + 1) * self.chunk_depth)
        dest = flat[row, (lo - d0) * self.plane_bytes:(hi - d0) * self.plane_bytes]
        offset = (lo - c * self.chunk_depth) * self.plane_bytes
        name = os.path.join(self.path, "c", str(int(sample)), str(c), *["0"] * (out.ndim - 2))
        jobs.append(_CHUNK_READS.submit(self._read_chunk, name, offset, dest))
    return _AllOf(jobs)

  def _read_chunk(self, name: str, offset: int, dest: np.ndarray) -> None:
    try:
      fd = os.open(name, os.O_RDONLY)
    except FileNotFoundError:
      raise DatasetError(f'chunk file "{name}" is missing') from None
    except OSError as e:
      raise DatasetError(f'chunk file "{name}": {e.strerror}') from None
    try:
      size = os.fstat(fd).st_size
      if size != self.file_bytes:
        raise DatasetError(f'chunk file "{name}" has {size} bytes, a chunk has '
                           f"{self.file_bytes}: truncated or not this array's")
      if not self.verify:
        _read_exactly(fd, name, memoryview(dest), offset)
        return
      if checksum.available():  # one pass: read, check and copy (sdl/kernels/copycrc.cc)
        got = checksum.read_verified(fd, self.chunk_bytes, dest.reshape(-1), offset)
        if got is None:
          raise DatasetError(f'chunk file "{name}" ended early')
        crc, stored = got
      else:  # no C++ compiler: read, then check with the crc32c package
        whole = offset == 0 and dest.nbytes == self.chunk_bytes
        chunk = memoryview(dest if whole else np.empty(self.chunk_bytes, np.uint8)).cast("B")
        trailer = bytearray(CRC_BYTES)
        _read_exactly(fd, name, chunk, 0, memoryview(trailer))
        crc, stored = crc32c.crc32c(chunk), int.from_bytes(trailer, "little")
        if not whole:
          np.copyto(dest, np.frombuffer(chunk, np.uint8)[offset:offset + dest.nbytes])
      if crc != stored:
        raise DatasetError(f'chunk file "{name}" is corrupt: its crc32c checksum does not '
                           "match its contents; restore the file or write the dataset again")
    except OSError as e:
      raise DatasetError(f'chunk file "{name}": {e.strerror}') from None
    finally:
      os.close(fd)


def _read_exactly(fd: int, name: str, view: memoryview, offset: int,
                  trailer: memoryview | None = None) -> None:
  """Fill `view` (then `trailer`, the bytes after it) from file offset `offset`."""
  buffers = [view.cast("B")] + ([trailer] if trailer is not None else [])
  total, done = sum(len(b) for b in buffers), 0
  while done < total:
    rest, skip = [], done
    for b in buffers:
      if skip >= len(b):
        skip -= len(b)
        continue
      rest.append(b[skip:])
      skip = 0
    n = os.preadv(fd, rest, offset + done)
    if n == 0:
      raise DatasetError(f'chunk file "{name}" ended early')
    done += n


@dataclasses.dataclass
class _AllOf:
  """The futures of one read's chunks, as one: `result()` waits for all, raises the first."""
  futures: list

  def result(self) -> None:
    errors = [f.exception() for f in self.futures]  # waits for every chunk, failed or not
    first = next((e for e in errors if e is not None), None)
    if first is not None:
      raise first


class Dataset:
  """An opened dataset. Vector labels are held in memory (`labels`); volumes, and labels
  that are volumes, are read on demand.

  `read(samples, depth, height)` reads a sub-volume of several samples asynchronously,
  `read_labels` the same region of their label volumes; `bytes_read` counts what this
  process asked of the disk (for tests of partitioned I/O).
  """

  def __init__(self, path: str):
    self.path = os.path.abspath(path)
    where = os.path.join(self.path, MANIFEST)
    if not os.path.exists(where):
      if os.path.exists(self.path + ".partial"):
        raise DatasetError(f"{where} is missing and {self.path}.partial exists: the dataset "
                           "was never finished; write it again")
      raise DatasetError(f"{where} is missing: {self.path} is not an sdl dataset (write one "
                         "with `python -m experiments.make_dataset`)")
    try:
      with open(where) as f:
        self.manifest = Manifest.from_json(json.load(f), where)
    except json.JSONDecodeError as e:
      raise DatasetError(f"{where}: not valid JSON ({e}); re-create the dataset") from None
    m = self.manifest
    self.dtype, self.label_dtype = np.dtype(m.dtype), np.dtype(m.label_dtype)
    self.volumes = self._open("volumes", (m.num_samples, *m.volume_shape), self.dtype)
    self.raw = RawChunks.open(os.path.join(self.path, "volumes"))
    labels = self._open("labels", (m.num_samples, *m.label_shape), self.label_dtype)
    self.label_volumes = self.raw_labels = self.labels = None
    if m.volume_labels:
      self.label_volumes = labels
      self.raw_labels = RawChunks.open(os.path.join(self.path, "labels"))
    else:
      self.labels = self._result(labels.read(), "reading labels")
      bad = ~np.isfinite(self.labels.reshape(len(self.labels), -1)).all(1)
      if bad.any():
        raise DatasetError(f"{self.path}/labels: non-finite labels at samples "
                           f"{np.flatnonzero(bad)[:8].tolist()}")
    self.bytes_read = 0
    self._lock = threading.Lock()

  def _open(self, name: str, shape: tuple, dtype: np.dtype) -> ts.TensorStore:
    where = os.path.join(self.path, name, "zarr.json")
    try:
      store = ts.open({"driver": "zarr3", "kvstore": {"driver": "file",
                                                      "path": os.path.join(self.path, name)},
                       "fill_missing_data_reads": False, "open": True}).result()
    except ValueError as e:
      raise DatasetError(f"{where}: cannot open ({e}); re-create the dataset") from None
    if tuple(store.shape) != shape or store.dtype.numpy_dtype != dtype:
      raise DatasetError(f"{where}: array is {store.dtype.numpy_dtype}{list(store.shape)} but "
                         f"{MANIFEST} says {dtype}{list(shape)}; re-create the dataset")
    return store

  def _result(self, future, what: str) -> np.ndarray:
    try:
      return future.result()
    except ValueError as e:  # tensorstore names the chunk file in its message
      raise DatasetError(f"{self.path}: {what}: {e}. The file named is corrupt, truncated "
                         "or missing; re-create or re-import the dataset") from None

  def __len__(self) -> int:
    return self.manifest.num_samples

  @property
  def volume_shape(self) -> tuple[int, int, int, int]:
    return self.manifest.volume_shape

  def read(self, samples: Sequence[int] | slice, *region: slice,
           batch: ts.Batch | None = None, out: np.ndarray | None = None) -> "PendingRead":
    """Start reading `volumes[samples, *region]`; `.result()` gives the array (`dtype`).

    `region` slices depth, height, width, channels (missing ones: everything). With `out`
    (a writable C-contiguous array of the read's shape and dtype) the chunks are copied
    straight into it, and `.result()` returns it: one copy fewer than a read that
    allocates, and no page faults when `out` is reused or freshly recycled memory.
    """
    return self._read("volumes", self.volumes, self.raw, samples, region, batch, out)

  def read_labels(self, samples: Sequence[int] | slice, *region: slice,
                  batch: ts.Batch | None = None, out: np.ndarray | None = None) -> "PendingRead":
    """`read` for label volumes: `labels[samples, *region]` (depth, height, width, ...)."""
    if self.label_volumes is None:
      raise ValueError(f"{self.path}: labels are one vector per sample, held in `labels`")
    return self._read("labels", self.label_volumes, self.raw_labels, samples, region, batch,
                      out)

  def _read(self, name, array, raw, samples, region, batch, out) -> "PendingRead":
    dtype = array.dtype.numpy_dtype
    samples = np.asarray(samples) if not isinstance(samples, slice) else samples
    view = array[(samples, *region)]
    with self._lock:
      self.bytes_read += int(np.prod(view.shape)) * dtype.itemsize
    where = "".join(f", {r.start or 0}:{r.stop if r.stop is not None else ''}" for r in region)
    what = f"reading {name}[{_describe(samples)}{where}]"
    whole = raw is not None and (isinstance(samples, slice) or samples.ndim == 1)
    planes = raw.planes(region) if whole else None
    if out is None:
      if planes is None:
        return PendingRead(self, view.read(batch=batch), what)
      out = aligned_empty(view.shape, dtype)
    if out.shape != tuple(view.shape) or out.dtype != dtype or not out.flags.c_contiguous:
      raise ValueError(f"{what}: `out` must be a C-contiguous {dtype}{list(view.shape)} "
                       f"array, not {out.dtype}{list(out.shape)}")
    if planes is not None:
      indices = (np.arange(*samples.indices(len(self))) if isinstance(samples, slice)
                 else samples % len(self))  # in range: tensorstore checked the view
      return PendingRead(self, raw.read(indices, planes, out), what, out)
    target = ts.array(out, copy=False, write=True)
    return PendingRead(self, target.write(view, batch=batch), what, out)


@dataclasses.dataclass
class PendingRead:
  dataset: Dataset
  future: object
  what: str
  out: np.ndarray | None = None

  def result(self) -> np.ndarray:
    read = self.dataset._result(self.future, self.what)
    return read if self.out is None else self.out


def _describe(samples) -> str:
  if isinstance(samples, slice):
    return f"{samples.start or 0}:{samples.stop if samples.stop is not None else ''}"
  return str(samples.tolist()[:8]) + ("..." if samples.size > 8 else "")


def open_dataset(path: str) -> Dataset:
  return Dataset(path)
