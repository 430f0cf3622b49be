"""The 8x8 handwritten digits that scikit-learn ships (1,797 images, UCI optdigits test set).

Real data that needs no download: the file is inside the scikit-learn wheel, which is the
optional extra `sdl[digits]` (and in the test extra).
"""
import numpy as np


def load(seed: int = 0, test_fraction: float = 0.2):
  """`(train_x, train_y, test_x, test_y)`: images `[n, 8, 8, 1]` float32 in [0, 1], labels
  int32 0-9, split by a permutation fixed by `seed`."""
  try:
    from sklearn.datasets import load_digits
  except ImportError as e:
    raise ImportError("the digits experiments read the 8x8 digits shipped with scikit-learn: "
                      "pip install 'sdl[digits]' (or scikit-learn)") from e
  digits = load_digits()
  x = (digits.images / 16.0).astype(np.float32)[..., None]
  y = digits.target.astype(np.int32)
  order = np.random.default_rng(seed).permutation(len(x))
  n_test = int(round(test_fraction * len(x)))
  test, train = order[:n_test], order[n_test:]
  return x[train], y[train], x[test], y[test]
