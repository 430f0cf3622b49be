"""Import the MLPerf HPC CosmoFlow data into sdl's on-disk layout (`sdl.data.store`).

Two published forms are understood:

- **Universes** (`cosmoUniverse_2019_05_4parE`): one HDF5 file per simulation with
  `full`, int16 `[512, 512, 512, 4]` particle counts at 4 redshifts, and `unitPar`,
  float32 `[4]`, the cosmological parameters already scaled by the simulation campaign.
  With `crop`, each universe is cut into `(512 / crop)³` cubes in the order of MLPerf's
  `prepare.py` (depth, then height, then width), all sharing the universe's label.
- **Preprocessed numpy pairs**: `<name>.data.npy` (or `_data.npy`), int16
  `[128, 128, 128, 4]`, next to `<name>.label.npy` (or `_label.npy`), float32 `[4]`.

Labels are copied as given. Every input is checked before anything is written: a
missing dataset, a wrong dtype or shape, a truncated file or non-finite labels raise a
`DatasetError` naming the file. The output appears only when complete.
"""
import concurrent.futures
import dataclasses
import os
import re
import time

import numpy as np

from sdl import console
from sdl.data import store

CHANNELS = 4
NPY_DATA = re.compile(r"^(.*)[._]data\.npy$")


@dataclasses.dataclass(frozen=True)
class Source:
  """One input: an HDF5 universe, or a numpy (data, label) pair."""
  path: str
  label_path: str | None  # numpy pairs only
  side: int               # voxels per side of the stored volume

  @property
  def kind(self) -> str:
    return "npy" if self.label_path else "hdf5"


def _h5py():
  try:
    import h5py  # noqa: PLC0415 (optional: only the HDF5 importer needs it)
  except ImportError:
    raise ImportError("importing HDF5 universes needs h5py: pip install 'sdl[mlperf]'") from None
  return h5py


def _check_volume(path: str, what: str, shape, dtype) -> int:
  if len(shape) != 4 or shape[3] != CHANNELS or not shape[0] == shape[1] == shape[2]:
    raise store.DatasetError(f"{path}: {what} has shape {list(shape)}; expected a cube "
                             f"[n, n, n, {CHANNELS}]")
  if np.dtype(dtype) != store.VOLUME_DTYPE:
    raise store.DatasetError(f"{path}: {what} is {np.dtype(dtype)}; expected int16 counts")
  return int(shape[0])


def _check_label(path: str, label: np.ndarray) -> np.ndarray:
  label = np.asarray(label)
  if label.shape != (4,) or not np.isfinite(label).all():
    raise store.DatasetError(f"{path}: label {label.tolist()} is not 4 finite numbers")
  return label.astype(np.float32)


def inspect(path: str) -> Source:
  """Check one input file's structure without reading its volume."""
  if not os.path.isfile(path):
    raise store.DatasetError(f"{path}: no such file")
  match = NPY_DATA.match(os.path.basename(path))
  if match:
    stem = os.path.join(os.path.dirname(path), match.group(1))
    label_path = next((stem + sep + "label.npy" for sep in "._"
                       if os.path.isfile(stem + sep + "label.npy")), None)
    if label_path is None:
      raise store.DatasetError(f"{path}: no {stem}.label.npy or {stem}_label.npy beside it")
    try:
      data = np.load(path, mmap_mode="r")  # reads the header; a truncated body fails here
    except (ValueError, OSError, EOFError) as e:
      raise store.DatasetError(f"{path}: not a readable .npy file ({e})") from None
    side = _check_volume(path, "the array", data.shape, data.dtype)
    try:
      _check_label(label_path, np.load(label_path))
    except (ValueError, OSError, EOFError) as e:
      raise store.DatasetError(f"{label_path}: not a readable .npy file ({e})") from None
    return Source(path, label_path, side)
  h5py = _h5py()
  try:
    with h5py.File(path, "r") as f:
      for key in ("full", "unitPar"):
        if key not in f:
          raise store.DatasetError(f"{path}: no '{key}' dataset (has {sorted(f.keys())})")
      side = _check_volume(path, "'full'", f["full"].shape, f["full"].dtype)
      _check_label(path, f["unitPar"][()])
  except OSError as e:
    raise store.DatasetError(f"{path}: not a readable HDF5 file ({e})") from None
  return Source(path, None, side)


def find_inputs(root: str) -> list[str]:
  """HDF5 files and `*data.npy` files under `root` (a directory or one file), sorted."""
  if os.path.isfile(root):
    return [root]
  found = [os.path.join(d, f) for d, _, files in os.walk(root) for f in files
           if f.endswith((".hdf5", ".h5")) or NPY_DATA.match(f)]
  if not found:
    raise store.DatasetError(f"{root}: no .hdf5/.h5 universes or *.data.npy files found")
  return sorted(found)


def _load(source: Source) -> tuple[np.ndarray, np.ndarray]:
  try:
    if source.kind == "npy":
      return np.load(source.path), _check_label(source.label_path, np.load(source.label_path))
    with _h5py().File(source.path, "r") as f:
      return f["full"][()], _check_label(source.path, f["unitPar"][()])
  except (ValueError, OSError, EOFError) as e:
    raise store.DatasetError(f"{source.path}: reading failed ({e})") from None


def _crops(volume: np.ndarray, crop: int):
  n = volume.shape[0] // crop
  for i in range(n):
    for j in range(n):
      for k in range(n):
        yield volume[i * crop:(i + 1) * crop, j * crop:(j + 1) * crop, k * crop:(k + 1) * crop]


def import_cosmoflow(root: str, out: str, *, crop: int | None = None, workers: int = 4,
                     overwrite: bool = False, progress: bool = True) -> str:
  """Import every universe or numpy pair under `root` into a dataset at `out`."""
  sources = [inspect(p) for p in find_inputs(root)]
  sides = {s.side for s in sources}
  if len(sides) != 1:
    raise store.DatasetError(f"{root}: volumes of different sides {sorted(sides)}; import them "
                             "separately")
  side = sides.pop()
  crop = crop or side
  if side % crop:
    raise store.DatasetError(f"crop={crop} does not divide the volume side {side}")
  per_file = (side // crop) ** 3
  start = time.perf_counter()
  with store.Writer(out, len(sources) * per_file, (crop, crop, crop, CHANNELS),
                    param_names=("omega_m", "sigma_8", "n_s", "H_0"), param_low=(-1,) * 4,
                    param_high=(1,) * 4, overwrite=overwrite,
                    source={"importer": "sdl.data.mlperf", "root": os.path.abspath(root),
                            "files": [s.path for s in sources], "crop": crop,
                            "labels": "unitPar / label.npy as given"}) as writer:
    def one(i_source):
      i, source = i_source
      volume, label = _load(source)
      for c, cube in enumerate(_crops(volume, crop)):
        writer.write(i * per_file + c, np.ascontiguousarray(cube), label)

    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
      for done, _ in enumerate(pool.map(one, enumerate(sources)), 1):
        if progress:
          console.progress(f"importing {root}: {done}/{len(sources)} files "
                           f"({time.perf_counter() - start:.1f} s)",
                           final=done == len(sources))
    return writer.commit()
