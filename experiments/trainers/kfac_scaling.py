"""Distributed K-FAC at scale, on paper: `sdl.bench.kfac_model` calibrated here, checked
here, and asked about ResNet-50 on up to 2,048 V100s.

  calibrate          this machine's fp32 GEMM rate, its eigh rate (n³ per second), the
                     efficiency of `x.T @ x` against the factor width (`gemm_curve`), and
                     each distinct ResNet-50 layer's forward/backward time, one layer at a
                     time: its efficiency relative to the GEMM rate;
  check_parts        the model's statistics, inversion and preconditioning times for a
                     problem against `experiments.kfac_profile`'s measurement of them;
  hlo_bytes          the bytes the compiled data-parallel K-FAC step all-reduces, from its
                     HLO, against the model's count;
  resnet50_at_scale  each part of a step at 16 to 2,048 V100s (ABCI's nodes).

What carries over from a CPU to a V100 is an assumption, stated where it is made: the
layers' relative forward/backward efficiencies (scaled so that the whole pass runs at the
published single-V100 throughput) and eigh's rate relative to GEMM's.
"""
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from sdl.bench import kfac_model

from sdl.bench.timing import measure

# NVIDIA DeepLearningExamples, PyTorch ResNet-50 v1.5, 1 x V100 32 GB, mixed precision
# training: 1,156 images/s.
V100_IMAGES_PER_S = 1156.0
# Osawa et al., "Scalable and Practical Natural Gradient for Large-Scale Deep Learning"
# (SP-NGD, TPAMI 2020): 75.4 % top-1 in 5.5 min, mini-batch 32,768 on 1,024 V100s.
PUBLISHED = {"gpus": 1024, "batch": 32768, "minutes": 5.5}
# The CVPR 2019 paper (Osawa et al., arXiv:1811.12019): 75 % top-1 in 35 epochs at
# mini-batches up to 16,384 (32,768 also in 35 epochs in the later paper).
EPOCHS = 35
IMAGENET_TRAIN = 1_281_167


def gemm_rate(n: int = 1536, runs: int = 5) -> float:
  """fp32 flop/s of an `n x n` matmul on the default device."""
  a = jnp.asarray(np.random.default_rng(0).normal(size=(n, n)), jnp.float32)
  t = measure(jax.jit(lambda a: a @ a), a, runs=runs).median_s
  return 2 * n ** 3 / t


def eigh_rate(widths=(64, 128, 256, 512, 1024), runs: int = 3) -> dict[int, float]:
  """n³ / seconds of `jnp.linalg.eigh` for each width (the rate `Device.eigh_rate` takes)."""
  out = {}
  for n in widths:
    x = np.random.default_rng(n).normal(size=(2 * n, n)).astype(np.float32)
    m = jnp.asarray(x.T @ x / (2 * n))
    out[n] = n ** 3 / measure(jax.jit(jnp.linalg.eigh), m, runs=runs).median_s
  return out


def gemm_curve(gemm_flops: float, rows: int, widths=(16, 32, 64, 128, 256, 512, 1024),
               runs: int = 5) -> dict[int, float]:
  """`{width: efficiency}` of a factor's statistics GEMM, `x.T @ x` for `x` of `rows x
  width`, relative to `gemm_flops`."""
  out = {}
  for d in widths:
    x = jnp.asarray(np.random.default_rng(d).normal(size=(rows, d)), jnp.float32)
    seconds = measure(jax.jit(lambda x: x.T @ x), x, runs=runs).median_s
    out[d] = 2 * rows * d * d / seconds / gemm_flops
  return out


def width_efficiency(curve: dict[int, float]):
  """The efficiency (or eigh rate) at any width: `curve` interpolated in log2(width), held
  at its ends."""
  widths = np.log2(sorted(curve))
  values = np.array([curve[w] for w in sorted(curve)])
  return lambda width: float(np.interp(np.log2(max(width, 1)), widths, values))


def _conv_fwd_bwd(c_in, c_out, k, stride, in_hw, batch):
  """A jitted forward + backward (input and kernel gradients) of one NHWC convolution."""
  pad = (k - 1) // 2

  def loss(x, w):
    y = lax.conv_general_dilated(x, w, (stride, stride), [(pad, pad)] * 2,
                                 dimension_numbers=("NHWC", "HWIO", "NHWC"))
    return jnp.sum(y * y) * 0.5
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(batch, in_hw, in_hw, c_in)), jnp.float32)
  w = jnp.asarray(rng.normal(size=(k, k, c_in, c_out)) / math.sqrt(k * k * c_in), jnp.float32)
  return jax.jit(jax.grad(loss, argnums=(0, 1))), (x, w)


def resnet50_geometry(image: int = 224):
  """`{layer name: (c_in, c_out, k, stride, input side)}`, in `kfac_model.resnet50` order."""
  out, hw, c_in = {"conv1": (3, 64, 7, 2, image)}, image // 4, 64
  for stage, (width, blocks) in enumerate(zip((64, 128, 256, 512), (3, 4, 6, 3))):
    for block in range(blocks):
      stride = 2 if block == 0 and stage > 0 else 1
      name = f"stage{stage + 1}/block{block + 1}"
      out[f"{name}/conv1"] = (c_in, width, 1, 1, hw)
      out[f"{name}/conv2"] = (width, width, 3, stride, hw)
      out[f"{name}/conv3"] = (width, 4 * width, 1, 1, hw // stride)
      if block == 0:
        out[f"{name}/downsample"] = (c_in, 4 * width, 1, stride, hw)
      c_in, hw = 4 * width, hw // stride
  return out


def layer_efficiency(layers, gemm_flops: float, batch: int = 2, runs: int = 3,
                     progress=print) -> dict[str, float]:
  """Each ResNet-50 layer's forward/backward flop rate here, over `gemm_flops`: measured
  once per distinct shape (the network repeats most of them). The classifier, a GEMM, gets
  1."""
  geometry = resnet50_geometry()
  by_shape, out = {}, {}
  for layer in layers:
    shape = geometry.get(layer.name)
    if shape is None:
      out[layer.name] = 1.0
      continue
    if shape not in by_shape:
      fn, args = _conv_fwd_bwd(*shape, batch)
      seconds = measure(fn, *args, runs=runs).median_s
      by_shape[shape] = 3 * batch * layer.flops / seconds / gemm_flops
      progress(f"  {layer.name:<28} {shape}: {by_shape[shape]:.2f} of the GEMM rate")
    out[layer.name] = by_shape[shape]
  return out


def v100_efficiency(layers, relative: dict[str, float]) -> dict[str, float]:
  """`relative` scaled so that the whole forward/backward pass of one image runs at
  `V100_IMAGES_PER_S` on the V100's tensor-core peak."""
  device = kfac_model.V100
  seconds = sum(3 * l.flops / (device.flops * relative[l.name]) for l in layers)
  scale = seconds * V100_IMAGES_PER_S
  return {name: e * scale for name, e in relative.items()}


def check_parts(measured: dict, model_layers, batch: int, gemm_flops: float, eigh,
                gemm_efficiency=1.0) -> list[tuple[str, float, float]]:
  """(part, predicted s, measured s) for the parts the model derives from GEMM and eigh
  rates alone: statistics, inversion, preconditioning (from the gradient); the GEMMs at
  `gemm_efficiency` (one number, or `width_efficiency`) of `gemm_flops`, eigh at `eigh`
  n³/s (one number, or a function of n)."""
  device = kfac_model.Device(flops=gemm_flops, gemm_flops=gemm_flops, eigh_rate=eigh)
  net = kfac_model.Network(1, 0, 0, 0, 0)
  p = kfac_model.predict(model_layers, 1, device, net, kfac_model.Settings(batch=batch),
                         efficiency=1.0, gemm_efficiency=gemm_efficiency)
  return [("statistics", p["statistics"], measured["statistics"]),
          ("inversion", p["inverses"], measured["inversion"]),
          ("preconditioning", p["preconditioning"], measured["preconditioning"])]


def resnet50_at_scale(devices=(16, 64, 256, 1024, 2048), batch: int = 32,
                      efficiency: dict[str, float] | float = 0.3,
                      eigh: float = 1e10, settings: dict | None = None) -> dict:
  """`{label: {devices: parts}}` for ResNet-50 on V100s over ABCI's network."""
  layers = kfac_model.resnet50()
  device = kfac_model.Device(kfac_model.V100.flops, kfac_model.V100.gemm_flops, eigh)
  settings = settings or {
      "every step, fp32": dict(stats_every=1, inverse_every=1),
      "stale (stats 10, inverses 100), fp32": dict(stats_every=10, inverse_every=100),
      "stale, bf16 statistics and factor traffic": dict(
          stats_every=10, inverse_every=100, factor_bytes=2, low_precision_stats=True)}
  return {label: {p: kfac_model.predict(layers, p, device, kfac_model.ABCI,
                                        kfac_model.Settings(batch=batch, **kw), efficiency)
                  for p in devices}
          for label, kw in settings.items()}


def published_step_seconds() -> float:
  """Seconds per step implied by the SP-NGD time, if it took `EPOCHS` epochs."""
  steps = EPOCHS * IMAGENET_TRAIN / PUBLISHED["batch"]
  return PUBLISHED["minutes"] * 60 / steps


def plot(results: dict, path: str, published: float | None = None) -> None:
  import matplotlib  # noqa: PLC0415
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # noqa: PLC0415
  fig, axes = plt.subplots(1, len(results), figsize=(5.5 * len(results), 4.5), sharey=True)
  axes = np.atleast_1d(axes)
  colors = plt.get_cmap("tab10").colors
  for ax, (label, by_devices) in zip(axes, results.items()):
    counts = sorted(by_devices)
    x = np.arange(len(counts))
    bottom = np.zeros(len(counts))
    for i, part in enumerate(kfac_model.PARTS):
      ms = np.array([by_devices[p][part] * 1e3 for p in counts])
      ax.bar(x, ms, bottom=bottom, color=colors[i], label=part)
      bottom += ms
    if published is not None:
      ax.axhline(published * 1e3, color="k", ls="--", lw=1,
                 label="published SP-NGD step (1,024 GPUs)")
    ax.set_xticks(x, [str(c) for c in counts])
    ax.set_xlabel("V100 GPUs (32 images each)")
    ax.set_title(label, fontsize=10)
  axes[0].set_ylabel("ResNet-50 K-FAC step, ms (model)")
  axes[-1].legend(fontsize=8, loc="upper left")
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def measure_processes(counts=(1, 2, 4), sizes=(65536, 1 << 20, 1 << 24), runs: int = 7,
                      timeout: int = 600) -> dict[int, dict[int, float]]:
  """`{processes: {bytes: seconds}}` of a cross-process all-reduce on this machine, one
  device per process (`experiments.all_reduce_bench` under `sdl.launch`)."""
  import os  # noqa: PLC0415
  import subprocess  # noqa: PLC0415
  import sys  # noqa: PLC0415
  root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  out = {}
  for p in counts:
    result = subprocess.run(
        [sys.executable, "-m", "sdl.launch", "-n", str(p), "--cpu_devices", "1", "--",
         sys.executable, "-m", "experiments.all_reduce_bench",
         "--bytes=" + ",".join(str(s) for s in sizes), f"--runs={runs}"],
        cwd=root, capture_output=True, text=True, timeout=timeout,
        env={**os.environ, "PYTHONPATH": root})
    if result.returncode != 0:
      raise RuntimeError(f"all_reduce_bench on {p} processes failed:\n{result.stdout[-2000:]}"
                         f"\n{result.stderr[-2000:]}")
    rows = re.findall(r"all_reduce bytes=(\d+) processes=\d+ seconds=([0-9.e+-]+)",
                      result.stdout)
    out[p] = {int(b): float(s) for b, s in rows}
  return out


def fit_ring(two: dict[int, float]) -> tuple[float, float]:
  """(α, β) of `t = 2 α + n β`, the model's all-reduce over 2 devices, fitted by least
  squares to measured `{bytes: seconds}`."""
  n = np.array(sorted(two), np.float64)
  t = np.array([two[k] for k in sorted(two)], np.float64)
  design = np.stack([2 * np.ones_like(n), n], axis=1)
  (alpha, beta), *_ = np.linalg.lstsq(design, t, rcond=None)
  return max(float(alpha), 0.0), float(beta)
