"""Speaker diarization from MFCC frames: who speaks when, for up to S speakers.

Both models read the same input, a *grid* of K windows of C frames each, cut from one
recording: `windows_prev` windows before the current one, the current window, and
`windows_ahead` lookahead windows (the windows a streaming model may see), and give a
speaker-activity logit for every (window, output frame, speaker). Windows beyond the
recording's ends are zeros and masked (`window_mask`).

- `AxialDiarizer` (new): each window's frames are encoded by a 1D CNN on their own
  (subsampling time by the product of `strides`); the windows' vectors form a 2D grid of
  window × time; each block attends along time within each window, then along the window
  axis at each time position (axial attention, Ho et al. 2019), then an MLP. Positions are
  learned: the time position in a window, and the window's offset from the current one.
- `SAEEND` (the baseline, Fujita et al., ASRU 2019): the same frames as one sequence,
  `subsample` frames stacked and projected, then a transformer encoder (post-norm, no
  positional encoding, as EEND).

Features are normalised per grid (mean and variance over its valid frames), so a grid's
outputs depend on nothing outside it and streaming equals whole-file inference.
Shapes: features `[batch, K, C, features]`, window_mask `[batch, K]` (bool), logits
`[batch, K, C // subsample, speakers]`.
"""
import flax.linen as nn
import jax.numpy as jnp
from jax import lax
import numpy as np


def normalise(features, window_mask):
  """Mean and variance normalisation per feature over each grid's valid frames."""
  w = window_mask[:, :, None, None].astype(features.dtype)
  count = jnp.maximum(w.sum(axis=1, keepdims=True) * features.shape[2], 1.0)  # [batch,1,1,1]
  mean = (features * w).sum(axis=(1, 2), keepdims=True) / count
  var = (jnp.square(features - mean) * w).sum(axis=(1, 2), keepdims=True) / count
  return (features - mean) * lax.rsqrt(var + 1e-5) * w


class MLP(nn.Module):
  width: int
  hidden: int
  dropout: float = 0.0

  @nn.compact
  def __call__(self, x, train: bool):
    x = nn.gelu(nn.Dense(self.hidden)(x))
    x = nn.Dropout(self.dropout, deterministic=not train)(x)
    return nn.Dense(self.width)(x)


class WindowEncoder(nn.Module):
  """A 1D CNN over each window's frames: [..., C, F] -> [..., C // prod(strides), width]."""
  width: int
  kernel: int = 5
  strides: tuple[int, ...] = (2, 2)

  @nn.compact
  def __call__(self, x):
    lead, (frames, features) = x.shape[:-2], x.shape[-2:]
    x = x.reshape(-1, frames, features)
    for stride in self.strides:
      x = nn.Conv(self.width, (self.kernel,), strides=(stride,), padding="SAME")(x)
      x = nn.LayerNorm()(nn.gelu(x))
    return x.reshape(*lead, *x.shape[-2:])


class AxialBlock(nn.Module):
  """Pre-norm attention along time (within a window), then along windows, then an MLP:
  [batch, K, T, width] -> the same."""
  width: int
  heads: int
  mlp_ratio: int = 4
  dropout: float = 0.0

  @nn.compact
  def __call__(self, x, window_mask, train: bool):
    attend = lambda name: nn.MultiHeadDotProductAttention(
        self.heads, dropout_rate=self.dropout, deterministic=not train, name=name)
    h = nn.LayerNorm()(x)
    x = x + attend("time")(h, h)
    h = nn.LayerNorm()(x).swapaxes(1, 2)  # [batch, T, K, width]
    mask = window_mask[:, None, None, None, :]  # keys: the valid windows
    x = x + attend("windows")(h, h, mask=mask).swapaxes(1, 2)
    return x + MLP(self.width, self.mlp_ratio * self.width, self.dropout)(nn.LayerNorm()(x),
                                                                          train)


class AxialDiarizer(nn.Module):
  speakers: int = 2
  width: int = 128
  depth: int = 2
  heads: int = 4
  mlp_ratio: int = 4
  kernel: int = 5
  strides: tuple[int, ...] = (2, 2)
  max_prev: int = 8   # window offsets with a learned embedding: -max_prev .. max_ahead
  max_ahead: int = 4
  dropout: float = 0.0

  @property
  def subsample(self) -> int:
    return int(np.prod(self.strides))

  @nn.compact
  def __call__(self, features, window_mask, windows_prev: int, train: bool = False):
    _, windows, frames, _ = features.shape
    if not 0 <= windows_prev <= self.max_prev or windows - 1 - windows_prev > self.max_ahead:
      raise ValueError(f"grid of {windows} windows with {windows_prev} before the current "
                       f"one: the model knows offsets -{self.max_prev}..+{self.max_ahead}")
    x = WindowEncoder(self.width, self.kernel, self.strides)(normalise(features, window_mask))
    steps = x.shape[2]
    time_pos = self.param("time_position", nn.initializers.normal(0.02), (steps, self.width))
    offsets = self.param("window_offset", nn.initializers.normal(0.02),
                         (self.max_prev + 1 + self.max_ahead, self.width))
    first = self.max_prev - windows_prev
    x = x + time_pos[None, None] + offsets[first:first + windows][None, :, None]
    for _ in range(self.depth):
      x = AxialBlock(self.width, self.heads, self.mlp_ratio, self.dropout)(x, window_mask, train)
    return nn.Dense(self.speakers)(nn.LayerNorm()(x))


class EncoderLayer(nn.Module):
  """A post-norm transformer encoder layer (EEND's)."""
  width: int
  heads: int
  hidden: int
  dropout: float = 0.0

  @nn.compact
  def __call__(self, x, mask, train: bool):
    h = nn.MultiHeadDotProductAttention(self.heads, dropout_rate=self.dropout,
                                        deterministic=not train)(x, x, mask=mask)
    x = nn.LayerNorm()(x + nn.Dropout(self.dropout, deterministic=not train)(h))
    return nn.LayerNorm()(x + MLP(self.width, self.hidden, self.dropout)(x, train))


class SAEEND(nn.Module):
  speakers: int = 2
  width: int = 256
  depth: int = 2
  heads: int = 4
  hidden: int = 1024
  subsample: int = 4
  dropout: float = 0.0

  @nn.compact
  def __call__(self, features, window_mask, windows_prev: int = 0, train: bool = False):
    del windows_prev  # no positional information: attention sees a set of frames
    batch, windows, frames, dims = features.shape
    x = normalise(features, window_mask)
    steps = frames // self.subsample
    x = x[:, :, :steps * self.subsample].reshape(batch, windows * steps, self.subsample * dims)
    x = nn.LayerNorm()(nn.Dense(self.width)(x))
    valid = jnp.repeat(window_mask, steps, axis=1)
    mask = valid[:, None, None, :]
    for _ in range(self.depth):
      x = EncoderLayer(self.width, self.heads, self.hidden, self.dropout)(x, mask, train)
    return nn.Dense(self.speakers)(x).reshape(batch, windows, steps, self.speakers)


def make(name: str, speakers: int, **kwargs) -> nn.Module:
  """A diarizer by name (`axial` or `sa_eend`) from a config's `model` fields."""
  if name == "axial":
    return AxialDiarizer(speakers=speakers, **{k: tuple(v) if k == "strides" else v
                                               for k, v in kwargs.items()})
  if name == "sa_eend":
    return SAEEND(speakers=speakers, **kwargs)
  raise ValueError(f"model.name={name!r}: choose axial or sa_eend")

