"""A performance model of one distributed K-FAC step: what each part costs on a given
device count, device and network, for any network described as a list of layers.

The parts, per device, for a data-parallel step with `batch` examples per device:

  forward/backward   3 x the forward flops (the backward pass is twice the forward);
  statistics         `Σ a aᵀ` and `Σ g gᵀ` over the batch's rows: 2 B T (d_in² + d_out²)
                     flops per layer, every `stats_every` steps;
  factor all-reduce  every factor summed over all devices (d_in² + d_out² values per
                     layer, `factor_bytes` each), every `stats_every` steps;
  inverses           each layer inverted by one device (`kfac.assign_inverses`, greedy by
                     d³), `eigh_flops` n³ flops per factor of width n; the step waits for
                     the busiest device; every `inverse_every` steps;
  inverse share      each layer's inverses all-reduced from their owner (fp32), as
                     `kfac.kfac` does, every `inverse_every` steps;
  preconditioning    A⁻¹ ∇W G⁻¹ on every device: 2 (d_in² d_out + d_in d_out²) flops per
                     layer;
  weight all-reduce  the gradients (`grad_bytes` per parameter) summed over all devices.

Collectives are hierarchical (`sdl.parallel.collectives.all_reduce_sum`): a reduce-scatter
within the node, an all-reduce across nodes on 1/local of the bytes, an all-gather back.
Each phase costs latency plus bytes over bandwidth: a ring's bandwidth term
`2 (p - 1) / p n β` for an all-reduce (half each for reduce-scatter and all-gather) and a
tree's latency term `2 log2(p) α` (as NCCL's double binary tree has both).

Compute runs at the device's peak times an efficiency. `efficiency` is per layer for the
forward/backward pass (calibrated from one layer at a time on a machine where both can be
measured, `experiments.kfac_scaling`). `gemm_efficiency`, for the statistics and
preconditioning GEMMs, is one number or a function of the GEMM's smallest side (a factor's
width for the statistics, the layer's smaller width for the preconditioning): small
layers' GEMMs run far below the peak (calibrated here from `x.T @ x` at each width).
"""
import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence

from sdl.optim import kfac

PARTS = ("forward/backward", "statistics", "factor all-reduce", "inverses", "inverse share",
         "preconditioning", "weight all-reduce")


@dataclasses.dataclass(frozen=True)
class Layer:
  """One K-FAC layer: factor widths, output positions per example, forward flops per
  example, parameters."""
  name: str
  d_in: int        # A's width: kernel taps x input channels (+1 with a bias)
  d_out: int       # G's width: output channels
  positions: int   # output positions per example (1 for a dense layer)
  flops: int       # forward flops per example
  params: int


def layer_of(spec: kfac.LayerSpec, positions: int) -> Layer:
  params = math.prod(spec.kernel_shape) + (spec.out_dim if spec.has_bias else 0)
  return Layer(spec.name, spec.in_dim, spec.out_dim, positions, 2 * positions * params,
               params)


def conv(name, c_in, c_out, k, out_hw, bias=False) -> Layer:
  """A square `k x k` 2D convolution with an `out_hw x out_hw` output."""
  d_in = k * k * c_in + bias
  return Layer(name, d_in, c_out, out_hw * out_hw, 2 * out_hw * out_hw * d_in * c_out,
               d_in * c_out)


def resnet50(image: int = 224, classes: int = 1000) -> list[Layer]:
  """ResNet-50 v1.5 (the stride on each stage's first 3 x 3), its convolutions and the
  classifier; batch norms are left out (their parameters are 0.2 % of the network's)."""
  hw = image // 2
  layers = [conv("conv1", 3, 64, 7, hw)]
  hw //= 2  # max pool
  c_in = 64
  for stage, (width, blocks) in enumerate(zip((64, 128, 256, 512), (3, 4, 6, 3))):
    for block in range(blocks):
      stride = 2 if block == 0 and stage > 0 else 1
      out_hw = hw // stride
      name = f"stage{stage + 1}/block{block + 1}"
      layers += [conv(f"{name}/conv1", c_in, width, 1, hw),
                 conv(f"{name}/conv2", width, width, 3, out_hw),
                 conv(f"{name}/conv3", width, 4 * width, 1, out_hw)]
      if block == 0:
        layers.append(conv(f"{name}/downsample", c_in, 4 * width, 1, out_hw))
      c_in, hw = 4 * width, out_hw
  layers.append(Layer("fc", c_in + 1, classes, 1, 2 * (c_in + 1) * classes,
                      (c_in + 1) * classes))
  return layers


@dataclasses.dataclass(frozen=True)
class Network:
  """Latency (s) and inverse bandwidth (s/byte) within a node and across nodes; across
  nodes, `beta_inter` is per node (all its devices share its links)."""
  devices_per_node: int
  alpha_intra: float
  beta_intra: float
  alpha_inter: float
  beta_inter: float


@dataclasses.dataclass(frozen=True)
class Device:
  flops: float        # peak flop/s for the forward/backward pass's precision
  gemm_flops: float   # peak flop/s for the fp32 statistics and preconditioning
  # n³ per second for one symmetric eigendecomposition of width n: one number, or a
  # function of n (small eigendecompositions run far below the large ones' rate)
  eigh_rate: float | Callable[[int], float]


def _tree_latency(p: int, alpha: float) -> float:
  return 2 * math.ceil(math.log2(p)) * alpha if p > 1 else 0.0


def all_reduce_seconds(nbytes: float, devices: int, net: Network) -> float:
  """A hierarchical all-reduce of `nbytes` over `devices` (module docstring)."""
  if devices <= 1 or nbytes <= 0:
    return 0.0
  local = min(devices, net.devices_per_node)
  nodes = math.ceil(devices / local)
  t = 0.0
  if local > 1:  # reduce-scatter, then all-gather, within the node
    t += 2 * (_tree_latency(local, net.alpha_intra) / 2
              + (local - 1) / local * nbytes * net.beta_intra)
  if nodes > 1:  # 1/local of the bytes from each device, over the node's shared links
    t += _tree_latency(nodes, net.alpha_inter) + 2 * (nodes - 1) / nodes * nbytes * (
        net.beta_inter)
  return t


@dataclasses.dataclass(frozen=True)
class Settings:
  batch: int                 # examples per device
  stats_every: int = 1
  inverse_every: int = 1
  grad_bytes: int = 2        # fp16 gradients
  factor_bytes: float = 4.0  # fp32 factors (bf16: 2)
  # statistics GEMMs in low precision, at the device's `flops` (tensor cores) instead of
  # its fp32 `gemm_flops`
  low_precision_stats: bool = False


def predict(layers: Sequence[Layer], devices: int, device: Device, net: Network,
            s: Settings, efficiency: Mapping[str, float] | float = 0.5,
            gemm_efficiency: float | Callable[[int], float] = 0.7) -> dict[str, float]:
  """Seconds per step of each part in `PARTS`, amortised over `stats_every` and
  `inverse_every`."""
  eff = (lambda name: efficiency) if isinstance(efficiency, (int, float)) else (
      lambda name: efficiency[name])
  g_eff = gemm_efficiency if callable(gemm_efficiency) else (lambda width: gemm_efficiency)
  fwd_bwd = sum(3 * s.batch * l.flops / (device.flops * eff(l.name)) for l in layers)
  stats_peak = device.flops if s.low_precision_stats else device.gemm_flops
  stats = sum(2 * s.batch * l.positions * (l.d_in ** 2 / g_eff(l.d_in)
                                           + l.d_out ** 2 / g_eff(l.d_out))
              for l in layers) / stats_peak
  factor_bytes = sum(l.d_in ** 2 + l.d_out ** 2 for l in layers) * s.factor_bytes
  owner = kfac.assign_inverses({l.name: _Widths(l.d_in, l.d_out) for l in layers}, devices)
  load = [0.0] * devices
  eigh = device.eigh_rate if callable(device.eigh_rate) else (lambda n: device.eigh_rate)
  for l in layers:
    load[owner[l.name]] += l.d_in ** 3 / eigh(l.d_in) + l.d_out ** 3 / eigh(l.d_out)
  share = sum(all_reduce_seconds(4 * (l.d_in ** 2 + l.d_out ** 2), devices, net)
              for l in layers)
  precondition = sum(2 * (l.d_in ** 2 * l.d_out + l.d_in * l.d_out ** 2)
                     / g_eff(min(l.d_in, l.d_out)) for l in layers) / device.gemm_flops
  weights = all_reduce_seconds(sum(l.params for l in layers) * s.grad_bytes, devices, net)
  return {"forward/backward": fwd_bwd,
          "statistics": stats / s.stats_every,
          "factor all-reduce": all_reduce_seconds(factor_bytes, devices, net) / s.stats_every,
          "inverses": max(load) / s.inverse_every,
          "inverse share": share / s.inverse_every,
          "preconditioning": precondition,
          "weight all-reduce": weights}


@dataclasses.dataclass(frozen=True)
class _Widths:
  """What `kfac.assign_inverses` reads of a layer."""
  in_dim: int
  out_dim: int


def communicated_bytes(layers: Sequence[Layer], s: Settings, grads: bool = True,
                       factors: bool = True, inverses: bool = True) -> dict[str, float]:
  """Bytes each collective of a step carries (before any hierarchy): what the compiled
  HLO's all-reduces should add up to."""
  return {"weight all-reduce": sum(l.params for l in layers) * s.grad_bytes if grads else 0,
          "factor all-reduce": (sum(l.d_in ** 2 + l.d_out ** 2 for l in layers)
                                * s.factor_bytes if factors else 0),
          "inverse share": (sum(4 * (l.d_in ** 2 + l.d_out ** 2) for l in layers)
                            if inverses else 0)}


# Published figures (datasheets) for the seed's setting: ABCI's nodes, 4 V100 SXM2 each,
# NVLink 2 within the node, two InfiniBand EDR ports per node.
V100 = Device(flops=125e12,        # tensor cores, fp16 (NVIDIA V100 datasheet)
              gemm_flops=15.7e12,  # fp32 (same)
              eigh_rate=0.0)       # set by calibration: experiments.kfac_scaling
ABCI = Network(devices_per_node=4,
               alpha_intra=5e-6, beta_intra=1 / 50e9,   # NVLink 2: 2 links x 25 GB/s
               alpha_inter=5e-6, beta_inter=1 / 25e9)   # 2 x EDR (100 Gb/s = 12.5 GB/s)
