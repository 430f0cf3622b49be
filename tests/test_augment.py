"""The cube's 48 symmetries as augmentation: each is the signed permutation it claims, all
48 occur, draws repeat for the same (seed, step), and a sharded batch on 8 fake devices
equals the symmetries applied in numpy."""
import itertools

import jax
import numpy as np
import pytest

from sdl.data import augment, loader
from sdl.parallel import Partitioner, make_mesh
from sdl.parallel.sharding import VOLUME_AXES


def by_coordinates(volume, symmetry):
  """out[a] = volume[b] with b[perm[j]] = a[j], or n - 1 - a[j] where axis j is flipped."""
  n = volume.shape[0]
  perm, flips = symmetry[:3], symmetry[3:]
  out = np.empty_like(volume)
  for a in itertools.product(range(n), repeat=3):
    b = [0, 0, 0]
    for j in range(3):
      b[perm[j]] = n - 1 - a[j] if flips[j] else a[j]
    out[a] = volume[tuple(b)]
  return out


def test_every_symmetry_is_its_signed_permutation_and_all_48_differ():
  volume = np.arange(4 ** 3 * 2).reshape(4, 4, 4, 2)
  seen = set()
  for perm in augment.PERMUTATIONS:
    for flips in itertools.product((0, 1), repeat=3):
      s = np.array([*perm, *flips])
      out = augment.apply(volume, s)
      np.testing.assert_array_equal(out, by_coordinates(volume, s))
      seen.add(out.tobytes())
  assert len(seen) == 48


def test_draws_cover_the_group_and_repeat_per_step():
  a, b = augment.draw(3, 17, 4800), augment.draw(3, 17, 4800)
  np.testing.assert_array_equal(a, b)
  assert not np.array_equal(a[:8], augment.draw(3, 18, 8))
  counts = np.unique(a, axis=0, return_counts=True)[1]
  assert len(counts) == 48 and counts.min() > 50  # 100 expected each


def test_non_cubic_volumes_only_flip():
  volume = np.zeros((2, 3, 4))
  assert augment.apply(volume, [0, 1, 2, 1, 0, 1]).shape == (2, 3, 4)
  with pytest.raises(ValueError, match="not cubic"):
    augment.apply(volume, [1, 0, 2, 0, 0, 0])


def test_sharded_batch_equals_numpy():
  rng = np.random.default_rng(0)
  volumes = rng.integers(0, 50, size=(6, 8, 8, 8, 4)).astype(np.int16)
  labels = rng.normal(size=(6, 4)).astype(np.float32)
  part = Partitioner.create(make_mesh((2, 4), ("data", "spatial")))
  source = loader.ArraySource.of_volumes(
      volumes, labels, {"volume": part.sharding(VOLUME_AXES),
                        "label": part.sharding(("batch", None))})
  indices, symmetries = np.array([1, 2, 4, 5]), augment.draw(0, 5, 4)
  batch = source.batch(indices, symmetries)
  assert batch["volume"].sharding == part.sharding(VOLUME_AXES)
  expect = np.stack([by_coordinates(volumes[i], s) for i, s in zip(indices, symmetries)])
  np.testing.assert_array_equal(jax.device_get(batch["volume"]), expect)
  np.testing.assert_array_equal(jax.device_get(batch["label"]), labels[indices])
  plain = source.batch(indices)  # without symmetries: the samples as stored
  np.testing.assert_array_equal(jax.device_get(plain["volume"]), volumes[indices])
