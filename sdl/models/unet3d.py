"""3D U-Net (Çiçek et al., MICCAI 2016) in the configuration of LBANN's unet3d, the second
network of the hybrid-parallel paper (Oyama et al., IEEE TPDS 2021).

Three levels by default: down blocks of two 3³ convolutions (32, 64), (64, 128),
(128, 256), each followed by a 2³ max pool; a bottom block (256, 512); on the way up a
2³ stride-2 transposed convolution that keeps its channels, the skip connection of the
same level concatenated after it (`[upsampled, skip]`), and two 3³ convolutions
(256, 256), (128, 128), (64, 64); a 1³ convolution to the classes. Every 3³ convolution
has padding 1 and no bias and is followed by a normalisation (BatchNorm, or GroupNorm)
and a ReLU; the transposed and last convolutions have no bias either, as in LBANN. The
output is the per-voxel class logits `[batch, D, H, W, classes]` (softmax in the loss).

**Layouts.** Each of the 2L + 1 blocks (in execution order `down1 … downL, bottom,
upL … up1`) runs in a layout given by configuration (`layouts`):

* "spatial": depth over the mesh axis that the `depth` rule names, height over the
  `height` one when the mesh has it (`sdl.parallel.sharding`), batch over `data`;
* "depth": depth split only;
* "data": the whole volume on each device, batch over `data`.

A down block's pool runs in that block's layout; the pooled volume, the skip connection
and the upsampled volume are re-laid out to the block that uses them, which is where the
model re-partitions (a move from a split layout to "data" gathers; the reverse is a local
slice). `check_layouts` validates every layer of both paths before anything compiles;
`resolve_layouts("auto")` splits every block where the split is valid.

Convolutions use `sdl.models.conv` (per-backend lowerings that run per shard with halo
exchange), so no split layer gathers its activations. BatchNorm runs outside those
`shard_map` islands, on the global arrays: its mean and variance over a split volume are
those of the whole batch and volume, which XLA's partitioner reduces across the shards.
"""
import dataclasses
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from sdl.errors import ConfigError
from sdl.models.conv import Conv3D, ConvTranspose3D
from sdl.models.pooling import max_pool3d
from sdl.ops.activations import leaky_relu
from sdl.parallel.sharding import Partitioner
from sdl.parallel.spatial import Window, split_problem

LAYOUTS = ("spatial", "depth", "data")
NORMS = ("batch", "group")
# (down block widths per level, bottom block widths): LBANN's unet3d
LBANN_WIDTHS = (((32, 64), (64, 128), (128, 256)), (256, 512))

CONV = Window("conv k3 s1", 3, 1, (1, 1))
POOL = Window("maxpool k2 s2", 2, 2, (0, 0))
LOGICAL = {"spatial": ("batch", "depth", "height", None, None),
           "depth": ("batch", "depth", None, None, None),
           "data": ("batch", None, None, None, None)}


@dataclasses.dataclass(frozen=True)
class Block:
  """One block: two 3³ convolutions at one resolution (`level`: that many pools in)."""
  name: str
  level: int
  widths: tuple[int, ...]
  path: str  # "down" | "bottom" | "up"


def blocks(down: Sequence[Sequence[int]] = LBANN_WIDTHS[0],
           bottom: Sequence[int] = LBANN_WIDTHS[1]) -> tuple[Block, ...]:
  """The blocks in execution order; an up block has its level's down-block output width."""
  levels = len(down)
  result = [Block(f"down{i + 1}", i, tuple(w), "down") for i, w in enumerate(down)]
  result.append(Block("bottom", levels, tuple(bottom), "bottom"))
  result += [Block(f"up{i + 1}", i, (down[i][-1],) * 2, "up") for i in reversed(range(levels))]
  return tuple(result)


def min_input_size(levels: int) -> int:
  return 2 ** levels


def _split_problem(block: Block, side: int, shards: int) -> str | None:
  """Why `block` cannot run with its depth (or height) of `side` voxels split `shards`
  ways: its convolutions, its pool (down blocks) or the upsampling into it (up blocks)."""
  problem = split_problem(CONV, side, shards)
  if problem is None and block.path == "down":
    problem = split_problem(POOL, side, shards)
  if problem is None and block.path == "up" and (side // 2) % shards:
    problem = (f"the upsampling into it starts from {side // 2} voxel(s), which do not "
               f"divide into {shards} equal shards")
  return problem


def check_layouts(layouts: Sequence[str], all_blocks: Sequence[Block], input_size: int,
                  depth_shards: int, height_shards: int = 1, *,
                  field: str = "model.layouts") -> None:
  """Raise ConfigError naming the field, the block and the fix if a layout cannot run."""
  levels = max(b.level for b in all_blocks)
  if input_size % min_input_size(levels):
    raise ConfigError(f"data.crop_size={input_size} must be divisible by "
                      f"{min_input_size(levels)} (2^{levels}: one halving per level)")
  if len(layouts) != len(all_blocks):
    raise ConfigError(f"{field} has {len(layouts)} entries for {len(all_blocks)} blocks "
                      f"({', '.join(b.name for b in all_blocks)}); give one layout per block "
                      "or 'auto'")
  for i, (layout, block) in enumerate(zip(layouts, all_blocks)):
    if layout not in LAYOUTS:
      raise ConfigError(f"{field}[{i}]={layout!r} (block {block.name}): choose one of "
                        f"{LAYOUTS}")
    side = input_size >> block.level
    splits = (("depth", depth_shards),) + (
        (("height", height_shards),) if layout == "spatial" else ())
    for axis, shards in (splits if layout != "data" else ()):
      problem = _split_problem(block, side, shards)
      if problem:
        raise ConfigError(
            f"{field}[{i}]={layout!r}: block {block.name} ({side}³ voxels) would run "
            f"split along {axis} over {shards} devices, but {problem}; set it to 'data' "
            f"(or use {field}='auto'), split fewer ways in mesh.shape, or use a larger "
            "data.crop_size")


def resolve_layouts(layouts: str | Sequence[str], all_blocks: Sequence[Block],
                    input_size: int, depth_shards: int, height_shards: int = 1, *,
                    field: str = "model.layouts") -> tuple[str, ...]:
  """`layouts` checked, or for "auto" the most split valid layout of every block."""
  if isinstance(layouts, str):
    if layouts != "auto":
      raise ConfigError(f"{field}={layouts!r}: give 'auto' or one of {LAYOUTS} per block")
    chosen = []
    for block in all_blocks:
      side = input_size >> block.level
      if not _split_problem(block, side, depth_shards):
        fits_height = not _split_problem(block, side, height_shards)
        chosen.append("spatial" if fits_height else "depth")
      else:
        chosen.append("data")
    layouts = chosen
  layouts = tuple(str(v) for v in layouts)
  check_layouts(layouts, all_blocks, input_size, depth_shards, height_shards, field=field)
  return layouts


class UNet3D(nn.Module):
  """3D U-Net (module docstring): `[batch, D, H, W, C]` → logits `[batch, D, H, W, classes]`."""
  classes: int = 3
  down: tuple[tuple[int, ...], ...] = LBANN_WIDTHS[0]
  bottom: tuple[int, ...] = LBANN_WIDTHS[1]
  norm: str = "batch"  # "batch" | "group"
  groups: int = 8  # GroupNorm's groups
  layouts: tuple[str, ...] | None = None  # one per block; None: all "data"
  partitioner: Partitioner | None = None
  dtype: Any = jnp.float32  # compute dtype; params and normalisation statistics are fp32
  conv_lowering: str = "auto"  # sdl.models.conv: folded (and fast transposed) on CPU

  def _to(self, x, layout):
    if self.partitioner is None:
      return x
    return self.partitioner.constrain(x, LOGICAL[layout])

  def _logical(self, layout):
    return LOGICAL[layout] if self.partitioner is not None else LOGICAL["data"]

  def _conv_norm_relu(self, x, features, layout, train, name):
    x = Conv3D(features, use_bias=False, dtype=self.dtype, lowering=self.conv_lowering,
               partitioner=self.partitioner, logical=self._logical(layout),
               name=f"{name}_conv")(x)
    if self.norm == "batch":
      x = nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5, use_fast_variance=False,
                       dtype=self.dtype, name=f"{name}_bn")(x)
    elif self.norm == "group":
      x = nn.GroupNorm(num_groups=min(self.groups, features), dtype=self.dtype,
                       name=f"{name}_gn")(x)
    else:
      raise ValueError(f"model.norm={self.norm!r}: choose one of {NORMS}")
    x = self._to(x, layout)
    return leaky_relu(x, 0.0, keep="signs")  # ReLU, keeping 1 bit per value for backward

  def _block(self, x, block, layout, train):
    for j, width in enumerate(block.widths):
      x = self._conv_norm_relu(x, width, layout, train, f"{block.name}_{j + 1}")
    return x

  @nn.compact
  def __call__(self, volume, *, train: bool = False):
    all_blocks = blocks(self.down, self.bottom)
    layouts = self.layouts or ("data",) * len(all_blocks)
    if len(layouts) != len(all_blocks):
      raise ValueError(f"{len(layouts)} layouts for {len(all_blocks)} blocks")
    # init only needs shapes, and may see one example on a data-parallel mesh, which the
    # per-shard CPU lowerings (shard_map) cannot split: they lower natively there
    lowering = "native" if self.is_initializing() else self.conv_lowering
    x = volume.astype(self.dtype)
    skips = []
    for block, layout in zip(all_blocks, layouts):
      if block.path == "up":
        x = self._to(x, layout)
        x = ConvTranspose3D(x.shape[-1], (2, 2, 2), use_bias=False, dtype=self.dtype,
                            lowering=self.conv_lowering, partitioner=self.partitioner,
                            logical=self._logical(layout), name=f"{block.name}_deconv")(x)
        x = jnp.concatenate([x, self._to(skips.pop(), layout)], axis=-1)
      x = self._to(x, layout)
      x = self._block(x, block, layout, train)
      if block.path == "down":
        skips.append(x)
        x = max_pool3d(x, 2, 2, (0, 0), lowering)
    x = nn.Dense(self.classes, use_bias=False, dtype=self.dtype, name="classify")(x)
    return x.astype(jnp.float32)
