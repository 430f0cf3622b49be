"""The 48 symmetries of the cube (axis permutations × flips) as augmentation.

The generated universes, like the real ones, are statistically isotropic: rotating or
mirroring a volume leaves its parameters unchanged, so each symmetry is a new sample for
free. A symmetry is a row `[p0, p1, p2, f0, f1, f2]`: output axis `j` is input axis `p_j`,
reversed where `f_j` is 1. They are drawn from `(seed, step)` alone, so a resumed run sees
the same augmented batches as one that never stopped.
"""
import itertools

import numpy as np

PERMUTATIONS = tuple(itertools.permutations(range(3)))


def draw(seed: int, step: int, n: int) -> np.ndarray:
  """`n` symmetries, uniform over the 48, `[n, 6]` int."""
  rng = np.random.default_rng([seed, step, 48])
  perms = np.array(PERMUTATIONS)[rng.integers(len(PERMUTATIONS), size=n)]
  return np.concatenate([perms, rng.integers(2, size=(n, 3))], axis=1)


def apply(volume: np.ndarray, symmetry) -> np.ndarray:
  """`volume` `[D, H, W, ...]` under one symmetry (a view where numpy allows)."""
  perm, flips = tuple(int(p) for p in symmetry[:3]), symmetry[3:]
  if perm != (0, 1, 2) and len(set(volume.shape[:3])) > 1:
    raise ValueError(f"a volume of shape {volume.shape} is not cubic: its axes cannot be "
                     "permuted (augment cubic crops)")
  out = np.transpose(volume, (*perm, *range(3, volume.ndim)))
  flipped = tuple(axis for axis in range(3) if flips[axis])
  return np.flip(out, flipped) if flipped else out
