"""Per-device memory of the CosmoFlow train step as the depth split P grows.

    python -m experiments.cosmoflow_memory [--variant=lbann] [--size=256] [--batch=1] \
        [--splits=1,2,4,8] [--lowering=auto] [--params=fsdp|replicated] [--peak=0]

Compiles (does not run) the full train step — forward, backward, optimiser update, with
donated state — for a `1 x P` data x spatial mesh on P virtual CPU devices, and prints XLA's
buffer assignment per device. Spatial partitioning exists to make this number shrink with P.
`--peak=N` also lists the N largest buffers live at each P's peak: shape, JAX op and the
line of sdl that made them.
"""
from absl import app, flags

from experiments.trainers.memory import TARGETS, measure
from sdl.parallel import ensure_cpu_devices

_VARIANT = flags.DEFINE_enum("variant", "lbann", ["lbann", "mlperf"], "CosmoFlow network.")
_SIZE = flags.DEFINE_integer("size", 256, "Input side in voxels.")
_BATCH = flags.DEFINE_integer("batch", 1, "Global batch size.")
_SPLITS = flags.DEFINE_list("splits", ["1", "2", "4", "8"], "Depth splits P to compare.")
_LOWERING = flags.DEFINE_enum("lowering", "auto", ["auto", "native", "folded"],
                              "model.conv_lowering (auto: this backend's default).")
_PARAMS = flags.DEFINE_enum("params", "fsdp", ["replicated", "fsdp"],
                            "mesh.params: parameters and Adam moments split over the P "
                            "devices, or whole on each (what does not shrink with P).")
_PEAK = flags.DEFINE_integer("peak", 0, "List this many of the largest buffers at the peak.")

def main(argv):
  del argv
  splits = [int(p) for p in _SPLITS.value]
  ensure_cpu_devices(max(splits))
  rows, base = [], None
  print(f"CosmoFlow {_VARIANT.value} {_SIZE.value}^3 x 4, batch {_BATCH.value}, lowering "
        f"{_LOWERING.value}, params {_PARAMS.value}: train step memory "
        "per device (XLA buffer assignment, MiB)")
  mib = lambda b: f"{b / 2 ** 20:,.1f}"
  table = ["| P | depth-split layers | arguments | outputs (aliased) | temporaries | total | "
           "vs P=1 | ideal 1/P |", "|---|---|---|---|---|---|---|---|"]
  print("\n".join(table), flush=True)
  for p in splits:
    plan, fp, buffers = measure(_VARIANT.value, _SIZE.value, _BATCH.value, p,
                                _LOWERING.value, _PARAMS.value, _PEAK.value)
    base = base or fp.total
    rows.append((p, fp.total / base))
    line = (f"| {p} | {plan.spatial_layers} | {mib(fp.arguments)} | {mib(fp.outputs)} "
            f"({mib(fp.aliased)}) | {mib(fp.temporaries)} | {mib(fp.total)} | "
            f"{fp.total / base:.4f} | {1 / p:.3f} |")
    table.append(line)
    print(line, flush=True)
    if buffers:
      print(f"  largest buffers live at the peak, P={p}:")
      for b in buffers:
        print(f"  {mib(b.bytes):>9} MiB  {b.shape:<28} {b.op[-70:]:<70} {b.source}")
  if buffers:
    print("\n".join(table))
  for p, ratio in rows:
    if p in TARGETS:
      verdict = "meets" if ratio <= TARGETS[p] else "misses"
      print(f"target: P={p} footprint <= {TARGETS[p]} x P=1: {ratio:.4f} ({verdict})")


if __name__ == "__main__":
  app.run(main)
