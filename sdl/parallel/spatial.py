"""Checks for spatially partitioned (depth-split) 3D CNNs, run before anything compiles.

Under a depth split over P devices each device holds `depth / P` slices of every
activation; a window op (convolution, pooling) with kernel k, stride s and padding p
needs `p` (left) and `k - 1 - p` (right) neighbouring slices: its halo, which XLA fetches
from the neighbouring shard with a collective-permute. XLA requires each shard to be at
least as thick as that halo (it aborts the process otherwise), and a strided window must
not straddle shards unevenly, so we require for every depth-split layer:

* input depth divisible by P (so shards are equal),
* per-shard input depth >= halo,
* per-shard input depth divisible by the stride (so the output splits evenly too).

Deep layers get thin; the layers after `spatial_layers` run purely data-parallel (the
original work stopped splitting at the 5th pooling layer).
"""
import dataclasses
from collections.abc import Sequence

from sdl.parallel.mesh import ConfigError


@dataclasses.dataclass(frozen=True)
class Window:
  """One spatial op along depth: kernel size, stride and (low, high) padding in voxels."""
  name: str
  kernel: int
  stride: int
  padding: tuple[int, int]

  @property
  def halo(self) -> int:
    return max(self.padding[0], self.kernel - 1 - self.padding[0], 0)

  def out_size(self, size: int) -> int:
    return (size + sum(self.padding) - self.kernel) // self.stride + 1


def split_problem(window: Window, size: int, shards: int) -> str | None:
  """Why `window` cannot run on `size` voxels split `shards` ways, or None if it can."""
  if shards == 1:
    return None
  if size < shards * window.halo:
    return (f"depth {size} over {shards} shards leaves shards thinner than its halo of "
            f"{window.halo}")
  if size % shards:
    return f"depth {size} does not divide into {shards} equal shards"
  local = size // shards
  if local % window.stride:
    return f"{local} voxel(s) per shard is not a multiple of its stride {window.stride}"
  return None


def max_spatial_layers(windows: Sequence[Window], size: int, shards: int) -> int:
  """How many leading layers can run depth-split (the 'auto' choice)."""
  for i, window in enumerate(windows):
    if split_problem(window, size, shards):
      return i
    size = window.out_size(size)
  return len(windows)


def check_spatial_plan(windows: Sequence[Window], size: int, shards: int,
                       spatial_layers: int, *, axis: str = "spatial") -> None:
  """Raise ConfigError naming the layer and the fix if the split cannot run."""
  if shards > 1 and size % shards:
    raise ConfigError(
        f"data.input_size={size} is not divisible by the '{axis}' mesh axis ({shards} "
        f"devices); choose an input size divisible by {shards} or change mesh.shape")
  if not 0 <= spatial_layers <= len(windows):
    raise ConfigError(f"model.spatial_layers={spatial_layers} must be in [0, {len(windows)}]"
                      " (the number of conv/pool layers) or 'auto'")
  best = max_spatial_layers(windows, size, shards)
  if spatial_layers <= best:
    return
  for i, window in enumerate(windows[:spatial_layers]):
    problem = split_problem(window, size, shards)
    if problem:
      raise ConfigError(
          f"model.spatial_layers={spatial_layers}: layer {i + 1} ({window.name}) would run "
          f"depth-split over the '{axis}' axis, but {problem}; set model.spatial_layers<="
          f"{best} (or 'auto'), use fewer '{axis}' devices in mesh.shape, or a larger "
          "data.input_size")
    size = window.out_size(size)
