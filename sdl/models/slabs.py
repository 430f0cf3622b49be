"""Slab-by-slab execution of a 3D CNN's first, largest layers.

On one 512³ × 4 volume the lbann CosmoFlow network's first convolution writes 8 GiB in
float32, and its gradient needs as much again: more than a 24 GiB machine holds beside the
rest of the step. Those layers are local along depth (each output plane reads a few input
planes), so they can run on one depth slab at a time: slab `i` computes output planes
`[i q, (i + 1) q)` of the last of them from the input planes those reach (its halo comes
with it: the few planes the windows need on either side). The slabs run in a `scan` whose
body is rematerialised, so only one slab's activations exist at a time, in the forward pass
and again when the backward pass recomputes it; what the step keeps is the last layer's
output, which the layers' pooling has already shrunk (64 × at 512³ for lbann's first two
blocks).

`plan` follows the windows back from the output slab: a layer with kernel k, stride s and
low padding p maps output planes `[a, a + n)` to input planes `[s a − p, s (a + n − 1) −
p + k)`. Each layer then runs valid along depth (padded as usual in height and width), and
planes that fall outside the layer's true depth are zeroed before the next layer: exactly
the zero padding the whole-volume layer sees there. So the slabs give the whole-volume
result to rounding, and the same gradients (`tests/test_slabs.py`).
"""
import dataclasses
from collections.abc import Sequence

import jax.numpy as jnp
from jax import lax

from sdl.errors import ConfigError
from sdl.parallel.spatial import Window


@dataclasses.dataclass(frozen=True)
class SlabPlan:
  """Where each layer's input slab lies: slab `i` of layer `l` covers the global planes
  `starts[l] + i * steps[l] + arange(lengths[l])` of that layer's input, whose true depth
  is `sizes[l]` (`sizes[-1]`: the last layer's output depth)."""
  slabs: int
  starts: tuple[int, ...]
  steps: tuple[int, ...]
  lengths: tuple[int, ...]
  sizes: tuple[int, ...]

  @property
  def padding(self) -> tuple[int, int]:
    """Zero planes to add before and after the input so that every slab's input exists."""
    low = max(0, -self.starts[0])
    high = max(0, self.starts[0] + (self.slabs - 1) * self.steps[0] + self.lengths[0]
               - self.sizes[0])
    return low, high

  def planes(self, layer: int, slab):
    """The global indices of `slab`'s planes at the input of `layer` (a traced slab works)."""
    return self.starts[layer] + slab * self.steps[layer] + jnp.arange(self.lengths[layer])

  def slab_input(self, padded, slab, axis: int = 1):
    """Slab `slab` of the input, from the input padded by `padding` along `axis`."""
    start = self.starts[0] + self.padding[0] + slab * self.steps[0]
    return lax.dynamic_slice_in_dim(padded, start, self.lengths[0], axis=axis)

  def mask(self, x, layer: int, slab, axis: int = 1):
    """`x` (the input of `layer`, one slab) with planes outside the true depth zeroed."""
    index = self.planes(layer, slab)
    inside = (index >= 0) & (index < self.sizes[layer])
    shape = [1] * x.ndim
    shape[axis] = -1
    return jnp.where(inside.reshape(shape), x, jnp.zeros((), x.dtype))


def plan(windows: Sequence[Window], size: int, slabs: int) -> SlabPlan:
  """The slab plan for `windows` (the layers, in order) on an input `size` planes deep,
  split into `slabs` equal slabs of the last layer's output."""
  sizes = [size]
  for w in windows:
    sizes.append(w.out_size(sizes[-1]))
  out = sizes[-1]
  if slabs < 1 or out % slabs:
    names = ", ".join(w.name for w in windows)
    fits = [n for n in range(1, out + 1) if out % n == 0]
    raise ConfigError(f"model.slabs={slabs}: the slab layers ({names}) end {out} planes deep, "
                      f"which must split into equal slabs; choose one of {fits}")
  start, step, length = 0, out // slabs, out // slabs
  starts, steps, lengths = [start], [step], [length]
  for w in reversed(windows):
    start, step = start * w.stride - w.padding[0], step * w.stride
    length = (length - 1) * w.stride + w.kernel
    starts.insert(0, start)
    steps.insert(0, step)
    lengths.insert(0, length)
  return SlabPlan(slabs, tuple(starts), tuple(steps), tuple(lengths), tuple(sizes))

