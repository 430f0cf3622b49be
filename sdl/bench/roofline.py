"""Rooflines: a device's measured roofs, each layer as a point, and predicted times.

The roof is min(peak FLOP/s, bandwidth x arithmetic intensity) (Williams, Waterman &
Patterson, CACM 2009); a layer's roofline time on a device is
max(FLOPs / peak, bytes / bandwidth), a lower bound that ignores everything but the two.
"""
import dataclasses

import matplotlib
import numpy as np
from matplotlib.figure import Figure


@dataclasses.dataclass(frozen=True)
class Device:
  name: str
  peak_flops: float       # FLOP/s at the precision compared
  bandwidth: float        # bytes/s of main memory
  note: str = ""

  def predicted_seconds(self, flops: float, nbytes: float) -> float:
    return max(flops / self.peak_flops, nbytes / self.bandwidth)

  @property
  def ridge(self) -> float:
    """Arithmetic intensity (FLOP/byte) above which a layer is compute-bound."""
    return self.peak_flops / self.bandwidth


# Vendor numbers (dense, no sparsity). A64FX: Fujitsu's FX1000 spec, 48 compute cores at
# 2.0 GHz; H100: NVIDIA H100 SXM5 datasheet.
A64FX = Device("A64FX", 6.14e12, 1024e9, "fp32 6.14 TF, HBM2 1,024 GB/s")
H100_FP32 = Device("H100 SXM (fp32)", 67e12, 3.35e12, "fp32 67 TF, HBM3 3.35 TB/s")
H100_BF16 = Device("H100 SXM (bf16)", 989e12, 3.35e12, "bf16 tensor 989 TF, HBM3 3.35 TB/s")


# Dense peaks of accelerators by the names JAX gives them (`device_kind`), per precision
# as sdl.bench.layers names them: fp32 `highest`, `default` (TF32 on NVIDIA since Ampere,
# what JAX uses for fp32 there unless asked otherwise) and `bf16`. Vendor datasheets;
# first match wins, so the more specific names come first.
NOMINAL_PEAKS = (
    ("H100 PCIe", {"highest": 51e12, "default": 378e12, "bf16": 756e12}, 2.0e12),
    ("H100", {"highest": 67e12, "default": 494.7e12, "bf16": 989.4e12}, 3.35e12),
    ("H200", {"highest": 67e12, "default": 494.7e12, "bf16": 989.4e12}, 4.8e12),
    ("A100", {"highest": 19.5e12, "default": 156e12, "bf16": 312e12}, 2.0e12),
)


def nominal(device_kind: str, precision: str) -> Device | None:
  """The vendor's dense peak for a device JAX names `device_kind`, None if unknown."""
  for name, peaks, bandwidth in NOMINAL_PEAKS:
    if name.lower() in device_kind.lower():
      return Device(f"{device_kind} ({precision})", peaks[precision], bandwidth,
                    "vendor datasheet, dense")
  return None


def figure(device: Device, points: list[tuple[str, float, float]], title: str) -> Figure:
  """The roofline of `device` with `points` (label, FLOP/byte, achieved FLOP/s), coloured
  by the label's first word. A plain `Figure` (no pyplot state): a notebook displays it,
  `plot` saves it."""
  fig = Figure(figsize=(8, 5.5))
  ax = fig.subplots()
  intensities = [p[1] for p in points] or [1.0]
  x = np.logspace(np.log10(min(intensities + [device.ridge]) / 4),
                  np.log10(max(intensities + [device.ridge]) * 4), 200)
  ax.loglog(x, np.minimum(device.peak_flops, device.bandwidth * x) / 1e9, "k-", lw=2,
            label=f"roof: {device.peak_flops / 1e9:.0f} GFLOP/s, {device.bandwidth / 1e9:.1f} GB/s")
  kinds = sorted({label.split()[0] for label, *_ in points})
  colors = dict(zip(kinds, matplotlib.colormaps["tab10"].colors))
  for kind in kinds:
    pts = [(i, f) for label, i, f in points if label.split()[0] == kind]
    ax.scatter([p[0] for p in pts], [p[1] / 1e9 for p in pts], s=18, color=colors[kind],
               label=kind, alpha=0.8)
  ax.set_xlabel("arithmetic intensity (FLOP / byte)")
  ax.set_ylabel("GFLOP/s")
  ax.set_title(title)
  ax.grid(True, which="both", alpha=0.3)
  ax.legend(fontsize=8, loc="lower right")
  fig.tight_layout()
  return fig


def plot(path: str, device: Device, points: list[tuple[str, float, float]], title: str) -> str:
  """Roofline PNG at `path` (`figure`); returns the path."""
  figure(device, points, title).savefig(path, dpi=120)
  return path
