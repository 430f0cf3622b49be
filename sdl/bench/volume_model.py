"""A memory and communication model of a hybrid data x spatial 3D CNN step, for choosing
a mesh: per-device bytes and halo traffic for a network, a volume, a batch and a mesh.

The network is a list of `Stage`s: conv/pool layers with a window along each axis
(`sdl.parallel.spatial.Window`) and output channels, or upsampling layers (a transposed
convolution) and concatenations. The first `spatial_layers` of them run depth-split over
`P` devices and the rest, and the dense head, data-parallel; or each stage has its own
split (`Plan.stage_splits`: a U-Net's layouts, `unet3d_stages`).

Per device:
  state        parameters, their gradient and the optimiser's moments (`state_copies`
               arrays of the parameters' size: 4 for Adam), whole on every device, or split
               over all of them with FSDP, which still holds the largest layer's weights
               and gradient whole while it runs;
  activations  each layer's output, `b` examples, split P ways along depth when the layer
               is, times `copies`: how many float copies of an activation the step keeps
               live at its peak (inputs saved for the backward pass, temporaries). `copies`
               is the one number read from XLA (`calibrate`), at P = 1;
  halo         per step, bytes each device sends to its depth neighbours (`halo_bytes`).
Checked against XLA's buffer assignment and the compiled step's collective-permutes by
`experiments.volume_model_check` (docs/scaling.md).
"""
import dataclasses
from collections.abc import Sequence

from sdl.parallel.spatial import Window


@dataclasses.dataclass(frozen=True)
class Stage:
  window: Window
  features: int       # output channels (a pool keeps its input's)
  params: int = 0     # weights of this layer
  upsample: int = 1   # > 1: a transposed convolution, output side = input side x this

  def out_size(self, side: int) -> int:
    return side * self.upsample if self.upsample > 1 else self.window.out_size(side)


@dataclasses.dataclass(frozen=True)
class Plan:
  """A configuration to price: per-device batch `batch`, depth split `splits` over the
  first `spatial_layers` stages, `devices` in all (for FSDP), dtype bytes."""
  side: int
  channels: int
  batch: int
  splits: int
  spatial_layers: int
  devices: int = 1
  fsdp: bool = False
  dtype_bytes: int = 4
  state_copies: int = 4  # params, gradient, two Adam moments
  # devices each stage's output is split over along depth (one per stage), instead of
  # `splits` for the first `spatial_layers` stages and 1 after
  stage_splits: tuple[int, ...] = ()

  def split(self, i: int) -> int:
    """Into how many pieces stage `i`'s output is split on this plan."""
    if self.stage_splits:
      return self.stage_splits[i]
    return self.splits if i < self.spatial_layers else 1


def cosmoflow_stages(variant: str, input_size: int) -> tuple[list[Stage], list[int]]:
  """(the feature extractor's stages, each dense layer's parameters) of a CosmoFlow
  variant."""
  from sdl.models.cosmoflow import feature_layers, head_widths  # noqa: PLC0415
  stages, channels = [], 4
  for layer in feature_layers(variant, input_size):
    k = layer.window.kernel
    features = layer.features if layer.kind == "conv" else channels
    params = (k ** 3 * channels * features + (features if layer.use_bias else 0)
              if layer.kind == "conv" else 0)
    stages.append(Stage(layer.window, features, params))
    channels = features
  widths = head_widths(variant, input_size)
  head = [a * b + b for a, b in zip(widths, widths[1:])]
  return stages, head


def unet3d_stages(down: Sequence[Sequence[int]], bottom: Sequence[int], channels: int,
                  classes: int, layouts: Sequence[str] | None = None,
                  splits: int = 1) -> tuple[list[Stage], tuple[int, ...]]:
  """(the stages of `sdl.models.unet3d.UNet3D`, each stage's depth split) for a `1 x
  splits` data x spatial mesh and the model's per-block `layouts` ("data": whole; a split
  layout: `splits` ways). A down block: its convolutions (each standing for conv, norm and
  ReLU) and its pool; an up block: its transposed convolution, the concatenation with the
  skip, its convolutions; then the 1³ classifier."""
  from sdl.models.unet3d import CONV, POOL, blocks  # noqa: PLC0415
  identity = Window("concat", 1, 1, (0, 0))
  stages, split_of, skips = [], [], []
  all_blocks = blocks(down, bottom)
  layouts = layouts or ("data",) * len(all_blocks)

  def add(stage, layout):
    stages.append(stage)
    split_of.append(1 if layout == "data" else splits)
  for block, layout in zip(all_blocks, layouts):
    if block.path == "up":
      add(Stage(Window("deconv k2 s2", 2, 2, (0, 0)), channels, 8 * channels ** 2,
                upsample=2), layout)
      channels += skips.pop()
      add(Stage(identity, channels), layout)
    for width in block.widths:
      add(Stage(CONV, width, 27 * channels * width + 2 * width), layout)  # + norm scale, bias
      channels = width
    if block.path == "down":
      skips.append(channels)
      add(Stage(POOL, channels), layout)
  add(Stage(identity, classes, channels * classes), layouts[-1])
  return stages, tuple(split_of)


def sides(stages: Sequence[Stage], side: int) -> list[int]:
  """The side of each stage's output."""
  out = []
  for s in stages:
    side = s.out_size(side)
    out.append(side)
  return out


def state_bytes(stages: Sequence[Stage], head_params: Sequence[int], plan: Plan) -> float:
  layers = [s.params for s in stages] + list(head_params)
  total = sum(layers) * plan.state_copies * 4
  if not plan.fsdp or plan.devices == 1:
    return total
  return total / plan.devices + 2 * max(layers) * 4  # the gathered weight, its gradient


def activation_bytes(stages: Sequence[Stage], plan: Plan) -> float:
  """One float copy of every layer's output (and the input volume) on one device."""
  total = plan.side ** 3 * plan.channels / plan.split(0)
  for i, (s, n) in enumerate(zip(stages, sides(stages, plan.side))):
    total += n ** 3 * s.features / plan.split(i)
  return total * plan.batch * plan.dtype_bytes


def halo_planes(window: Window) -> tuple[int, int]:
  """Input planes a shard reads from its (lower, upper) neighbour: the low padding, and
  what the last output's window reaches past the shard (shards divide by the stride)."""
  low = window.padding[0]
  return low, max(0, window.kernel - low - window.stride)


def halo_bytes(stages: Sequence[Stage], plan: Plan) -> float:
  """Bytes one interior device sends per step for the depth-split layers' halos: forward,
  the input planes its neighbours read; backward (all but the first layer, whose input
  needs no gradient), the output cotangent planes whose windows reach across."""
  total, side, channels = 0.0, plan.side, plan.channels
  for i, s in enumerate(stages):
    out = s.out_size(side)
    if plan.split(i) > 1 and s.upsample == 1:
      planes = sum(halo_planes(s.window))
      total += planes * side * side * channels
      if i > 0:
        total += planes * out * out * s.features
    side, channels = out, s.features
  return total * plan.batch * plan.dtype_bytes


def predict(stages, head_params: Sequence[int], plan: Plan, copies: float) -> dict[str, float]:
  state = state_bytes(stages, head_params, plan)
  acts = activation_bytes(stages, plan) * copies
  return {"state": state, "activations": acts, "total": state + acts,
          "halo": halo_bytes(stages, plan)}


def calibrate(stages, head_params: Sequence[int], plan: Plan, measured_total: float) -> float:
  """`copies` such that `predict(...)["total"]` equals XLA's total for `plan`."""
  return (measured_total - state_bytes(stages, head_params, plan)) / activation_bytes(
      stages, plan)
