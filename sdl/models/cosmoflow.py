"""CosmoFlow: regress 4 cosmological parameters from a 3D dark-matter volume.

Two networks, chosen by `variant`:

* ``mlperf`` — the MLPerf HPC reference (Mathuriya et al., SC'18; MLPerf HPC v0.7):
  5 x [Conv3D k3 'same' (32, 64, 128, 256, 512 filters) + LeakyReLU(0.3) + MaxPool 2],
  flatten, Dense 128, Dense 64 (LeakyReLU(0.3), dropout 0.5 each), Dense 4, 1.2·tanh.
  8,907,556 parameters at 128³.
* ``lbann`` — the network of the hybrid-parallel paper (Oyama et al., "The Case for
  Strong Scaling in Deep Learning", IEEE TPDS 2021): 7 x Conv3D k3 pad 1 without bias
  (16, 32, 64, 128 stride 2, 256, 256, 256) + LeakyReLU(0.01), average pooling k3 s2 p1
  after convs 1-5 and, at inputs above 128³, after convs 6 and 7 as needed so that the
  flattened size stays 2048 (2³ x 256); FC 2048 → 256 → 4 with LeakyReLU and dropout
  (keep 0.8). 9,437,636 parameters at 128³.

`head="pooled"` replaces the flattened last feature map with the spatial mean of every
convolution's activation, batch-normalised, before the variant's dense layers; the demo
uses it, because the published head leaves Ω_m unlearnt on 32³ crops (docs/benchmarks.md).

Inputs are int16 particle counts `[batch, depth, height, width, 4]` (4 redshifts); the
model applies log1p itself so that volumes travel as int16 (half the bytes of float32).
Outputs are the 4 parameters scaled to [-1, 1], `[batch, 4]` float32.

Spatial parallelism: activations of the first `spatial_layers` conv/pool layers are
constrained to `(batch, depth, height, width, channels)` logical axes (depth split over
the `spatial` mesh axis); after them, to `(batch, -, -, -, -)`: purely data parallel.
Without a `partitioner` the module places no constraints (single device).

Rematerialisation is chosen per layer (`remat`): consecutive conv/pool layers after the
stem form blocks, each recomputed in the backward pass under its own policy
(`REMAT_POLICIES`). A block keeps only what its policy saves; the parameters are named as
without it, so a run may change its blocks when it resumes.

Convolutions lower per backend (`sdl.models.conv`): natively on GPU/TPU, folded onto 2D
convolutions on CPU, where that runs several times faster. `conv_lowering` also picks the
pooling lowerings (`sdl.models.pooling`: on CPU a reshaped maximum, and average pooling
with a separable gradient, per shard with halo exchange).
"""
import dataclasses
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
from jax.ad_checkpoint import checkpoint_name
import jax.numpy as jnp

from sdl import console
from sdl.models import slabs as slabs_lib
from sdl.models.conv import Conv3D
from sdl.ops.activations import leaky_relu
from sdl.models.pooling import avg_pool3d, max_pool3d
from sdl.models.slabs import SlabPlan
from sdl.parallel.sharding import VOLUME_AXES, Partitioner
from sdl.parallel.spatial import Window, check_spatial_plan, max_spatial_layers

DATA_PARALLEL = ("batch", None, None, None, None)
VARIANTS = ("mlperf", "lbann")
HEADS = ("flatten", "pooled")
HEAD_NORM_MOMENTUM = 0.9  # of the pooled head's batch norm
# What a rematerialised block keeps for the backward pass (`CosmoFlow.remat`): "full", only
# its input (every layer recomputed: the convolutions run forward once more); "save_convs",
# its convolutions' outputs too (only activations and pooling recomputed: no extra
# convolution FLOPs, and the pooled and activated copies are not kept).
REMAT_POLICIES = {"full": jax.checkpoint_policies.nothing_saveable,
                  "save_convs": jax.checkpoint_policies.save_only_these_names("conv_output")}


@dataclasses.dataclass(frozen=True)
class Layer:
  """One feature-extractor layer; the same window applies along all three axes."""
  kind: str  # "conv" | "maxpool" | "avgpool"
  window: Window
  features: int = 0
  use_bias: bool = True


def _conv(i, features, stride=1, use_bias=True):
  return Layer("conv", Window(f"conv{i} k3 s{stride}", 3, stride, (1, 1)), features, use_bias)


# The dense head after the conv/pool layers: hidden widths and their dropout rate.
HEAD = {"mlperf": ((128, 64), 0.5), "lbann": ((2048, 256), 0.2)}
LEAKY_SLOPE = {"mlperf": 0.3, "lbann": 0.01}  # of every leaky ReLU, convolutions and head


def layer_name(layer: Layer) -> str:
  """The short name of a conv/pool layer ("conv3", "avgpool2"), as `remat` spells it."""
  return layer.window.name.split()[0]


def remat_blocks(layers: Sequence[Layer], remat, start: int = 0
                 ) -> list[tuple[int, int, str | None]]:
  """`layers[start:]` as consecutive blocks `(first, stop, policy)`: the `remat` blocks,
  given as `(first layer name, last layer name, policy)` triples, and plain runs between
  them (policy None). Raises ValueError naming the block at fault."""
  names = [layer_name(layer) for layer in layers]
  blocks, at = [], start
  for entry in remat or ():
    if len(entry) != 3 or entry[2] not in REMAT_POLICIES:
      raise ValueError(f"{tuple(entry)!r}: give (first layer, last layer, policy), the policy "
                       f"one of {sorted(REMAT_POLICIES)}")
    first, last, policy = entry
    for name in (first, last):
      if name not in names:
        raise ValueError(f"{tuple(entry)!r}: no layer {name!r}; the layers are "
                         f"{', '.join(names)}")
    i, j = names.index(first), names.index(last)
    if i < start:
      raise ValueError(f"{tuple(entry)!r}: {first} is in the stem (the first {start} layers, "
                       "model.slab_layers), which model.stem_remat rematerialises")
    if j < i:
      raise ValueError(f"{tuple(entry)!r}: {last} comes before {first}")
    if i < at:
      raise ValueError(f"{tuple(entry)!r}: overlaps the block before it, or comes before it; "
                       "list the blocks in layer order, apart")
    if i > at:
      blocks.append((at, i, None))
    blocks.append((i, j + 1, policy))
    at = j + 1
  if at < len(layers):
    blocks.append((at, len(layers), None))
  return blocks


def feature_layers(variant: str, input_size: int) -> tuple[Layer, ...]:
  """The conv/pool layers of `variant` for a cubic input of side `input_size`."""
  if variant == "mlperf":
    layers = []
    for i, features in enumerate((32, 64, 128, 256, 512), 1):
      layers += [_conv(i, features), Layer("maxpool", Window(f"maxpool{i} k2 s2", 2, 2, (0, 0)))]
    return tuple(layers)
  if variant == "lbann":
    pool = lambda i: Layer("avgpool", Window(f"avgpool{i} k3 s2", 3, 2, (1, 1)))
    layers, size = [], input_size
    for i, (features, stride) in enumerate(
        ((16, 1), (32, 1), (64, 1), (128, 2), (256, 1), (256, 1), (256, 1)), 1):
      layers.append(_conv(i, features, stride, use_bias=False))
      size = layers[-1].window.out_size(size)
      if i <= 5 or size > 2:  # extra pools keep the flattened size at 2^3 x 256 = 2048
        layers.append(pool(i))
        size = layers[-1].window.out_size(size)
    return tuple(layers)
  raise ValueError(f"model.variant={variant!r}: choose one of {VARIANTS}")


def head_widths(variant: str, input_size: int) -> tuple[int, ...]:
  """The dense head's widths, from the flattened features to the 4 outputs; () where the
  features shrink to nothing at this input size (mlperf needs 32³)."""
  side, channels = input_size, 4
  for layer in feature_layers(variant, input_size):
    side = layer.window.out_size(side)
    channels = layer.features if layer.kind == "conv" else channels
  return (channels * side ** 3, *HEAD[variant][0], 4) if side >= 1 else ()


def resolve_spatial_layers(variant: str, input_size: int, depth_shards: int,
                           height_shards: int = 1, spatial_layers: int | str = "auto") -> int:
  """Validate a depth (and height) split of `variant`; 'auto' picks the deepest valid one."""
  windows = [layer.window for layer in feature_layers(variant, input_size)]
  if spatial_layers == "auto":
    spatial_layers = min(max_spatial_layers(windows, input_size, depth_shards),
                         max_spatial_layers(windows, input_size, height_shards))
  spatial_layers = int(spatial_layers)
  check_spatial_plan(windows, input_size, depth_shards, spatial_layers, axis="spatial")
  check_spatial_plan(windows, input_size, height_shards, spatial_layers, axis="spatial_h")
  return spatial_layers


def apply_layer(x, layers: Sequence[Layer], i: int, *, slope: float, dtype, lowering: str,
                pool_lowering: str, partitioner: Partitioner | None, logical,
                depth_padding: tuple[int, int] | None = None, save_dtype=None):
  """Layer `i` of `layers` on `x`, inside a module's compact method (its convolution is
  that module's submodule). `depth_padding` overrides the layer's padding along depth (the
  slabs run valid there, `sdl.models.slabs`)."""
  layer, w = layers[i], layers[i].window
  pad = tuple(w.padding)
  padding = ((depth_padding or pad), pad, pad)
  if layer.kind == "conv":
    x = Conv3D(layer.features, (w.kernel,) * 3, strides=(w.stride,) * 3, padding=padding,
               use_bias=layer.use_bias, dtype=dtype, lowering=lowering,
               partitioner=partitioner, logical=logical, save_dtype=save_dtype)(x)
    x = checkpoint_name(x, "conv_output")  # what the "save_convs" remat policy keeps
    # max pooling keeps its input for its gradient; the leaky ReLU can share it
    pooled_by_max = i + 1 < len(layers) and layers[i + 1].kind == "maxpool"
    return leaky_relu(x, slope, keep="output" if pooled_by_max else "signs")
  if layer.kind == "maxpool":
    if depth_padding is not None and tuple(depth_padding) != pad:
      raise ValueError(f"{w.name}: max pooling runs in slabs only without padding")
    return max_pool3d(x, w.kernel, w.stride, pad, pool_lowering)
  # average pooling counts the zero padding, as cuDNN's default mode does
  return avg_pool3d(x, w.kernel, w.stride, padding, pool_lowering, partitioner, logical)


class Stem(nn.Module):
  """CosmoFlow's first `count` conv/pool layers, log1p included, on the whole volume
  (`slab=None`) or on one depth slab of the output (`plan`, `sdl.models.slabs`): the body
  `CosmoFlow` scans over the slabs. Called as a scan body: `(carry, slab, counts) →
  (carry, activation)`."""
  variant: str
  input_size: int
  count: int
  n_split: int
  partitioner: Partitioner | None = None
  dtype: Any = jnp.float32
  conv_lowering: str = "auto"
  plan: SlabPlan | None = None
  progress: bool = False
  save_dtype: Any = None

  @nn.compact
  def __call__(self, carry, slab, counts):
    layers = feature_layers(self.variant, self.input_size)
    pool_lowering = "native" if self.is_initializing() else self.conv_lowering
    kwargs = dict(slope=LEAKY_SLOPE[self.variant], dtype=self.dtype, lowering=self.conv_lowering,
                  pool_lowering=pool_lowering, save_dtype=self.save_dtype)
    constrain = lambda x, i: (x if self.partitioner is None else self.partitioner.constrain(
        x, VOLUME_AXES if i < self.n_split else DATA_PARALLEL))
    if slab is None:  # the whole volume
      x = jnp.log1p(constrain(counts, 0).astype(jnp.float32)).astype(self.dtype)
      for i in range(self.count):
        x = constrain(x, i)
        x = apply_layer(x, layers, i, partitioner=self.partitioner,
                        logical=VOLUME_AXES if i < self.n_split else DATA_PARALLEL, **kwargs)
      return carry, x
    if self.progress:
      jax.debug.callback(_slab_progress, slab, self.plan.slabs)
    x = jnp.log1p(self.plan.slab_input(counts, slab).astype(jnp.float32)).astype(self.dtype)
    for i in range(self.count):
      if i:  # what the whole-volume layer sees as zero padding
        x = self.plan.mask(x, i, slab)
      x = apply_layer(x, layers, i, partitioner=self.partitioner, logical=DATA_PARALLEL,
                      depth_padding=(0, 0), **kwargs)
    return carry, x


_last_slab = [None]


def _slab_progress(slab, slabs):
  """A line per slab; the backward pass recomputes them in reverse order, which tells the
  passes apart (a slab repeated or one lower than the last: backward)."""
  slab, last = int(slab), _last_slab[0]
  backward = last is not None and ((slab == last and slab != 0) or slab == last - 1)
  _last_slab[0] = slab
  done = slabs - slab if backward else slab + 1
  console.progress(f"  stem {'backward' if backward else 'forward'}: slab {done}/{slabs}",
                   final=done == slabs)


class CosmoFlow(nn.Module):
  """CosmoFlow regression network (see module docstring)."""
  variant: str = "mlperf"
  input_size: int = 128
  spatial_layers: int | None = None  # None: every conv/pool layer runs depth-split
  partitioner: Partitioner | None = None
  dtype: Any = jnp.float32  # compute dtype (bf16 for mixed precision); params stay fp32
  conv_lowering: str = "auto"  # "native" | "folded" | "auto" (per backend, sdl.models.conv;
                               # also max pooling's, sdl.models.pooling)
  dropout: float | None = None  # the head's dropout rate; None: the variant's published one
  # The first `slab_layers` conv/pool layers form the stem (params under "stem"); with
  # `slabs` > 1 it runs one depth slab at a time, each recomputed in the backward pass
  # (`sdl.models.slabs`). The depth must not be split over devices then.
  slab_layers: int = 0
  slabs: int = 1
  slab_progress: bool = False  # a line per slab: progress inside minute-long steps
  # Recompute the stem in the backward pass instead of keeping its activations (always so
  # with slabs > 1: that is what makes one slab's activations the most that exist).
  stem_remat: bool = False
  # Blocks of the layers after the stem recomputed in the backward pass, each under its own
  # policy: `(first layer name, last layer name, policy)` triples in layer order, e.g.
  # (("conv1", "avgpool2", "full"),); see `remat_blocks` and `REMAT_POLICIES`.
  remat: tuple = ()
  # Keep each convolution's input for the backward pass in this dtype (bf16: half the
  # bytes) while computing in `dtype`; None: as computed (`sdl.models.conv.saved_as`).
  save_dtype: Any = None
  # What the dense head sees: "flatten", the last conv/pool layer's output flattened (the
  # published networks); "pooled", the spatial mean of every convolution's activation,
  # batch-normalised. The parameters set each channel's variance and the ratios between
  # the redshifts by a few percent; batch norm across samples turns those small
  # differences of the pooled features into unit-scale inputs that small data can fit.
  head: str = "flatten"

  @property
  def rematerialises(self) -> bool:
    """Whether the backward pass recomputes any layer through `jax.checkpoint` (a `remat`
    block, or the whole stem with `stem_remat`), which XLA:CPU needs told to keep apart
    (`sdl.xla_flags.remat_compiler_options`). Slabs recompute inside a scan, which it
    keeps anyway."""
    return (self.stem_remat and self.slabs == 1) or any(
        policy for *_, policy in remat_blocks(
            feature_layers(self.variant, self.input_size), self.remat, self.slab_layers))

  def _constrain(self, x, logical):
    return x if self.partitioner is None else self.partitioner.constrain(x, logical)

  def _layers(self, x, layers, first, stop, n_split, slope, pool_lowering):
    """Layers `first..stop-1` of `layers` on `x`: the output, and each convolution's spatial mean
    (for the pooled head; empty for the flatten one)."""
    means = []
    for i in range(first, stop):
      logical = VOLUME_AXES if i < n_split else DATA_PARALLEL
      x = self._constrain(x, logical)
      x = apply_layer(x, layers, i, slope=slope, dtype=self.dtype, lowering=self.conv_lowering,
                      pool_lowering=pool_lowering, partitioner=self.partitioner, logical=logical,
                      save_dtype=self.save_dtype)
      if self.head == "pooled" and layers[i].kind == "conv":
        means.append(self._constrain(jnp.mean(x.astype(jnp.float32), axis=(1, 2, 3)),
                                     ("batch", None)))
    return x, means

  @nn.compact
  def __call__(self, counts, *, train: bool = False):
    """counts: int16 `[batch, D, H, W, 4]` → float32 `[batch, 4]` in [-1, 1]-scaled units."""
    layers = feature_layers(self.variant, self.input_size)
    n_split = len(layers) if self.spatial_layers is None else self.spatial_layers
    slope = LEAKY_SLOPE[self.variant]
    stem = dict(variant=self.variant, input_size=self.input_size, count=self.slab_layers,
                n_split=n_split, partitioner=self.partitioner, dtype=self.dtype,
                conv_lowering=self.conv_lowering, save_dtype=self.save_dtype)
    if not self.slab_layers:
      x = self._constrain(counts, VOLUME_AXES if n_split else DATA_PARALLEL)
      x = jnp.log1p(x.astype(jnp.float32)).astype(self.dtype)
    elif self.slabs == 1 or self.is_initializing():
      module = nn.remat(Stem) if self.stem_remat and not self.is_initializing() else Stem
      _, x = module(**stem, name="stem")(None, None, counts)
    else:
      slab_plan = slabs_lib.plan([l.window for l in layers[:self.slab_layers]],
                                 self.input_size, self.slabs)
      x = self._constrain(counts, DATA_PARALLEL)
      x = jnp.pad(x, [(0, 0), slab_plan.padding, (0, 0), (0, 0), (0, 0)])
      scan = nn.scan(nn.remat(Stem), variable_broadcast="params", split_rngs={"params": False},
                     in_axes=(0, nn.broadcast), length=self.slabs)
      _, x = scan(**stem, plan=slab_plan, progress=self.slab_progress, name="stem")(
          None, jnp.arange(self.slabs), x)
      x = jnp.moveaxis(x, 0, 1)  # [batch, slab, planes, H, W, C]
      x = x.reshape(x.shape[0], -1, *x.shape[3:])
    # init only needs shapes, and may see one example on a data-parallel mesh, which the
    # per-shard CPU pooling (shard_map) cannot split: pool natively there (as Conv3D does)
    pool_lowering = "native" if self.is_initializing() else self.conv_lowering
    if self.head not in HEADS:
      raise ValueError(f"head={self.head!r}: choose one of {HEADS}")
    if self.head == "pooled" and self.slab_layers:
      raise ValueError("the pooled head needs every convolution's activation: slab_layers=0")
    pooled = []
    for first, stop, policy in remat_blocks(layers, self.remat, self.slab_layers):
      def block(module, x, first=first, stop=stop):
        return module._layers(x, layers, first, stop, n_split, slope, pool_lowering)
      if policy and not self.is_initializing():
        block = nn.remat(block, policy=REMAT_POLICIES[policy])
      x, means = block(self, x)
      pooled += means
    if self.head == "pooled":
      # Two-pass variance: the features differ across samples by as little as 1e-3 of
      # their size, where E[x²] - E[x]² in float32 cancels to noise.
      x = nn.BatchNorm(use_running_average=not train, momentum=HEAD_NORM_MOMENTUM,
                       use_fast_variance=False,
                       name="head_norm")(jnp.concatenate(pooled, axis=-1)).astype(self.dtype)
    else:
      x = self._constrain(x, DATA_PARALLEL)
      x = x.reshape((x.shape[0], -1))
    hidden, rate = HEAD[self.variant]
    rate = rate if self.dropout is None else self.dropout
    for width in hidden:
      x = nn.Dense(width, dtype=self.dtype, param_dtype=jnp.float32)(x)
      x = nn.leaky_relu(x, slope)
      x = nn.Dropout(rate, deterministic=not train)(x)
    x = nn.Dense(4, dtype=self.dtype, param_dtype=jnp.float32)(x).astype(jnp.float32)
    return 1.2 * jnp.tanh(x) if self.variant == "mlperf" else x
