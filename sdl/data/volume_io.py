"""A user's single volume on disk, in and out: a `.npy` file or a zarr array (v2 or v3,
read and written through tensorstore). Errors name the file, what is wrong and the fix."""
import os
import shutil

import numpy as np
import tensorstore as ts

from sdl.errors import DataError

SUFFIXES = (".npy", ".zarr")


def zarr_driver(path: str) -> str | None:
  """"zarr3" or "zarr" for a zarr array directory, None otherwise."""
  if os.path.isfile(os.path.join(path, "zarr.json")):
    return "zarr3"
  if os.path.isfile(os.path.join(path, ".zarray")):
    return "zarr"
  return None


def read_volume(path: str, channels: int = 1) -> np.ndarray:
  """The volume at `path` as float32 `[D, H, W, channels]`.

  Accepts `[D, H, W]` (one channel) or `[D, H, W, C]`, any integer or floating dtype;
  refuses other shapes, other dtypes (bool, complex, strings, records) and NaN or
  infinite values, each with a `DataError` naming the file."""
  if not os.path.exists(path):
    raise DataError(f"{path}: no such file or directory")
  driver = zarr_driver(path) if os.path.isdir(path) else None
  if driver:
    try:
      array = ts.open({"driver": driver, "kvstore": {"driver": "file", "path": path},
                       "open": True}).result().read().result()
    except ValueError as e:
      raise DataError(f"{path}: cannot read the zarr array ({e})") from None
  elif path.endswith(".npy") and os.path.isfile(path):
    try:
      array = np.load(path, mmap_mode="r", allow_pickle=False)
    except ValueError as e:
      raise DataError(f"{path}: not a readable .npy array ({e}); save it with "
                      "numpy.save") from None
  else:
    raise DataError(f"{path}: expected a .npy file or a zarr array directory (with "
                    "zarr.json or .zarray)")
  if array.dtype.kind not in "iuf":
    raise DataError(f"{path}: dtype {array.dtype} is not a number type; give integer or "
                    "floating-point intensities (e.g. numpy.asarray(v, numpy.float32))")
  if array.ndim == 3:
    array = array[..., None]
  if array.ndim != 4:
    raise DataError(f"{path}: shape {list(array.shape)}; expected [depth, height, width] "
                    f"or [depth, height, width, {channels}] (one volume, channels last)")
  if array.shape[-1] != channels:
    raise DataError(f"{path}: shape {list(array.shape)} has {array.shape[-1]} channels, the "
                    f"model takes {channels}; if the channels come first, move them last "
                    "(numpy.moveaxis(v, 0, -1))")
  volume = np.asarray(array, np.float32)
  bad = ~np.isfinite(volume)
  if bad.any():
    first = np.argwhere(bad)[0][:3].tolist()
    raise DataError(f"{path}: {int(bad.sum())} NaN or infinite values (the first at voxel "
                    f"{first}); fill or mask them before segmenting")
  return volume


def write_labels(path: str, labels: np.ndarray) -> str:
  """`labels` (uint8 `[D, H, W]`) to `path`: `.npy`, or a zarr v3 array for `.zarr`;
  written beside and renamed into place, so a crash leaves no half-written file."""
  if not path.endswith(SUFFIXES):
    raise DataError(f"{path}: the output must end in .npy or .zarr")
  parent = os.path.dirname(os.path.abspath(path))
  os.makedirs(parent, exist_ok=True)
  tmp = os.path.join(parent, f".{os.path.basename(path)}.{os.getpid()}.tmp")
  if path.endswith(".npy"):
    with open(tmp, "wb") as f:
      np.save(f, labels)
    os.replace(tmp, path)
    return path
  store = ts.open({"driver": "zarr3", "kvstore": {"driver": "file", "path": tmp},
                   "metadata": {"shape": list(labels.shape), "data_type": labels.dtype.name,
                                "chunk_grid": {"name": "regular", "configuration": {
                                    "chunk_shape": [min(64, n) for n in labels.shape]}}},
                   "create": True, "delete_existing": True}).result()
  store.write(labels).result()
  if os.path.isdir(path):
    shutil.rmtree(path)
  os.replace(tmp, path)
  return path
