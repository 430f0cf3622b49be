"""The on-disk dataset: bit-exact round trips under every mesh, clear errors, the importer."""
import json
import os
import shutil

import h5py
import jax
import numpy as np
import pytest

from sdl.data import loader, memory_store, mlperf, store
from sdl.kernels import checksum
from sdl.parallel import VOLUME_AXES, Partitioner, make_mesh

MESHES = [((1, 8), ("data", "spatial")), ((2, 4), ("data", "spatial")),
          ((4, 2), ("data", "spatial")), ((8, 1), ("data", "spatial")),
          ((2, 2, 2), ("data", "spatial", "spatial_h"))]
SHAPE = (16, 16, 8, 4)


def random_volumes(n, shape=SHAPE, seed=0):
  rng = np.random.default_rng(seed)
  v = rng.integers(-2**15, 2**15, (n, *shape), dtype=np.int16)
  v[0, 0, 0, 0] = [-2**15, 2**15 - 1, 0, -1]  # the extremes survive
  return v, rng.normal(size=(n, 4)).astype(np.float32)


def write(path, volumes, labels, **kw):
  with store.Writer(str(path), len(volumes), volumes.shape[1:], param_names="abcd",
                    param_low=[0] * 4, param_high=[1] * 4, source={"test": 1}, **kw) as w:
    for i, (v, l) in enumerate(zip(volumes, labels)):
      w.write(i, v, l)
    return w.commit()


def shardings_for(shape, axes):
  part = Partitioner.create(make_mesh(shape, axes))
  return {"volume": part.sharding(VOLUME_AXES), "label": part.sharding(("batch", None))}


@pytest.fixture(scope="module")
def written(tmp_path_factory):
  volumes, labels = random_volumes(12)
  return store.open_dataset(write(tmp_path_factory.mktemp("ds") / "set", volumes, labels,
                                  chunk_depth=4)), volumes, labels


@pytest.mark.parametrize("mesh_shape,axes", MESHES)
def test_round_trip_is_bit_exact_on_every_mesh(written, mesh_shape, axes):
  dataset, volumes, labels = written
  shardings = shardings_for(mesh_shape, axes)
  indices = np.array([11, 3, 0, 7, 5, 9, 2, 10])
  before = dataset.bytes_read
  batch = loader.ShardedReader(dataset, shardings).batch(indices)
  np.testing.assert_array_equal(np.asarray(batch["volume"]), volumes[indices])
  np.testing.assert_array_equal(np.asarray(batch["label"]), labels[indices])
  assert batch["volume"].sharding == shardings["volume"]
  # Every device read only its own slab: together exactly one copy of the batch.
  assert dataset.bytes_read - before == volumes[indices].nbytes
  for shard in batch["volume"].addressable_shards:
    np.testing.assert_array_equal(np.asarray(shard.data), volumes[indices][shard.index])


@pytest.mark.parametrize("samples,region", [
    (slice(None), ()),                                   # everything
    (np.array([11, 3, 3, 0]), (slice(4, 12),)),          # whole chunks, repeats, unsorted
    (np.array([5, 1]), (slice(3, 13),)),                 # partial first and last chunks
    (slice(2, 5), (slice(6, 7), slice(None), slice(0, 8))),  # one plane
])
def test_raw_chunk_reads_equal_tensorstore(written, samples, region):
  dataset, volumes, _ = written
  assert dataset.raw is not None  # plain little-endian chunks: the direct path is taken
  want = dataset.volumes[(samples, *region)].read().result()  # tensorstore's own read
  np.testing.assert_array_equal(want, volumes[(samples, *region)])
  np.testing.assert_array_equal(dataset.read(samples, *region).result(), want)
  out = store.aligned_empty(want.shape, np.int16)
  assert out.ctypes.data % store.HOST_ALIGNMENT == 0
  assert dataset.read(samples, *region, out=out).result() is out
  np.testing.assert_array_equal(out, want)


def test_reads_of_part_planes_go_through_tensorstore(written):
  dataset, volumes, _ = written
  assert dataset.raw.planes((slice(0, 8), slice(0, 8))) is None  # half the height
  assert dataset.raw.planes((slice(0, 8, 2),)) is None            # strided depth
  out = np.full((3, 16, 8, 8, 4), 7, np.int16)
  dataset.read([0, 4, 9], slice(None), slice(8, 16), out=out).result()
  np.testing.assert_array_equal(out, volumes[[0, 4, 9], :, 8:16])
  with pytest.raises(ValueError, match=r"`out` must be a C-contiguous int16\[3, 16, 8, 8, 4\]"):
    dataset.read([0, 4, 9], slice(None), slice(0, 8), out=out[..., :2])


def test_manifest_and_chunking(written):
  dataset, volumes, _ = written
  m = dataset.manifest
  assert (m.num_samples, m.volume_shape, m.chunk_depth) == (12, SHAPE, 4)
  chunks = [f for _, _, files in os.walk(os.path.join(dataset.path, "volumes", "c"))
            for f in files]
  assert len(chunks) == 12 * SHAPE[0] // 4  # one file per sample depth slab
  with open(os.path.join(dataset.path, "volumes/c/0/0/0/0/0"), "rb") as f:
    chunk = f.read()
  # raw little-endian, then the zarr crc32c codec's little-endian checksum, nothing else
  assert len(chunk) == volumes[0, :4].nbytes + store.CRC_BYTES
  assert chunk[:-4] == volumes[0, :4].tobytes()
  assert int.from_bytes(chunk[-4:], "little") == crc32c_reference(chunk[:-4])
  assert store.default_chunk_depth(128) == 16 and store.default_chunk_depth(24) == 12


def test_interrupted_write_leaves_nothing(tmp_path):
  volumes, labels = random_volumes(3)
  with pytest.raises(RuntimeError):
    with store.Writer(str(tmp_path / "ds"), 3, SHAPE, param_names="abcd", param_low=[0] * 4,
                      param_high=[1] * 4, source={}) as w:
      w.write(0, volumes[0], labels[0])
      raise RuntimeError("killed")
  assert not os.listdir(tmp_path)
  with pytest.raises(store.DatasetError, match=r"samples \[1, 2\].* never written"):
    with store.Writer(str(tmp_path / "ds"), 3, SHAPE, param_names="abcd", param_low=[0] * 4,
                      param_high=[1] * 4, source={}) as w:
      w.write(0, volumes[0], labels[0])
      w.commit()
  with pytest.raises(store.DatasetError, match=r"volume float32\[16, 16, 8, 4\], expected int16"):
    with store.Writer(str(tmp_path / "ds"), 3, SHAPE, param_names="abcd", param_low=[0] * 4,
                      param_high=[1] * 4, source={}) as w:
      w.write(0, volumes[0].astype(np.float32), labels[0])
  assert not os.listdir(tmp_path)


@pytest.fixture
def small(tmp_path):
  volumes, labels = random_volumes(3)
  return write(tmp_path / "ds", volumes, labels, chunk_depth=8)


def read_all(path):
  dataset = store.open_dataset(path)
  return dataset.read(slice(None)).result()


def test_missing_manifest_names_the_file(small, tmp_path):
  os.remove(os.path.join(small, "manifest.json"))
  with pytest.raises(store.DatasetError, match=r"ds/manifest.json is missing.*not an sdl dataset"):
    store.open_dataset(small)
  os.rename(small, small + ".partial")
  with pytest.raises(store.DatasetError, match=r"partial exists: the dataset was never finished"):
    store.open_dataset(small)


def test_bad_manifest_names_the_file_and_field(small):
  where = os.path.join(small, "manifest.json")
  blob = json.load(open(where))
  del blob["chunk_depth"]
  json.dump(blob, open(where, "w"))
  with pytest.raises(store.DatasetError, match=r"manifest.json: field 'chunk_depth' is missing"):
    store.open_dataset(small)
  open(where, "w").write("{")
  with pytest.raises(store.DatasetError, match=r"manifest.json: not valid JSON"):
    store.open_dataset(small)


@pytest.mark.parametrize("field,value,message", [
    ("dtype", "int32", r"volumes/zarr.json: array is int16\[3, 16, 16, 8, 4\] but "
                       r"manifest.json says int32\[3, 16, 16, 8, 4\]"),
    ("dtype", "complex64", r"manifest.json: dtype 'complex64' is not a numeric dtype"),
    ("label_dtype", "U8", r"manifest.json: label_dtype 'U8' is not a numeric dtype"),
    ("volume_shape", [16, 16, 16, 4],
     r"volumes/zarr.json: array is int16\[3, 16, 16, 8, 4\] but manifest.json says "
     r"int16\[3, 16, 16, 16, 4\]"),
])
def test_wrong_dtype_or_shape_names_the_file(small, field, value, message):
  where = os.path.join(small, "manifest.json")
  blob = json.load(open(where))
  blob[field] = value
  json.dump(blob, open(where, "w"))
  with pytest.raises(store.DatasetError, match=message):
    store.open_dataset(small)


def test_array_of_wrong_dtype_names_its_metadata(small):
  where = os.path.join(small, "volumes", "zarr.json")
  meta = json.load(open(where))
  meta["data_type"] = "int32"
  json.dump(meta, open(where, "w"))
  with pytest.raises(store.DatasetError, match=r"volumes/zarr.json: array is int32"):
    store.open_dataset(small)


def test_truncated_or_missing_chunk_names_the_file(small):
  chunk = os.path.join(small, "volumes", "c", "1", "1", "0", "0", "0")
  with open(chunk, "r+b") as f:
    f.truncate(100)
  with pytest.raises(store.DatasetError, match=r'"[^"]*ds/volumes/c/1/1/0/0/0".*re-create'):
    read_all(small)
  os.remove(chunk)
  with pytest.raises(store.DatasetError, match=r"ds/volumes/c/1/1/0/0/0.* is missing"):
    read_all(small)


def crc32c_reference(data: bytes) -> int:
  """CRC-32C (Castagnoli, reflected 0x82F63B78), bit by bit: the independent reference."""
  crc = 0xFFFFFFFF
  for byte in data:
    crc ^= byte
    for _ in range(8):
      crc = (crc >> 1) ^ (0x82F63B78 if crc & 1 else 0)
  return crc ^ 0xFFFFFFFF


@pytest.mark.parametrize("one_pass", [True, False], ids=["one-pass kernel", "crc32c package"])
@pytest.mark.parametrize("damage", ["flipped bit", "random bytes of the same size"])
def test_a_corrupted_chunk_is_an_error_naming_its_file(tmp_path, damage, one_pass,
                                                       monkeypatch):
  assert checksum.available()  # the machine has a C++ compiler: both paths are tested
  if not one_pass:
    monkeypatch.setattr(checksum, "available", lambda: False)
  volumes, labels = random_volumes(2)
  path = write(tmp_path / "ds", volumes, labels, chunk_depth=8)  # checksummed by default
  dataset = store.open_dataset(path)
  assert dataset.raw is not None and dataset.raw.checksum and dataset.raw.verify
  np.testing.assert_array_equal(read_all(path), volumes)
  chunk = os.path.join(path, "volumes", "c", "1", "0", "0", "0", "0")
  with open(chunk, "rb") as f:
    data = bytearray(f.read())
  if damage == "flipped bit":
    data[1000] ^= 0x10
  else:
    data = np.random.default_rng(1).integers(0, 256, len(data), dtype=np.uint8).tobytes()
  with open(chunk, "wb") as f:
    f.write(bytes(data))
  with pytest.raises(store.DatasetError, match=r'chunk file "[^"]*volumes/c/1/0/0/0/0" is '
                                               r"corrupt: its crc32c checksum does not match"):
    read_all(path)
  with pytest.raises(store.DatasetError, match=r'chunk file "[^"]*volumes/c/1/0/0/0/0" is '
                                               r"corrupt"):  # a read of part of that chunk
    store.open_dataset(path).read([1], slice(2, 5)).result()
  through_ts = store.open_dataset(path)
  through_ts.raw = None  # tensorstore checks the same codec
  with pytest.raises(store.DatasetError, match=r"volumes/c/1/0/0/0/0\": Digest mismatch"):
    through_ts.read(slice(None)).result()


def test_unchecksummed_datasets_read_directly_too(tmp_path):
  volumes, labels = random_volumes(3)
  path = write(tmp_path / "ds", volumes, labels, chunk_depth=4, checksum=False)
  dataset = store.open_dataset(path)
  assert dataset.raw is not None and not dataset.raw.checksum
  np.testing.assert_array_equal(dataset.read([2, 0], slice(3, 13)).result(),
                                volumes[[2, 0], 3:13])


# --- MLPerf importer --------------------------------------------------------------------

def mlperf_split(x, size):
  """MLPerf HPC's prepare.py split: np.split over depth, then height, then width."""
  n = x.shape[0] // size
  return [c for a in np.split(x, n, 0) for b in np.split(a, n, 1) for c in np.split(b, n, 2)]


def write_universe(path, seed, side=16, **override):
  rng = np.random.default_rng(seed)
  full = rng.integers(0, 500, (side, side, side, 4), dtype=np.int16)
  unit = rng.uniform(-1, 1, 4).astype(np.float32)
  with h5py.File(path, "w") as f:
    f["full"] = override.get("full", full)
    if override.get("unitPar", True) is not None:
      f["unitPar"] = override.get("unitPar", unit)
    f["namePar"] = np.array([b"Omega_m", b"sigma_8", b"N_spec", b"H_0"])
  return full, unit


def test_import_hdf5_universes_in_mlperf_crop_order(tmp_path):
  src = tmp_path / "universes"
  src.mkdir()
  made = [write_universe(src / f"univ_{i}.hdf5", i) for i in range(2)]
  path = mlperf.import_cosmoflow(str(src), str(tmp_path / "out"), crop=8, progress=False)
  dataset = store.open_dataset(path)
  want = np.stack([c for full, _ in made for c in mlperf_split(full, 8)])
  np.testing.assert_array_equal(dataset.read(slice(None)).result(), want)
  np.testing.assert_array_equal(dataset.labels, np.repeat([u for _, u in made], 8, axis=0))
  assert dataset.manifest.source["crop"] == 8 and len(dataset.manifest.source["files"]) == 2


def test_import_numpy_pairs(tmp_path):
  src = tmp_path / "npy"
  src.mkdir()
  rng = np.random.default_rng(1)
  data = rng.integers(0, 99, (3, 8, 8, 8, 4), dtype=np.int16)
  label = rng.normal(size=(3, 4)).astype(np.float32)
  for i in range(3):
    np.save(src / f"univ_{i:03d}.data.npy", data[i])
    np.save(src / f"univ_{i:03d}.label.npy", label[i])
  dataset = store.open_dataset(mlperf.import_cosmoflow(str(src), str(tmp_path / "out"),
                                                       progress=False))
  np.testing.assert_array_equal(dataset.read(slice(None)).result(), data)
  np.testing.assert_array_equal(dataset.labels, label)


@pytest.mark.parametrize("case,message", [
    ("no_unitpar", r"bad.hdf5: no 'unitPar' dataset"),
    ("float_full", r"bad.hdf5: 'full' is float32; expected int16"),
    ("not_cube", r"bad.hdf5: 'full' has shape \[16, 8, 16, 4\]; expected a cube"),
    ("nan_label", r"bad.hdf5: label .* is not 4 finite numbers"),
    ("truncated_h5", r"bad.hdf5: not a readable HDF5 file"),
    ("truncated_npy", r"bad.data.npy: not a readable .npy file"),
    ("no_label_npy", r"bad.data.npy: no .*bad.label.npy or .*bad_label.npy beside it"),
])
def test_malformed_inputs_name_the_file_and_leave_nothing(tmp_path, case, message):
  src = tmp_path / "src"
  src.mkdir()
  write_universe(src / "good.hdf5", 0)
  full = np.zeros((16, 16, 16, 4), np.int16)
  if case == "no_unitpar":
    write_universe(src / "bad.hdf5", 1, unitPar=None)
  elif case == "float_full":
    write_universe(src / "bad.hdf5", 1, full=full.astype(np.float32))
  elif case == "not_cube":
    write_universe(src / "bad.hdf5", 1, full=full[:, :8])
  elif case == "nan_label":
    write_universe(src / "bad.hdf5", 1, unitPar=np.array([0, np.nan, 0, 0], np.float32))
  elif case == "truncated_h5":
    write_universe(src / "bad.hdf5", 1)
    os.truncate(src / "bad.hdf5", 2000)
  else:
    for f in os.listdir(src):
      os.remove(src / f)
    np.save(src / "bad.data.npy", full)
    if case == "truncated_npy":
      np.save(src / "bad.label.npy", np.zeros(4, np.float32))
      os.truncate(src / "bad.data.npy", 5000)
  with pytest.raises(store.DatasetError, match=message):
    mlperf.import_cosmoflow(str(src), str(tmp_path / "out"), crop=8, progress=False)
  assert not os.path.exists(tmp_path / "out") and not os.path.exists(tmp_path / "out.partial")


# --- label volumes and other dtypes (segmentation: float32 volumes, a uint8 class per voxel)

SEG_SHAPE = (16, 8, 8, 1)


@pytest.fixture(scope="module")
def segmentation_set(tmp_path_factory):
  rng = np.random.default_rng(5)
  volumes = rng.normal(size=(6, *SEG_SHAPE)).astype(np.float32)
  labels = rng.integers(0, 3, (6, *SEG_SHAPE[:3])).astype(np.uint8)
  path = tmp_path_factory.mktemp("seg") / "set"
  with store.Writer(str(path), 6, SEG_SHAPE, dtype=np.float32, label_shape=SEG_SHAPE[:3],
                    label_dtype=np.uint8, class_names=("a", "b", "c"), source={"test": 2},
                    chunk_depth=4) as w:
    for i in range(6):
      w.write(i, volumes[i], labels[i])
    w.commit()
  return store.open_dataset(str(path)), volumes, labels


@pytest.mark.parametrize("mesh_shape,axes", MESHES)
def test_label_volumes_are_read_by_shard_like_the_volumes(segmentation_set, mesh_shape, axes):
  dataset, volumes, labels = segmentation_set
  assert dataset.manifest.volume_labels and dataset.labels is None
  assert dataset.raw is not None and dataset.raw_labels is not None  # direct chunk reads
  part = Partitioner.create(make_mesh(mesh_shape, axes))
  shardings = {"volume": part.sharding(VOLUME_AXES),
               "label": part.sharding(("batch", "depth", "height", None))}
  indices = np.array([5, 1, 0, 3, 2, 4, 1, 0])
  before = dataset.bytes_read
  batch = loader.ShardedReader(dataset, shardings).batch(indices)
  assert batch["volume"].dtype == np.float32 and batch["label"].dtype == np.uint8
  np.testing.assert_array_equal(np.asarray(batch["volume"]), volumes[indices])
  np.testing.assert_array_equal(np.asarray(batch["label"]), labels[indices])
  assert batch["label"].sharding == shardings["label"]
  # each distinct shard read once: one copy of the batch's volumes and labels together
  assert dataset.bytes_read - before == volumes[indices].nbytes + labels[indices].nbytes
  assert dataset.manifest.class_names == ("a", "b", "c")


def test_memory_store_holds_label_volumes(segmentation_set):
  dataset, volumes, labels = segmentation_set
  part = Partitioner.create(make_mesh((2, 2), ("data", "spatial"), devices=jax.devices()[:4]))
  shardings = {"volume": part.sharding(VOLUME_AXES),
               "label": part.sharding(("batch", "depth", None, None))}
  indices = np.array([4, 0, 5, 2])
  batch = memory_store.DistributedStore.load(dataset, shardings).batch(indices)
  np.testing.assert_array_equal(np.asarray(batch["volume"]), volumes[indices])
  np.testing.assert_array_equal(np.asarray(batch["label"]), labels[indices])


def test_a_corrupted_label_chunk_names_its_file(segmentation_set, tmp_path):
  dataset, _, _ = segmentation_set
  copy = tmp_path / "copy"
  shutil.copytree(dataset.path, copy)
  chunk = copy / "labels" / "c" / "3" / "1" / "0" / "0"
  data = bytearray(chunk.read_bytes())
  data[10] ^= 0xFF
  chunk.write_bytes(bytes(data))
  with pytest.raises(store.DatasetError, match=f'chunk file "{chunk}" is corrupt'):
    store.open_dataset(str(copy)).read_labels([3]).result()


@pytest.mark.parametrize("what,volume,label,message", [
    ("label shape", np.zeros(SEG_SHAPE, np.float32), np.zeros((16, 8, 4), np.uint8),
     r"sample 0: label uint8\[16, 8, 4\], expected uint8\[16, 8, 8\]"),
    ("label dtype", np.zeros(SEG_SHAPE, np.float32), np.zeros(SEG_SHAPE[:3], np.float32),
     r"sample 0: label float32\[16, 8, 8\], expected uint8\[16, 8, 8\]"),
    ("volume dtype", np.zeros(SEG_SHAPE, np.float64), np.zeros(SEG_SHAPE[:3], np.uint8),
     r"sample 0: volume float64\[16, 8, 8, 1\], expected float32\[16, 8, 8, 1\]"),
])
def test_writer_refuses_samples_of_another_shape_or_dtype(tmp_path, what, volume, label,
                                                          message):
  with pytest.raises(store.DatasetError, match=message):
    with store.Writer(str(tmp_path / "w"), 1, SEG_SHAPE, dtype=np.float32,
                      label_shape=SEG_SHAPE[:3], label_dtype=np.uint8, source={}) as w:
      w.write(0, volume, label)
  assert not os.listdir(tmp_path)  # nothing left behind
  with pytest.raises(store.DatasetError, match="dtype 'c8': give an integer or floating"):
    store.Writer(str(tmp_path / "w"), 1, SEG_SHAPE, dtype="c8", source={})


def test_datasets_of_the_first_format_still_open(small):
  """CosmoFlow datasets written before labels and dtypes were general."""
  where = os.path.join(small, "manifest.json")
  blob = json.load(open(where))
  want = store.open_dataset(small).labels
  blob.update(format="sdl.cosmoflow-volumes", version=1)
  for key in ("label_shape", "class_names"):
    del blob[key]
  json.dump(blob, open(where, "w"))
  legacy = store.open_dataset(small)
  assert legacy.manifest.label_shape == (4,) and not legacy.manifest.volume_labels
  np.testing.assert_array_equal(legacy.labels, want)
