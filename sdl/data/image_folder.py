"""An ImageNet-style folder: `root/<class name>/<image>.{jpg,jpeg,png}`, decoded by tensorstore.

Classes are the sorted subdirectory names (label = index), as in torchvision's ImageFolder.
Images are decoded with tensorstore's `jpeg` / `png` drivers, their shorter side resized
to `resize` (bilinear), centre-cropped to `size` x `size`, and normalised with the ImageNet
channel mean and standard deviation. Grayscale images are repeated to three channels.

A batch is decoded in parallel by a small thread pool, each thread opening and reading one
image at a time. Do not issue several `ts.open` calls on image drivers from one thread and
then wait on them: with tensorstore 0.1.86 that deadlocked within two batches, even
for two files (`tests/test_kfac_compare.py::test_image_folder_survives_many_batched_reads`);
one open in flight per thread never did in 8 threads x 1,500 opens.
"""
import concurrent.futures
import dataclasses
import functools
import os

import numpy as np
import tensorstore as ts

EXTENSIONS = {".jpg": "jpeg", ".jpeg": "jpeg", ".png": "png"}
MEAN = np.array([0.485, 0.456, 0.406], np.float32)
STD = np.array([0.229, 0.224, 0.225], np.float32)


class ImageFolderError(ValueError):
  """A folder or image that cannot be read; the message names it and the fix."""


@dataclasses.dataclass(frozen=True)
class ImageFolder:
  root: str
  classes: tuple[str, ...]
  files: tuple[str, ...]
  labels: np.ndarray  # int32 [n]

  @classmethod
  def scan(cls, root: str) -> "ImageFolder":
    if not os.path.isdir(root):
      raise ImageFolderError(f"{root}: not a directory; data.path must be a folder of class "
                             "subdirectories of images (root/<class>/<image>.jpg)")
    classes = tuple(sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d))))
    if not classes:
      raise ImageFolderError(f"{root}: no class subdirectories (expected root/<class>/*.jpg)")
    files, labels = [], []
    for label, name in enumerate(classes):
      found = sorted(f for f in os.listdir(os.path.join(root, name))
                     if os.path.splitext(f)[1].lower() in EXTENSIONS)
      if not found:
        raise ImageFolderError(f"{os.path.join(root, name)}: no .jpg/.jpeg/.png images in "
                               "this class directory; remove it or add its images")
      files += [os.path.join(root, name, f) for f in found]
      labels += [label] * len(found)
    return cls(root, classes, tuple(files), np.asarray(labels, np.int32))

  def __len__(self) -> int:
    return len(self.files)

  def read(self, indices, size: int = 224, resize: int = 256) -> dict:
    """`{"x": float32 [n, size, size, 3], "y": int32 [n]}` for the images at `indices`."""
    indices = np.asarray(indices)
    prepare = lambda i: center_crop(resize_shorter(decode(self.files[i]), resize), size)
    images = np.stack(list(_pool().map(prepare, indices))).astype(np.float32)
    return {"x": (images / 255.0 - MEAN) / STD, "y": self.labels[indices]}


@functools.cache
def _pool() -> concurrent.futures.ThreadPoolExecutor:
  return concurrent.futures.ThreadPoolExecutor(min(8, os.cpu_count() or 1),
                                               thread_name_prefix="sdl-image-decode")


def decode(path: str) -> np.ndarray:
  """float32 [H, W, 3] pixels in 0..255; one open in flight (see the module docstring)."""
  driver = EXTENSIONS[os.path.splitext(path)[1].lower()]
  spec = {"driver": driver, "kvstore": {"driver": "file", "path": os.path.abspath(path)}}
  try:
    pixels = ts.open(spec).result().read().result()
  except Exception as e:  # noqa: BLE001 (tensorstore raises ValueError and friends)
    raise ImageFolderError(f"{path}: cannot decode this image ({e}); delete or replace "
                           "it") from None
  return _rgb(pixels, path)


def _rgb(pixels: np.ndarray, path: str) -> np.ndarray:
  if pixels.ndim == 2:
    pixels = pixels[..., None]
  if pixels.shape[-1] == 1:
    pixels = np.repeat(pixels, 3, axis=-1)
  if pixels.shape[-1] == 4:
    pixels = pixels[..., :3]
  if pixels.ndim != 3 or pixels.shape[-1] != 3:
    raise ImageFolderError(f"{path}: image of shape {pixels.shape} is not HxW, HxWx1, 3 or 4")
  return pixels.astype(np.float32)


def resize_shorter(image: np.ndarray, side: int) -> np.ndarray:
  """Bilinear resize (half-pixel centres, like `jax.image.resize`) so min(H, W) == side."""
  h, w = image.shape[:2]
  scale = side / min(h, w)
  out_h, out_w = max(side, round(h * scale)), max(side, round(w * scale))

  def axis(n_in, n_out):
    pos = np.clip((np.arange(n_out) + 0.5) * n_in / n_out - 0.5, 0, n_in - 1)
    lo = np.floor(pos).astype(int)
    hi = np.minimum(lo + 1, n_in - 1)
    return lo, hi, (pos - lo).astype(np.float32)

  (y0, y1, fy), (x0, x1, fx) = axis(h, out_h), axis(w, out_w)
  rows = image[y0] * (1 - fy)[:, None, None] + image[y1] * fy[:, None, None]
  return rows[:, x0] * (1 - fx)[None, :, None] + rows[:, x1] * fx[None, :, None]


def center_crop(image: np.ndarray, size: int) -> np.ndarray:
  h, w = image.shape[:2]
  top, left = (h - size) // 2, (w - size) // 2
  return image[top:top + size, left:left + size]
