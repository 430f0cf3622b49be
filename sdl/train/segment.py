"""Sliding-window segmentation: class probabilities of a volume of any size from a network
that sees cubes of `window` voxels.

Windows overlap by `stride < window`; the last window along each axis sits flush with the
volume's end, so every voxel is covered without padding the volume past its size (a
volume thinner than the window is padded with zeros, which is the mean of a standardised
input, and cropped back). Each window's probabilities are weighted by a separable tent
that falls to `EDGE_WEIGHT` at the window's faces: near a face the network's receptive
field runs into zero padding, so the window in which a voxel lies deepest dominates it.
"""
from collections.abc import Callable

import numpy as np

EDGE_WEIGHT = 0.1  # relative weight of a window's face voxels (never 0: the volume's own
                   # faces are covered by a window's face alone)


def window_starts(size: int, window: int, stride: int) -> list[int]:
  """Starts of the windows along one axis of `size` voxels: every `stride`, and the last
  flush with the end (one window at 0 when the axis is no longer than the window)."""
  if stride < 1 or stride > window:
    raise ValueError(f"stride {stride} must be in [1, window={window}]")
  if size <= window:
    return [0]
  starts = list(range(0, size - window + 1, stride))
  if starts[-1] != size - window:
    starts.append(size - window)
  return starts


def blend_weights(window: int) -> np.ndarray:
  """`[window] * 3` separable tent weights: 1 at the centre, `EDGE_WEIGHT` at the faces."""
  centre = (window - 1) / 2
  ramp = 1 - (1 - EDGE_WEIGHT) * np.abs(np.arange(window) - centre) / max(centre, 1)
  return (ramp[:, None, None] * ramp[None, :, None] * ramp[None, None, :]).astype(np.float32)


def sliding_window(volume: np.ndarray, predict: Callable[[np.ndarray], np.ndarray],
                   window: int, stride: int, batch: int = 1,
                   progress: Callable[[int, int], None] | None = None) -> np.ndarray:
  """Weighted mean over the windows covering each voxel of `predict`'s output.

  `volume`: `[D, H, W, C]`. `predict`: `[batch, window, window, window, C]` →
  `[batch, window, window, window, K]` (always called with `batch` windows; the last
  call is filled up with zeros, so a jitted `predict` compiles once). Returns
  `[D, H, W, K]` float32. `progress(done, total)` is called after each call.
  """
  shape = volume.shape[:3]
  padded = [max(n, window) for n in shape]
  if padded != list(shape):
    volume = np.pad(volume, [(0, p - n) for p, n in zip(padded, shape)] + [(0, 0)])
  corners = [(d, h, w) for d in window_starts(padded[0], window, stride)
             for h in window_starts(padded[1], window, stride)
             for w in window_starts(padded[2], window, stride)]
  weights = blend_weights(window)
  total = None
  norm = np.zeros(padded, np.float32)
  cube = lambda c: tuple(slice(s, s + window) for s in c)
  calls = -(-len(corners) // batch)
  for call in range(calls):
    group = corners[call * batch:(call + 1) * batch]
    x = np.zeros((batch, window, window, window, volume.shape[-1]), np.float32)
    for i, c in enumerate(group):
      x[i] = volume[cube(c)]
    probs = np.asarray(predict(x), np.float32)
    if total is None:
      total = np.zeros((*padded, probs.shape[-1]), np.float32)
    for i, c in enumerate(group):
      total[cube(c)] += weights[..., None] * probs[i]
      norm[cube(c)] += weights
    if progress is not None:
      progress(call + 1, calls)
  total /= norm[..., None]
  return total[:shape[0], :shape[1], :shape[2]]
