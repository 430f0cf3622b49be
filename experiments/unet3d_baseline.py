"""The intensity baseline of the U-Net demo: the best global thresholds of the smoothed input.

    python -m experiments.unet3d_baseline [--config=experiments/configs/unet3d.py:demo] \
        [--sigmas=0,1,2,4]

For each Gaussian smoothing width sigma (voxels; 0 is the raw input), two thresholds and an
order of the 3 classes over the 3 intensity bins are tuned on the training volumes for
the best mean Dice, then scored on the held-out volumes the demo evaluates on. The U-Net's
mean Dice on the same volumes is in docs/benchmarks.md.
"""
import itertools

import numpy as np
from absl import app, flags
from ml_collections import config_flags

from sdl.data import segmentation

_CONFIG = config_flags.DEFINE_config_file("config", "experiments/configs/unet3d.py:demo",
                                          "The U-Net config whose volumes to use.")
_SIGMAS = flags.DEFINE_list("sigmas", ["0", "1", "2", "4"], "Smoothing widths in voxels.")


def smooth(volumes: np.ndarray, sigma: float) -> np.ndarray:
  """Periodic Gaussian smoothing of `[n, S, S, S]` volumes (FFT)."""
  if sigma == 0:
    return volumes
  k = np.fft.fftfreq(volumes.shape[1])
  k2 = k[:, None, None] ** 2 + k[None, :, None] ** 2 + k[None, None, :] ** 2
  kernel = np.exp(-2 * (np.pi * sigma) ** 2 * k2)
  return np.fft.ifftn(np.fft.fftn(volumes, axes=(1, 2, 3)) * kernel, axes=(1, 2, 3)).real


def tune(x: np.ndarray, labels: np.ndarray, classes: int = 3):
  """(mean Dice, thresholds, class order) best on (x, labels)."""
  cuts = np.quantile(x, np.linspace(0.02, 0.98, 25))
  best = (-1.0, None, None)
  for lo, hi in itertools.combinations(cuts, 2):
    bins = np.digitize(x, [lo, hi])
    for order in itertools.permutations(range(classes)):
      score = segmentation.dice(np.asarray(order)[bins], labels, classes).mean()
      best = max(best, (score, (lo, hi), order), key=lambda b: b[0])
  return best


def main(argv):
  del argv
  from experiments.trainers.unet3d import volumes  # noqa: PLC0415
  config = _CONFIG.value
  (train_x, train_y), (val_x, val_y) = volumes(config, "train"), volumes(config, "val")
  # a subsample of training voxels keeps the grid search to seconds
  pick = np.random.default_rng(0).choice(train_y.size, min(train_y.size, 400_000), False)
  print("| smoothing sigma | thresholds (tuned on train) | class order | val Dice per class "
        "| val mean Dice |\n|---|---|---|---|---|")
  for sigma in (float(s) for s in _SIGMAS.value):
    xs = smooth(train_x[..., 0], sigma).ravel()[pick]
    _, cuts, order = tune(xs, train_y.ravel()[pick])
    pred = np.asarray(order)[np.digitize(smooth(val_x[..., 0], sigma), cuts)]
    dice = segmentation.dice(pred, val_y, 3)
    print(f"| {sigma:g} | {cuts[0]:.3f}, {cuts[1]:.3f} | {order} | "
          f"{', '.join(f'{d:.3f}' for d in dice)} | {dice.mean():.3f} |", flush=True)


if __name__ == "__main__":
  app.run(main)
