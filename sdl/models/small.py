"""Small networks for optimiser studies on the 8x8 digits."""
from collections.abc import Sequence

import flax.linen as nn
import jax.numpy as jnp


class Autoencoder(nn.Module):
  """The deep autoencoder of the K-FAC papers (Hinton & Salakhutdinov 2006; Martens 2010;
  Martens & Grosse 2015: 784-1000-500-250-30, mirrored), scaled to 64 pixels: tanh dense
  layers down to a linear code and back up. Returns pixel logits `[n, 64]`."""
  widths: Sequence[int] = (256, 128, 64, 16)

  @nn.compact
  def __call__(self, x):
    x = x.reshape(x.shape[0], -1)
    pixels = x.shape[-1]
    *hidden, code = self.widths
    for w in hidden:
      x = jnp.tanh(nn.Dense(w)(x))
    x = nn.Dense(code)(x)  # linear code layer, as in the original
    for w in reversed(hidden):
      x = jnp.tanh(nn.Dense(w)(x))
    return nn.Dense(pixels)(x)


class DigitsCNN(nn.Module):
  """conv 3x3 (16) → conv 3x3 stride 2 (32) → dense 64 → 10 logits, ReLU."""

  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Conv(16, (3, 3), padding="SAME")(x))
    x = nn.relu(nn.Conv(32, (3, 3), strides=2, padding="SAME")(x))
    x = nn.relu(nn.Dense(64)(x.reshape(x.shape[0], -1)))
    return nn.Dense(10)(x)


class DigitsBatchNormMLP(nn.Module):
  """dense 64 → BatchNorm → ReLU → 10 logits: the smallest model with model state
  (BatchNorm's running statistics, collection `batch_stats`)."""

  @nn.compact
  def __call__(self, x, *, train: bool = False):
    x = nn.Dense(64)(x.reshape(x.shape[0], -1))
    x = nn.BatchNorm(use_running_average=not train, momentum=0.9)(x)
    return nn.Dense(10)(nn.relu(x))
