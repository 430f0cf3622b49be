"""Sliding windows of channels-last arrays, for convolution lowerings and K-FAC's patch
statistics alike."""
import itertools
from collections.abc import Sequence

import jax.numpy as jnp
from jax import lax


def window_patches(x, window: Sequence[int], strides: Sequence[int]):
  """Valid windows of channels-last `x` `[N, *spatial, C]` (already padded) as
  `[N, *out, prod(window) * C]`: taps in row-major window order, channels last (the
  order of `kernel.reshape(-1, c_out)`)."""
  n, c = x.shape[0], x.shape[-1]
  outs = [(size - k) // s + 1 for size, k, s in zip(x.shape[1:-1], window, strides)]
  taps = [lax.slice(x, (0, *offset, 0),
                    (n, *(t + s * (m - 1) + 1 for t, s, m in zip(offset, strides, outs)), c),
                    (1, *strides, 1))
          for offset in itertools.product(*(range(k) for k in window))]
  return jnp.concatenate(taps, axis=-1) if len(taps) > 1 else taps[0]
