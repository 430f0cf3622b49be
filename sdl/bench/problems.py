"""The layers the benchmark suite times, with their FLOPs and bytes counted by hand.

* GEMMs: DeepBench's training set (`code/kernels/gemm_problems.h`: m, n, k, a_t, b_t;
  C[m, n] = op(A) op(B) with op(A) `[m, k]`), the shapes up to n = 7000 that a CPU times
  in seconds, plus a large square GEMM that measures the peak.
* 2D convolutions: DeepBench's training set (`conv_problems.h`: w, h, c, n, k, s, r, pad,
  stride), NHWC here.
* 3D convolutions: every convolution of both CosmoFlow networks at 128³ (batch 2) and of
  a 3D U-Net in the layout of Çiçek et al. (MICCAI 2016): 4 levels with 32, 64, 128 and
  256 channels, two 3³ convolutions per level, decoder convolutions reading the upsampled
  features concatenated with the skip connection; 64³ x 1 input, batch 1.
* 3D transposed convolutions: the 2³ stride-2 upsamplings of LBANN's unet3d (each keeps
  its channels: 512, 256 and 128 at full widths), 64³ x 1 input, batch 1. XLA:CPU runs
  the native op very slowly (jax#31662); `xla-folded` is sdl's `depth_to_space` (one
  GEMM and a reshuffle) that the U-Net uses on CPU.
* Dense layers, `act(x W + b)`: both CosmoFlow heads at 128³ (batch 2), BERT-base's MLP,
  ResNet-50's classifier and a DeepBench hidden layer; the same GEMMs with their bias and
  activation, and their gradients, as a model runs them.
* A transformer block (BERT-base shape: sequence 512, width 768, 12 heads, MLP 3072) and
  its attention alone.

FLOPs count a multiply-add as 2, over every kernel tap including those on zero padding
(the usual convention, DeepBench's too); XLA's cost analysis counts only the taps on real
input (`Conv.valid_flops`), so padded convolutions differ by the padding fraction, a few
percent on small images. Bytes count each input, weight and output once (the minimum
traffic, what a roofline assumes). Forward + backward is 3 x forward for GEMMs
and convolutions (the data and weight gradients each cost one forward).
"""
import dataclasses
import math

from sdl.models.cosmoflow import LEAKY_SLOPE, feature_layers, head_widths


@dataclasses.dataclass(frozen=True)
class Gemm:
  m: int
  n: int
  k: int
  a_t: bool = False
  b_t: bool = False
  source: str = "DeepBench"

  @property
  def name(self) -> str:
    return f"gemm {self.m}x{self.n}x{self.k}{' aT' if self.a_t else ''}{' bT' if self.b_t else ''}"

  def flops(self) -> float:
    return 2.0 * self.m * self.n * self.k

  def bytes(self, itemsize: int) -> float:
    return float(self.m * self.k + self.k * self.n + self.m * self.n) * itemsize


@dataclasses.dataclass(frozen=True)
class Conv:
  """N-d convolution, channels last: input `[batch, *spatial, c_in]`."""
  batch: int
  spatial: tuple[int, ...]
  c_in: int
  c_out: int
  kernel: tuple[int, ...]
  stride: tuple[int, ...]
  padding: tuple[int, ...]
  source: str

  @property
  def out_spatial(self) -> tuple[int, ...]:
    return tuple((s + 2 * p - k) // st + 1 for s, k, st, p in
                 zip(self.spatial, self.kernel, self.stride, self.padding))

  @property
  def name(self) -> str:
    x = "x".join(map(str, self.spatial))
    k = "x".join(map(str, self.kernel))
    return (f"conv{len(self.spatial)}d {self.source} n{self.batch} {x}x{self.c_in}"
            f"->{self.c_out} k{k} s{self.stride[0]}")

  def flops(self) -> float:
    return (2.0 * self.batch * math.prod(self.out_spatial) * math.prod(self.kernel)
            * self.c_in * self.c_out)

  def valid_flops(self) -> float:
    """FLOPs of the taps that land on real input, not on zero padding (XLA counts these)."""
    taps = 1
    for size, k, st, p, out in zip(self.spatial, self.kernel, self.stride, self.padding,
                                   self.out_spatial):
      taps *= sum(0 <= o * st - p + t < size for o in range(out) for t in range(k))
    return 2.0 * self.batch * taps * self.c_in * self.c_out

  def bytes(self, itemsize: int) -> float:
    return float(self.batch * math.prod(self.spatial) * self.c_in
                 + math.prod(self.kernel) * self.c_in * self.c_out
                 + self.batch * math.prod(self.out_spatial) * self.c_out) * itemsize


@dataclasses.dataclass(frozen=True)
class ConvTranspose:
  """3D transposed convolution whose kernel equals its stride (no overlap), channels
  last: input `[batch, *spatial, c_in]`, output `[batch, *(spatial * k), c_out]`."""
  batch: int
  spatial: tuple[int, int, int]
  c_in: int
  c_out: int
  k: int
  source: str

  @property
  def out_spatial(self) -> tuple[int, ...]:
    return tuple(s * self.k for s in self.spatial)

  @property
  def name(self) -> str:
    x = "x".join(map(str, self.spatial))
    return (f"convT3d {self.source} n{self.batch} {x}x{self.c_in}->{self.c_out} "
            f"k{self.k} s{self.k}")

  def flops(self) -> float:  # each input voxel meets each of the k³ taps once
    return 2.0 * self.batch * math.prod(self.spatial) * self.k ** 3 * self.c_in * self.c_out

  def bytes(self, itemsize: int) -> float:
    return float(self.batch * math.prod(self.spatial) * self.c_in
                 + self.k ** 3 * self.c_in * self.c_out
                 + self.batch * math.prod(self.out_spatial) * self.c_out) * itemsize


ACTIVATIONS = ("none", "relu", "leaky_relu", "gelu")


@dataclasses.dataclass(frozen=True)
class Dense:
  """`act(x W + b)`: x `[batch, d_in]`, W `[d_in, d_out]`, b `[d_out]`. FLOPs count the
  product (2 batch d_in d_out), as for GEMMs; the bias and the activation add
  O(batch d_out), which XLA's cost analysis counts too."""
  batch: int
  d_in: int
  d_out: int
  activation: str
  source: str
  slope: float = 0.01  # leaky_relu's

  def __post_init__(self):
    if self.activation not in ACTIVATIONS:
      raise ValueError(f"Dense activation {self.activation!r}: choose one of {ACTIVATIONS}")

  @property
  def name(self) -> str:
    return f"dense {self.source} n{self.batch} {self.d_in}->{self.d_out} {self.activation}"

  def flops(self) -> float:
    return 2.0 * self.batch * self.d_in * self.d_out

  def bytes(self, itemsize: int) -> float:
    return float(self.batch * self.d_in + self.d_in * self.d_out + self.d_out
                 + self.batch * self.d_out) * itemsize


def dense_layers(cosmoflow_size: int = 128, cosmoflow_batch: int = 2) -> list[Dense]:
  """Each CosmoFlow network's head (flattened features -> hidden widths -> 4, leaky ReLU
  between, as `sdl.models.cosmoflow`), BERT-base's MLP (512 tokens, GELU), ResNet-50's
  classifier (batch 256) and DeepBench's 1760-wide hidden layer (batch 64, ReLU)."""
  out = []
  for variant, slope in LEAKY_SLOPE.items():
    widths = head_widths(variant, cosmoflow_size)  # () where there is no head at this size
    for i, (a, b) in enumerate(zip(widths, widths[1:])):
      act = "leaky_relu" if i < len(widths) - 2 else "none"
      out.append(Dense(cosmoflow_batch, a, b, act, f"cosmoflow-{variant}", slope))
  out += [Dense(512, 768, 3072, "gelu", "BERT-base"), Dense(512, 3072, 768, "none", "BERT-base"),
          Dense(256, 2048, 1000, "none", "ResNet-50"), Dense(64, 1760, 1760, "relu", "DeepBench")]
  return out


@dataclasses.dataclass(frozen=True)
class Transformer:
  batch: int = 1
  seq: int = 512
  width: int = 768
  heads: int = 12
  mlp: int = 3072
  attention_only: bool = False
  source: str = "BERT-base"

  @property
  def name(self) -> str:
    part = "attention" if self.attention_only else "block"
    return f"transformer {part} b{self.batch} s{self.seq} d{self.width} h{self.heads}"

  def flops(self) -> float:
    b, s, d, f = self.batch, self.seq, self.width, self.mlp
    attention = 2.0 * b * s * s * d * 2          # QK^T and PV over all heads
    projections = 2.0 * b * s * d * d * 4        # Q, K, V, output
    if self.attention_only:
      return attention + projections
    return attention + projections + 2.0 * b * s * d * f * 2

  def bytes(self, itemsize: int) -> float:
    b, s, d, f, h = self.batch, self.seq, self.width, self.mlp, self.heads
    weights = 4 * d * d + (0 if self.attention_only else 2 * d * f)
    activations = 2 * b * s * d + b * h * s * s  # in, out, the score matrix once
    return float(weights + activations) * itemsize


GEMM_SHAPES = [(1760, 16, 1760), (1760, 32, 1760), (1760, 64, 1760), (1760, 128, 1760),
               (1760, 7000, 1760), (2048, 16, 2048), (2048, 32, 2048), (2048, 64, 2048),
               (2048, 128, 2048), (2560, 16, 2560), (2560, 32, 2560), (2560, 64, 2560),
               (2560, 128, 2560), (4096, 16, 4096), (4096, 32, 4096), (4096, 64, 4096),
               (4096, 128, 4096), (7680, 16, 2560), (7680, 64, 2560), (3072, 16, 1024),
               (3072, 128, 1024), (35, 8457, 1760), (1024, 700, 512), (512, 16, 512),
               (1024, 32, 512)]


def deepbench_gemms() -> list[Gemm]:
  out = [Gemm(m, n, k) for m, n, k in GEMM_SHAPES]
  out += [Gemm(1760, 128, 1760, a_t=True), Gemm(2048, 7133, 2048, b_t=True),
          Gemm(1024, 700, 512, a_t=True), Gemm(512, 16, 512, b_t=True)]
  return out


def peak_gemm(size: int = 4096) -> Gemm:
  return Gemm(size, size, size, source="peak")


# (w, h, c, n, k, s, r, pad_w, pad_h, wstride, hstride), DeepBench training_set
CONV2D_SHAPES = [(700, 161, 1, 4, 32, 20, 5, 0, 0, 2, 2), (341, 79, 32, 4, 32, 10, 5, 0, 0, 2, 2),
                 (480, 48, 1, 16, 16, 3, 3, 1, 1, 1, 1), (240, 24, 16, 16, 32, 3, 3, 1, 1, 1, 1),
                 (108, 108, 3, 8, 64, 3, 3, 1, 1, 2, 2), (54, 54, 64, 8, 64, 3, 3, 1, 1, 1, 1),
                 (27, 27, 128, 8, 128, 3, 3, 1, 1, 1, 1), (14, 14, 128, 8, 256, 3, 3, 1, 1, 1, 1),
                 (224, 224, 3, 8, 64, 3, 3, 1, 1, 1, 1), (56, 56, 128, 8, 256, 3, 3, 1, 1, 1, 1),
                 (28, 28, 192, 16, 32, 5, 5, 2, 2, 1, 1), (7, 7, 832, 16, 256, 1, 1, 0, 0, 1, 1),
                 (56, 56, 64, 8, 256, 1, 1, 0, 0, 2, 2), (14, 14, 256, 8, 256, 3, 3, 1, 1, 1, 1)]


def deepbench_convs() -> list[Conv]:
  return [Conv(n, (h, w), c, k, (r, s), (hs, ws), (ph, pw), "DeepBench")
          for w, h, c, n, k, s, r, pw, ph, ws, hs in CONV2D_SHAPES]


def cosmoflow_convs(variant: str, size: int = 128, batch: int = 2) -> list[Conv]:
  out, side, channels = [], size, 4
  for layer in feature_layers(variant, size):
    w = layer.window
    if layer.kind == "conv":
      out.append(Conv(batch, (side,) * 3, channels, layer.features, (w.kernel,) * 3,
                      (w.stride,) * 3, (w.padding[0],) * 3, f"cosmoflow-{variant}"))
      channels = layer.features
    side = w.out_size(side)
  return out


def cosmoflow_step_flops(variant: str, size: int = 128, batch: int = 2) -> float:
  """Model FLOPs of one CosmoFlow training step (forward and backward), for MFU.

  Counted: every convolution tap that lands on real input (`Conv.valid_flops`, what XLA
  counts; the taps on zero padding are not model work) and the dense layers. Backward is
  two more products per layer (input and weight gradients), except the first convolution,
  whose input needs no gradient. Pooling, activations and the update are left out, as MFU
  conventions do.
  """
  convs = cosmoflow_convs(variant, size, batch)
  conv_fwd = [c.valid_flops() for c in convs]
  widths = head_widths(variant, size)
  dense_fwd = sum(2.0 * batch * a * b for a, b in zip(widths, widths[1:]))
  return 3 * (sum(conv_fwd) + dense_fwd) - conv_fwd[0]


def cosmoflow_executed_flops(variant: str, size: int, batch: int = 1, slab_layers: int = 0,
                             slabs: int = 1, stem_remat: bool = False, remat=()) -> float:
  """The FLOPs a CosmoFlow training step executes under a memory plan: the model FLOPs
  (`cosmoflow_step_flops`) plus what rematerialisation adds, which XLA's cost analysis
  cannot see inside sdl's custom-call kernels: the stem's convolutions (`sdl.models.slabs`)
  run again forward in the backward pass when rematerialised (always with slabs > 1), and
  each slab also computes its halo planes (forward, recompute and backward alike); the
  convolutions of a `remat` block under the "full" policy run forward once more
  (`sdl.models.cosmoflow.remat_blocks`; "save_convs" recomputes none)."""
  from sdl.models import slabs as slabs_lib  # noqa: PLC0415
  from sdl.models.cosmoflow import feature_layers, remat_blocks  # noqa: PLC0415
  total = cosmoflow_step_flops(variant, size, batch)
  layers = feature_layers(variant, size)
  conv_fwd = [c.valid_flops() for c in cosmoflow_convs(variant, size, batch)]
  conv_of = {i: k for k, i in enumerate(i for i, l in enumerate(layers) if l.kind == "conv")}
  for first, stop, policy in remat_blocks(layers, remat, slab_layers):
    if policy == "full":
      total += sum(conv_fwd[conv_of[i]] for i in range(first, stop) if i in conv_of)
  if not slab_layers:
    return total
  plan = slabs_lib.plan([l.window for l in layers[:slab_layers]], size, slabs)
  recompute = stem_remat or slabs > 1
  for i in range(slab_layers):
    if i not in conv_of:
      continue
    # planes computed / needed: each slab's halo (and edge planes later zeroed); a whole
    # stem computes its layers' own planes
    overlap = slabs * plan.lengths[i + 1] / plan.sizes[i + 1] if slabs > 1 else 1.0
    passes = 2 if i else 1  # forward and weight gradient (+ input gradient but for the first)
    total += conv_fwd[conv_of[i]] * (overlap * (passes + 1 + recompute) - (passes + 1))
  return total


def unet3d_convs(size: int = 64, batch: int = 1, base: int = 32) -> list[Conv]:
  """3D U-Net: 4 resolution levels, two 3³ convs each, channels doubling; decoder convs
  see the skip connection concatenated to the upsampled features."""
  out, channels, side = [], 1, size
  widths = [base * 2 ** i for i in range(4)]
  for i, width in enumerate(widths):  # encoder (and bottleneck at the last level)
    out += [Conv(batch, (side,) * 3, channels, width, (3,) * 3, (1,) * 3, (1,) * 3, "unet3d"),
            Conv(batch, (side,) * 3, width, width, (3,) * 3, (1,) * 3, (1,) * 3, "unet3d")]
    channels = width
    if i < len(widths) - 1:
      side //= 2
  for width in reversed(widths[:-1]):  # decoder: upsample x2, concat skip, two convs
    side *= 2
    out += [Conv(batch, (side,) * 3, channels + width, width, (3,) * 3, (1,) * 3, (1,) * 3,
                 "unet3d"),
            Conv(batch, (side,) * 3, width, width, (3,) * 3, (1,) * 3, (1,) * 3, "unet3d")]
    channels = width
  return out


def unet3d_transposed_convs(size: int = 64, batch: int = 1,
                            widths: tuple[int, ...] = (128, 256, 512)) -> list[ConvTranspose]:
  """LBANN's unet3d upsamplings, deepest first: `widths[i]` channels at side
  `size / 2^(i + 1)` to side `size / 2^i`, channels kept."""
  return [ConvTranspose(batch, (size >> (i + 1),) * 3, w, w, 2, "lbann-unet3d")
          for i, w in reversed(list(enumerate(widths)))]
