"""Synthetic 3D segmentation volumes whose classes differ in texture and shape, not in
intensity.

Every voxel's intensity has mean 0 and variance 1 whatever its class, so no threshold of
the intensity, raw or smoothed, recovers the classes (the smoothed input is near 0 inside
both objects); a network must read local texture and shape:

* class 0, background: a smooth Gaussian random field (low-pass white noise, correlation
  length `smooth` voxels), normalised;
* class 1, balls of radius `radius` voxels filled with white noise;
* class 2, rods (cylinders along a random axis, radius `radius / 2`) filled with stripes
  across their axis (`0.8 sin + 0.6 white noise`, period 4 voxels).

Objects are painted in a random order, so later ones cut into earlier ones. A volume is
a function of its seed alone: `volume(seed, size)` gives the same arrays everywhere.
"""
import dataclasses

import numpy as np

CLASS_NAMES = ("background", "balls", "rods")
STRIPE_PERIOD = 4


@dataclasses.dataclass(frozen=True)
class Spec:
  size: int = 32          # voxels per side
  balls: int = 3          # per volume
  rods: int = 2
  radius: float = 6.0     # of balls; rods have half of it
  smooth: float = 2.0     # background correlation length (voxels)


def _smooth_field(rng, size, length):
  noise = rng.standard_normal((size,) * 3)
  k = np.fft.fftfreq(size)
  k2 = k[:, None, None] ** 2 + k[None, :, None] ** 2 + k[None, None, :] ** 2
  field = np.fft.ifftn(np.fft.fftn(noise) * np.exp(-2 * (np.pi * length) ** 2 * k2)).real
  return (field - field.mean()) / field.std()


def volume(seed: int, spec: Spec = Spec()) -> tuple[np.ndarray, np.ndarray]:
  """(intensity float32 `[S, S, S, 1]`, labels uint8 `[S, S, S]`) for `seed`."""
  rng = np.random.default_rng([seed, 17])
  s = spec.size
  image = _smooth_field(rng, s, spec.smooth)
  labels = np.zeros((s,) * 3, np.uint8)
  grid = np.stack(np.meshgrid(*(np.arange(s),) * 3, indexing="ij"), -1).astype(np.float32)
  shapes = [1] * spec.balls + [2] * spec.rods
  rng.shuffle(shapes)
  for kind in shapes:
    center = rng.uniform(0, s, 3)
    if kind == 1:
      inside = np.sum((grid - center) ** 2, -1) <= spec.radius ** 2
      texture = rng.standard_normal((s,) * 3)
    else:
      axis = rng.integers(3)
      across = [a for a in range(3) if a != axis]
      inside = np.sum((grid[..., across] - center[across]) ** 2, -1) <= (spec.radius / 2) ** 2
      phase = rng.uniform(0, 2 * np.pi)
      stripes = np.sin(2 * np.pi * grid[..., axis] / STRIPE_PERIOD + phase)
      texture = np.sqrt(2) * 0.8 * stripes + 0.6 * rng.standard_normal((s,) * 3)
    image = np.where(inside, texture, image)
    labels[inside] = kind
  return image[..., None].astype(np.float32), labels


def dataset(seeds, spec: Spec = Spec()) -> tuple[np.ndarray, np.ndarray]:
  """Stacked volumes of `seeds`: float32 `[n, S, S, S, 1]`, uint8 `[n, S, S, S]`."""
  pairs = [volume(int(seed), spec) for seed in seeds]
  return np.stack([p[0] for p in pairs]), np.stack([p[1] for p in pairs])


def overlap_counts(pred: np.ndarray, truth: np.ndarray, classes: int) -> np.ndarray:
  """`[3, classes]`: per class |P ∩ T|, |P| and |T| (sums over batches give Dice over all)."""
  pred = np.asarray(pred).ravel().astype(np.int64)
  truth = np.asarray(truth).ravel().astype(np.int64)
  count = lambda v: np.bincount(v, minlength=classes)[:classes]
  return np.stack([count(truth[pred == truth]), count(pred), count(truth)]).astype(np.float64)


def dice_of(counts: np.ndarray) -> np.ndarray:
  """Dice per class from `overlap_counts`, 2 |P ∩ T| / (|P| + |T|); 1 where a class is in
  neither."""
  inter, p, t = counts
  return np.where(p + t > 0, 2 * inter / np.maximum(p + t, 1), 1.0)


def dice(pred: np.ndarray, truth: np.ndarray, classes: int) -> np.ndarray:
  """Dice per class over all voxels given."""
  return dice_of(overlap_counts(pred, truth, classes))
